"""Aggregation of an augmentation study: means over seeds and test patients with bootstrap intervals,
paired differences from the real-only arm with a paired test, the Table II layout, a plot, a page.

The input is the long table of every cell's per-patient rows (:func:`collect_cases`): one row per
arm, seed, test patient and class with Dice, HD95, sensitivity and specificity. Intervals resample
seeds and, within each drawn seed, test patients (both with replacement), so they carry the
training randomness and the test-set sampling; differences are paired on (seed, patient, class).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from medsynth.utils.io import atomic_path, save_text

__all__ = [
    "METRICS",
    "bootstrap_mean",
    "collect_cases",
    "paired_difference",
    "study_plot",
    "study_table",
    "write_report",
]

METRICS: tuple[str, ...] = ("Dice", "HD95", "Sensitivity", "Specificity")


def collect_cases(cells: Sequence[dict]) -> pd.DataFrame:
    """The per-patient rows of finished cells: each cell a dict with ``arm``, ``seed``, ``cases_csv`` and
    optionally ``method``, ``amount``."""
    frames = []
    for cell in cells:
        rows = pd.read_csv(cell["cases_csv"])
        rows = rows.assign(
            arm=cell["arm"],
            seed=int(cell["seed"]),
            method=cell.get("method") or "none",
            amount=cell.get("amount", 0.0),
        )
        frames.append(rows[["arm", "method", "amount", "seed", "patient_id", "class", *METRICS]])
    if not frames:
        raise ValueError("no finished cell to aggregate")
    return pd.concat(frames, ignore_index=True)


def _two_level_resample(values: pd.DataFrame, rng: np.random.Generator, draws: int) -> np.ndarray:
    """Bootstrap means of ``values`` (columns seed, patient_id, value): seeds, then patients, resampled."""
    by_seed = {seed: group["value"].to_numpy(dtype=float) for seed, group in values.groupby("seed")}
    seeds = list(by_seed)
    means = np.empty(draws)
    for k in range(draws):
        chosen = rng.choice(len(seeds), size=len(seeds), replace=True)
        parts = []
        for index in chosen:
            patient_values = by_seed[seeds[index]]
            parts.append(patient_values[rng.integers(0, len(patient_values), size=len(patient_values))])
        sample = np.concatenate(parts)
        means[k] = np.nanmean(sample) if np.isfinite(sample).any() else np.nan
    return means


def bootstrap_mean(
    values: pd.DataFrame, draws: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of ``values`` (seed, patient_id, value) with a percentile bootstrap interval."""
    finite = values[np.isfinite(values["value"].to_numpy(dtype=float))]
    if finite.empty:
        return float("nan"), float("nan"), float("nan")
    means = _two_level_resample(finite, np.random.default_rng(seed), draws)
    alpha = (1.0 - level) / 2.0
    return (
        float(finite["value"].mean()),
        float(np.nanquantile(means, alpha)),
        float(np.nanquantile(means, 1 - alpha)),
    )


