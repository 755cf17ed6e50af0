"""Quality-control figures: a montage and intensity histograms per patient, and one cohort page."""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np

from medsynth.constants import SEQUENCE_TITLES
from medsynth.utils.io import atomic_path, save_text
from medsynth.visualize.figures import save_grid
from preprocessing.registration import resample_to_reference

logger = logging.getLogger(__name__)

__all__ = ["best_slice", "cohort_page", "intensity_histograms", "patient_montage"]


def _data(path: str | os.PathLike) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)


def best_slice(mask: np.ndarray) -> int:
    """The axial slice with the most brain voxels."""
    counts = mask.reshape(-1, mask.shape[-1]).sum(axis=0)
    return int(np.argmax(counts))


def patient_montage(
    work: str | os.PathLike, summary: Mapping[str, Any], final: Mapping[str, str], path: str | os.PathLike
) -> Path:
    """One row per sequence: header-only alignment (before), registered (after), N4 bias, final.

    The red outline in every panel is the brain mask on the reference grid: before registration
    it shows how far each sequence is off, after registration it should hug the brain.
    """
    work = Path(work)
    mask = _data(summary["brain_mask"]) > 0
    k = best_slice(mask)
    reference_img = nib.load(str(work / "resample" / f"{summary['reference']}.nii.gz"))
    rows, contours, titles = [], [], []
    for sequence in summary["sequences"]:
        native = nib.load(str(work / "ingest" / f"{sequence}.nii.gz"))
        before = np.asanyarray(resample_to_reference(native, reference_img, None).dataobj)
        after = _data(work / "resample" / f"{sequence}.nii.gz")
        bias_path = work / "n4" / f"bias_{sequence}.nii.gz"
        bias = _data(bias_path)[..., k] if bias_path.exists() else None
        final_img = _data(final[sequence])[..., k] if sequence in final else None
        rows.append([before[..., k], after[..., k], bias, final_img])
        contours.append([mask[..., k], mask[..., k], mask[..., k] if bias is not None else None, None])
        titles.append(SEQUENCE_TITLES.get(sequence, sequence))
    return save_grid(
        rows,
        path,
        row_titles=titles,
        col_titles=[
            "scanner coordinates",
            f"registered to {summary['reference']}",
            "N4 bias field",
            "final (Nyul; APTw unchanged)",
        ],
        cmaps=["gray", "gray", "magma", "gray"],
        vranges=None,
        contours=contours,
        title=f"{summary['patient_id']}: slice {k} of the reference grid; red = brain mask "
        f"(skull-stripped on {summary['skull_strip_sequence']})",
        panel_size=2.4,
    )


def intensity_histograms(
    summary: Mapping[str, Any], final: Mapping[str, str], path: str | os.PathLike
) -> Path:
    """Brain-mask intensity histograms per sequence: after N4 (left) and after Nyúl (right)."""
    mask = _data(summary["brain_mask"]) > 0
    sequences = [s for s in summary["sequences"] if s in final]
    figure, axes = plt.subplots(len(sequences), 2, figsize=(7, 1.6 * len(sequences) + 0.5), squeeze=False)
    try:
        for row, sequence in enumerate(sequences):
            quantitative = not Path(summary["n4"][sequence]).with_name(f"bias_{sequence}.nii.gz").exists()
            names = (
                ("as acquired", "final (not standardized)") if quantitative else ("after N4", "standardized")
            )
            for col, (source, name) in enumerate(
                ((summary["n4"][sequence], names[0]), (final[sequence], names[1]))
            ):
                values = _data(source)[mask]
                axis = axes[row][col]
                low, high = np.percentile(values, [0.5, 99.5])
                axis.hist(values, bins=100, range=(low, high if high > low else low + 1), color="steelblue")
                axis.set_yticks([])
                axis.tick_params(labelsize=7)
                axis.set_title(f"{SEQUENCE_TITLES.get(sequence, sequence)} {name}", fontsize=8)
        figure.suptitle(f"{summary['patient_id']}: intensities inside the brain mask", fontsize=9)
        figure.tight_layout()
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(figure)
    return Path(path)


def cohort_page(
    out_dir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    failures: Mapping[str, str],
    timings: Sequence[Mapping[str, Any]],
    path: str | os.PathLike | None = None,
) -> Path:
    """Write ``OUT/qc/index.html``: per-patient figures, per-step timings and the failures."""
    out_dir = Path(out_dir)
    path = Path(path) if path is not None else out_dir / "qc" / "index.html"
    steps = sorted({t["step"] for t in timings}, key=lambda s: [t["step"] for t in timings].index(s))
    by_patient: dict[str, dict[str, str]] = {}
    for t in timings:
        cell = f"{t['seconds']:.1f}" + (" (skip)" if t.get("skipped") else "")
        by_patient.setdefault(t["patient_id"], {})[t["step"]] = cell
    style = (
        "body{font-family:sans-serif;margin:1em}td,th{border:1px solid #ccc;padding:2px 6px}"
        "table{border-collapse:collapse}img{max-width:100%}"
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>medsynth preprocessing QC</title>",
        f"<style>{style}</style></head><body>",
        "<h1>Preprocessing QC</h1>",
        f"<p>{len(rows)} patient(s) processed, {len(failures)} failed.</p>",
    ]
    if failures:
        parts.append("<h2>Failures</h2><ul>")
        parts += [
            f"<li><b>{html.escape(pid)}</b>: <pre>{html.escape(msg)}</pre></li>"
            for pid, msg in sorted(failures.items())
        ]
        parts.append("</ul>")
    parts.append(
        "<h2>Per-step times (s)</h2><table><tr><th>patient</th>"
        + "".join(f"<th>{s}</th>" for s in steps)
        + "</tr>"
    )
    for pid in sorted(by_patient):
        parts.append(
            f"<tr><td>{html.escape(pid)}</td>"
            + "".join(f"<td>{by_patient[pid].get(s, '')}</td>" for s in steps)
            + "</tr>"
        )
    parts.append("</table><h2>Patients</h2>")
    for row in rows:
        pid = row["patient_id"]
        parts.append(f"<h3>{html.escape(pid)} ({html.escape(row.get('split', ''))})</h3>")
        for key in ("montage", "histograms"):
            if row.get(key):
                rel = os.path.relpath(row[key], path.parent)
                parts.append(f"<img src='{html.escape(rel)}' alt='{key} of {html.escape(pid)}'><br>")
    parts.append("</body></html>\n")
    return save_text("\n".join(parts), path)
