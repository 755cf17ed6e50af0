"""The contact sheet of a synthetic cohort: one row per case, mask | sequences | confidence."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medsynth.constants import LESION_LABELS, SEQUENCE_TITLES
from medsynth.visualize.figures import save_grid

__all__ = ["contact_sheet"]


def contact_sheet(
    cohort_dir: str | os.PathLike, cases: Sequence[str], sequences: Sequence[str], path: str | os.PathLike
) -> Path:
    """Draw ``cases`` of a synthetic cohort (``cohort_dir/<case>/``), each at its axial slice with the
    most lesion: the label map, every sequence, and the mean confidence map when the case has one."""
    from monai.transforms import Compose

    from medsynth.transforms.volume import load_ras

    cohort_dir = Path(cohort_dir)
    confidence_keys = [f"confidence_{s}" for s in sequences]
    rows, overlays, titles = [], [], []
    has_confidence = False
    for case in cases:
        folder = cohort_dir / case
        files = {key: folder / f"{key}.nii.gz" for key in ("label", *sequences, *confidence_keys)}
        present = {key: str(p) for key, p in files.items() if p.is_file()}
        data = Compose(load_ras(list(present)))(present)
        label = np.asarray(data["label"][0])
        lesion_per_slice = np.isin(label, LESION_LABELS).sum(axis=(0, 1))
        z = int(np.argmax(lesion_per_slice))
        row = [np.asarray(data[sequences[0]][0])[..., z]]
        row += [np.asarray(data[s][0])[..., z] for s in sequences]
        overlay = [label[..., z]] + [None] * len(sequences)
        if all(key in data for key in confidence_keys):
            has_confidence = True
            row.append(np.mean([np.asarray(data[key][0])[..., z] for key in confidence_keys], axis=0))
            overlay.append(None)
        rows.append(row)
        overlays.append(overlay)
        titles.append(f"{case}\nslice {z}")
    columns = ["mask", *(SEQUENCE_TITLES.get(s, s) for s in sequences)]
    cmaps = ["gray"] * len(columns)
    ranges: list = [None] * len(columns)
    if has_confidence:
        columns.append("confidence (mean)")
        cmaps.append("viridis")
        ranges.append((0.0, 1.0))
    return save_grid(
        rows,
        path,
        row_titles=titles,
        col_titles=columns,
        cmaps=cmaps,
        vranges=ranges,
        overlays=overlays,
        title="synthetic cases",
    )