def paired_difference(
    arm: pd.DataFrame, reference: pd.DataFrame, draws: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """The arm minus the reference, paired on (seed, patient_id): mean, bootstrap interval, and the
    two-sided p-value of the Wilcoxon signed-rank test (``nan`` with fewer than 2 pairs or all ties)."""
    pairs = arm.merge(reference, on=["seed", "patient_id"], suffixes=("", "_reference"))
    pairs = pairs.assign(value=pairs["value"] - pairs["value_reference"])
    pairs = pairs[np.isfinite(pairs["value"].to_numpy(dtype=float))]
    mean, low, high = bootstrap_mean(pairs[["seed", "patient_id", "value"]], draws, level, seed)
    p_value = float("nan")
    if len(pairs) >= 2 and np.any(pairs["value"].to_numpy() != 0):
        p_value = float(stats.wilcoxon(pairs["value"].to_numpy(dtype=float)).pvalue)
    return {"difference": mean, "low": low, "high": high, "p_value": p_value, "pairs": int(len(pairs))}


def study_table(
    cases: pd.DataFrame, reference_arm: str = "real", draws: int = 2000, level: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """One row per arm, class and metric: mean, interval, and the paired difference from ``reference_arm``."""
    rows = []
    for (arm, name), group in cases.groupby(["arm", "class"], sort=False):
        for metric in METRICS:
            values = group[["seed", "patient_id", metric]].rename(columns={metric: "value"})
            mean, low, high = bootstrap_mean(values, draws, level, seed)
            row = {
                "arm": arm,
                "method": group["method"].iloc[0],
                "amount": float(group["amount"].iloc[0]),
                "class": name,
                "metric": metric,
                "mean": mean,
                "low": low,
                "high": high,
                "seeds": int(group["seed"].nunique()),
                "patients": int(group["patient_id"].nunique()),
            }
            reference = cases[(cases["arm"] == reference_arm) & (cases["class"] == name)]
            if arm != reference_arm and not reference.empty:
                difference = paired_difference(
                    values,
                    reference[["seed", "patient_id", metric]].rename(columns={metric: "value"}),
                    draws,
                    level,
                    seed,
                )
                row.update({f"vs_{reference_arm}_{k}": v for k, v in difference.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, low: float, high: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def table2_layout(table: pd.DataFrame) -> pd.DataFrame:
    """The papers' Table II layout: arms as rows, (class, metric) as columns, "mean [low, high]"."""
    table = table.assign(
        text=[
            _cell(r["mean"], r["low"], r["high"], 1 if r["metric"] == "HD95" else 3)
            for _, r in table.iterrows()
        ]
    )
    wide = table.pivot_table(
        index="arm", columns=["class", "metric"], values="text", aggfunc="first", sort=False
    )
    return wide


def study_plot(table: pd.DataFrame, path: str | os.PathLike, metric: str = "Dice") -> Path:
    """Mean ``metric`` (over the classes) against the synthetic amount, one line per method, with the
    interval as bars; the real-only arm is the method ``none`` at amount 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table[table["metric"] == metric]
    summary = rows.groupby(["method", "amount"], sort=True)[["mean", "low", "high"]].mean().reset_index()
    figure, axis = plt.subplots(figsize=(6, 4))
    baseline = summary[summary["method"] == "none"]
    for method, group in summary.groupby("method"):
        if method == "none":
            continue
        group = pd.concat([baseline, group]).sort_values("amount")
        axis.errorbar(
            group["amount"], group["mean"],
            yerr=[group["mean"] - group["low"], group["high"] - group["mean"]],
            marker="o", capsize=4, label=method,
        )  # fmt: skip
    if not baseline.empty:
        axis.axhline(float(baseline["mean"].iloc[0]), color="grey", linestyle="--", label="real only")
    axis.set_xlabel("synthetic amount (papers' percent, or Qu's multiple)")
    axis.set_ylabel(f"mean {metric} over lesion classes (95 % CI)")
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return Path(path)


def write_report(
    table: pd.DataFrame, out_dir: str | os.PathLike, title: str, config: dict, versions: dict
) -> Path:
    """Write ``table2.csv``, ``table2.md``, ``study_table.csv`` (every number), ``dice_vs_amount.png``
    and ``index.html`` in ``out_dir``; returns the page."""
    import json

    out_dir = Path(out_dir)
    wide = table2_layout(table)
    save_text(wide.to_csv(), out_dir / "table2.csv")
    with atomic_path(out_dir / "study_table.csv") as tmp:
        table.to_csv(tmp, index=False)
    header = "| arm | " + " | ".join(f"{c} {m}" for c, m in wide.columns) + " |"
    lines = [header, "|---" * (len(wide.columns) + 1) + "|"]
    lines += [f"| {arm} | " + " | ".join(str(v) for v in row) + " |" for arm, row in wide.iterrows()]
    differences = [c for c in table.columns if c.endswith("_difference")]
    if differences:
        column = differences[0]
        prefix = column[: -len("difference")]
        lines += ["", f"Paired difference from the reference arm ({prefix.strip('_')}), Dice:", ""]
        lines += ["| arm | class | difference [95 % CI] | p (Wilcoxon) | pairs |", "|---|---|---|---|---|"]
        for _, r in table[(table["metric"] == "Dice") & table[column].notna()].iterrows():
            lines.append(
                f"| {r['arm']} | {r['class']} | "
                f"{_cell(r[column], r[prefix + 'low'], r[prefix + 'high'], 3)} | "
                f"{r[prefix + 'p_value']:.3g} | {int(r[prefix + 'pairs'])} |"
            )
    markdown = "\n".join(lines) + "\n"
    save_text(markdown, out_dir / "table2.md")
    study_plot(table, out_dir / "dice_vs_amount.png")
    record = json.dumps({"config": config, "versions": versions}, indent=2, default=str)
    save_text(
        record + "\n",
        out_dir / "study_config.json",
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Mean over seeds and test patients, 95 % bootstrap interval "
        "(seeds and patients resampled); differences paired on seed and patient.</p>"
        f"{wide.to_html(escape=True)}<h2>Dice against the synthetic amount</h2>"
        "<img src='dice_vs_amount.png' alt='Dice against amount'>"
        f"<h2>Every number</h2>{table.to_html(index=False, float_format=lambda v: f'{v:.4f}')}"
        f"<h2>Configuration and versions</h2><pre>{html.escape(record)}</pre>"
        "</body></html>"
    )
    return save_text(page, out_dir / "index.html")
