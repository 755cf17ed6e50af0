"""Result tables in the layout of the papers: CSV for machines, Markdown for people.

One method: columns as in the metric's DataFrame (e.g. ``Edema | Cavity | Tumor | SSIM | PSNR``),
one row per sequence plus ``Avg.``. Several methods side by side (Table I of CG-SAMR): MultiIndex
columns ``(method, metric)``; the CSV then has two header rows and the Markdown a method-name header
line above a bold metric-name line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from medsynth.utils.io import save_text

__all__ = ["COLUMN_FORMATS", "comparison_table", "to_markdown", "write_comparison_table", "write_table"]

# Decimals as printed in the papers' tables.
COLUMN_FORMATS: dict[str, str] = {
    "Edema": "{:.1f}",
    "Cavity": "{:.1f}",
    "Tumor": "{:.1f}",
    "Lesion": "{:.1f}",
    "SSIM": "{:.3f}",
    "PSNR": "{:.1f}",
    "SSIM brain": "{:.3f}",
    "PSNR brain": "{:.1f}",
    "MAE brain": "{:.1f}",
    "Dice": "{:.3f}",
    "HD95": "{:.2f}",
    "Sensitivity": "{:.3f}",
    "Specificity": "{:.3f}",
    "Cases": "{:.0f}",
}
_DEFAULT_FORMAT = "{:.4g}"
MISSING = "n/a"


def _format(value: object, column: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            return MISSING
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return COLUMN_FORMATS.get(column, _DEFAULT_FORMAT).format(value)
    return str(value)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def comparison_table(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Put the tables of several methods side by side: MultiIndex columns ``(method, metric)``."""
    if not tables:
        raise ValueError("no table given")
    indices = [tuple(df.index) for df in tables.values()]
    if any(index != indices[0] for index in indices):
        raise ValueError(
            "the tables have different rows; evaluate every method on the same sequences/classes"
        )
    combined = pd.concat(dict(tables), axis=1)
    combined.index.name = next(iter(tables.values())).index.name
    combined.columns.names = ["Method", "Metric"]
    return combined


def to_markdown(df: pd.DataFrame, caption: str | None = None) -> str:
    """Markdown table with the papers' decimals; NaN shows as ``n/a``.

    Flat columns give one header line. ``(method, metric)`` columns give a header line with each
    method's name above its first metric, then a bold line with the metric names.
    """
    index_name = df.index.name or ""
    lines = [f"**{caption}**", ""] if caption else []
    two_level = isinstance(df.columns, pd.MultiIndex)
    if two_level:
        if df.columns.nlevels != 2:
            raise ValueError("only one or two column levels are supported")
        methods, previous = [], None
        for method, _ in df.columns:
            methods.append(str(method) if method != previous else "")
            previous = method
        metrics = [str(metric) for _, metric in df.columns]
        lines.append(_row([""] + methods))
        lines.append(_row(["---"] + ["---:"] * len(metrics)))
        lines.append(_row([f"**{index_name}**"] + [f"**{m}**" for m in metrics]))
    else:
        metrics = [str(c) for c in df.columns]
        lines.append(_row([index_name] + metrics))
        lines.append(_row(["---"] + ["---:"] * len(metrics)))
    for label, values in df.iterrows():
        lines.append(
            _row([str(label)] + [_format(v, m) for v, m in zip(values.tolist(), metrics, strict=True)])
        )
    return "\n".join(lines) + "\n"


def write_table(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    name: str,
    method: str | None = None,
    caption: str | None = None,
) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.csv`` and ``<name>.md`` atomically; returns both paths.

    Args:
        df: a table from ``SynthesisMetrics.aggregate()`` or ``SegmentationMetrics.aggregate()``
            (or a comparison table).
        out_dir: output folder (created if needed).
        name: file stem.
        method: put this method name above the columns, as in a comparison of one method.
        caption: bold line above the Markdown table.
    """
    if method is not None:
        return write_comparison_table({method: df}, out_dir, name, caption)
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    save_text(df.to_csv(na_rep="NaN"), csv_path)
    save_text(to_markdown(df, caption), md_path)
    return {"csv": csv_path, "markdown": md_path}


def write_comparison_table(
    tables: Mapping[str, pd.DataFrame],
    out_dir: str | os.PathLike,
    name: str,
    caption: str | None = None,
) -> dict[str, Path]:
    """Write several methods' tables side by side (Table I layout); read the CSV back with
    ``pd.read_csv(path, header=[0, 1], index_col=0)``."""
    return write_table(comparison_table(tables), out_dir, name, caption=caption)
