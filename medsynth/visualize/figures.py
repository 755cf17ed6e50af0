"""Image grids for people: QC montages, sample sheets, lesion overlays.

Every panel is a 2D array indexed ``[x, y]`` as it comes out of a volume in RAS orientation
(``volume[:, :, k]`` is an axial slice). :func:`save_grid` turns it so that the figure reads like
radiology: anterior at the top and the patient's right on the viewer's left.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np

from medsynth.utils.io import atomic_path

# Label colours of the SAMR / CG-SAMR figures: normal brain grey, edema green, cavity blue, tumour yellow.
LABEL_COLORS: dict[int, tuple[float, float, float]] = {
    0: (0.0, 0.0, 0.0),
    1: (0.6, 0.6, 0.6),
    2: (0.0, 0.8, 0.0),
    3: (0.1, 0.3, 1.0),
    4: (1.0, 0.9, 0.0),
}

ORIENTATIONS = ("radiological", "neurological", "none")


def label_to_rgb(label_map: np.ndarray) -> np.ndarray:
    """Colour an integer label map with :data:`LABEL_COLORS`; returns float RGB in ``[0, 1]``, ``(..., 3)``.

    Raises:
        ValueError: the map holds a label without a colour.
    """
    labels = np.asarray(label_map)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError("label map must hold integer values")
        labels = labels.astype(np.int64)
    unknown = sorted(set(np.unique(labels).tolist()) - set(LABEL_COLORS))
    if unknown:
        raise ValueError(
            f"label map holds label(s) {unknown} without a colour; known: {sorted(LABEL_COLORS)}"
        )
    lookup = np.zeros((max(LABEL_COLORS) + 1, 3), dtype=np.float32)
    for value, colour in LABEL_COLORS.items():
        lookup[value] = colour
    return lookup[labels]


def orient_for_display(panel: np.ndarray, orientation: str = "radiological") -> np.ndarray:
    """Turn a ``[x, y]`` slice of a RAS volume into display rows/columns (anterior up).

    ``radiological`` puts the patient's right on the viewer's left, ``neurological`` on the right,
    ``none`` leaves the array as it is (row 0 at the top).
    """
    array = np.asarray(panel)
    if orientation == "none":
        return array
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; choose one of {ORIENTATIONS}")
    # Rows run from anterior (largest y) down; columns from the right (largest x) for radiology.
    turned = array[:, ::-1].T
    return turned[:, ::-1] if orientation == "radiological" else turned


def _per_column(value: Any, num_cols: int, name: str, is_single) -> list:
    if is_single(value):
        return [value] * num_cols
    values = list(value)
    if len(values) != num_cols:
        raise ValueError(f"{name} must be one value or one per column ({num_cols}), got {len(values)}")
    return values


def _grid(panels: Any, name: str) -> list[list]:
    rows = [list(row) for row in panels]
    if not rows or not any(rows):
        raise ValueError(f"{name} is empty: give rows x columns of 2D arrays")
    return rows


def _same_grid(grid: Any, rows: int, cols: int, name: str) -> list[list] | None:
    if grid is None:
        return None
    cells = _grid(grid, name)
    if len(cells) != rows or any(len(row) != cols for row in cells):
        raise ValueError(f"{name} must have the same {rows} x {cols} layout as panels")
    return cells


def _percentile_range(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [1, 99])
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def save_grid(
    panels: Sequence[Sequence[np.ndarray | None]],
    path: str | os.PathLike,
    *,
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    cmaps: str | Sequence[str] = "gray",
    vranges: tuple[float, float] | None | Sequence[tuple[float, float] | None] = None,
    overlays: Sequence[Sequence[np.ndarray | None]] | None = None,
    contours: Sequence[Sequence[np.ndarray | None]] | None = None,
    title: str | None = None,
    panel_size: float = 2.0,
    dpi: int = 100,
    orientation: str = "radiological",
    overlay_alpha: float = 0.4,
    contour_color: str = "red",
) -> Path:
    """Draw a rows x columns grid of 2D images and write it as a PNG atomically.

    Args:
        panels: rows of 2D arrays indexed ``[x, y]`` (an axial slice of a RAS volume); ``None`` leaves
            a cell empty. Rows may be shorter than the longest one.
        path: output PNG.
        row_titles: one label per row, written left of the row.
        col_titles: one title per column, written above the first row.
        cmaps: one matplotlib colormap (name or object), or one per column.
        vranges: one ``(vmin, vmax)``, or one per column; ``None`` (or a ``None`` bound) means the panel's
            1st (99th) percentile.
        overlays: same grid of integer label maps, drawn translucent in :data:`LABEL_COLORS`
            (label 0 transparent).
        contours: same grid of binary masks, drawn as an outline.
        title: figure title.
        panel_size: inches per panel.
        dpi: resolution of the PNG.
        orientation: ``radiological`` (default), ``neurological`` or ``none`` (see
        :func:`orient_for_display`).
        overlay_alpha: opacity of the label overlays.
        contour_color: colour of the mask outlines (matplotlib colour name).

    Panels of different sizes are scaled to a common cell size (nearest neighbour, aspect kept).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    grid = _grid(panels, "panels")
    num_rows, num_cols = len(grid), max(len(row) for row in grid)
    grid = [row + [None] * (num_cols - len(row)) for row in grid]
    overlay_grid = _same_grid(
        None if overlays is None else [list(r) + [None] * (num_cols - len(r)) for r in overlays],
        num_rows,
        num_cols,
        "overlays",
    )
    contour_grid = _same_grid(
        None if contours is None else [list(r) + [None] * (num_cols - len(r)) for r in contours],
        num_rows,
        num_cols,
        "contours",
    )
    column_cmaps = _per_column(
        cmaps, num_cols, "cmaps", lambda v: isinstance(v, (str, matplotlib.colors.Colormap))
    )
    column_ranges = _per_column(
        vranges,
        num_cols,
        "vranges",
        lambda v: v is None or (len(v) == 2 and all(isinstance(x, (int, float, np.number)) for x in v)),
    )
    if row_titles is not None and len(row_titles) != num_rows:
        raise ValueError(f"row_titles must have {num_rows} entries, got {len(row_titles)}")
    if col_titles is not None and len(col_titles) != num_cols:
        raise ValueError(f"col_titles must have {num_cols} entries, got {len(col_titles)}")

    # Compose the whole grid as one RGB raster and draw it on a single axes: one matplotlib axes per
    # panel costs ~50 ms each, which dominated per-patient montages.
    rasters: list[list[np.ndarray | None]] = [[None] * num_cols for _ in range(num_rows)]
    for r in range(num_rows):
        for c in range(num_cols):
            panel = grid[r][c]
            if panel is None:
                continue
            image = np.asarray(panel, dtype=np.float32)
            if image.ndim != 2:
                raise ValueError(f"panel ({r}, {c}) must be 2D, got shape {image.shape}")
            vrange = column_ranges[c]
            low, high = _percentile_range(image)
            vmin = low if vrange is None or vrange[0] is None else float(vrange[0])
            vmax = high if vrange is None or vrange[1] is None else float(vrange[1])
            scaled = np.clip((np.nan_to_num(image, nan=vmin) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
            rgb = plt.get_cmap(column_cmaps[c])(orient_for_display(scaled, orientation))[..., :3]
            if overlay_grid is not None and overlay_grid[r][c] is not None:
                labels = np.asarray(overlay_grid[r][c])
                if labels.shape != image.shape:
                    raise ValueError(f"overlay ({r}, {c}) has shape {labels.shape}, its panel {image.shape}")
                colours = label_to_rgb(orient_for_display(labels, orientation))
                alpha = np.where(orient_for_display(labels, orientation) > 0, overlay_alpha, 0.0)[..., None]
                rgb = (1.0 - alpha) * rgb + alpha * colours
            mask = None
            if contour_grid is not None and contour_grid[r][c] is not None:
                mask = np.asarray(contour_grid[r][c]) > 0
                if mask.shape != image.shape:
                    raise ValueError(
                        f"contour mask ({r}, {c}) has shape {mask.shape}, its panel {image.shape}"
                    )
                mask = orient_for_display(mask, orientation)
            rasters[r][c] = (rgb, mask)
    present = [cell for row in rasters for cell in row if cell is not None]
    cell_h = max(cell[0].shape[0] for cell in present) if present else 1
    cell_w = max(cell[0].shape[1] for cell in present) if present else 1
    # Upsample small panels so an outline stays thin relative to the panel.
    zoom = max(1, int(np.ceil(256 / max(cell_h, cell_w))))
    cell_h, cell_w = cell_h * zoom, cell_w * zoom
    gap = max(2, cell_w // 64)
    mosaic = np.zeros((num_rows * cell_h + (num_rows - 1) * gap, num_cols * cell_w + (num_cols - 1) * gap, 3))
    edge_rgb = np.asarray(matplotlib.colors.to_rgb(contour_color))
    for r in range(num_rows):
        for c in range(num_cols):
            if rasters[r][c] is None:
                continue
            rgb, mask = rasters[r][c]
            rgb, mask = _fit(rgb, mask, cell_h, cell_w)
            if mask is not None:
                rgb[_outline(mask)] = edge_rgb
            top, left = r * (cell_h + gap), c * (cell_w + gap)
            mosaic[top : top + cell_h, left : left + cell_w] = rgb

    left_margin = 0.3 if row_titles is not None else 0.05
    top_margin = (0.3 if col_titles is not None else 0.05) + (0.35 if title else 0.0)
    grid_width = panel_size * num_cols
    grid_height = grid_width * mosaic.shape[0] / mosaic.shape[1]
    fig_w, fig_h = grid_width + left_margin + 0.05, grid_height + top_margin + 0.05
    figure = plt.figure(figsize=(fig_w, fig_h), facecolor="black")
    try:
        axis = figure.add_axes((left_margin / fig_w, 0.05 / fig_h, grid_width / fig_w, grid_height / fig_h))
        axis.imshow(mosaic, interpolation="antialiased", aspect="auto")
        axis.set_axis_off()
        step_x = (cell_w + gap) / mosaic.shape[1] * grid_width
        step_y = (cell_h + gap) / mosaic.shape[0] * grid_height
        if col_titles is not None:
            for c, text in enumerate(col_titles):
                x = (left_margin + (c + 0.5) * step_x - gap / mosaic.shape[1] * grid_width / 2) / fig_w
                y = (0.05 + grid_height + 0.05) / fig_h
                figure.text(x, y, str(text), color="white", fontsize=9, ha="center", va="bottom")
        if row_titles is not None:
            for r, text in enumerate(row_titles):
                y = (
                    0.05 + grid_height - (r + 0.5) * step_y + gap / mosaic.shape[0] * grid_height / 2
                ) / fig_h
                figure.text(
                    0.5 * left_margin / fig_w,
                    y,
                    str(text),
                    color="white",
                    fontsize=9,
                    ha="center",
                    va="center",
                    rotation=90,
                )
        if title:
            figure.text(0.5, 1.0 - 0.05 / fig_h, title, color="white", fontsize=10, ha="center", va="top")
        path = Path(path)
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=dpi, facecolor=figure.get_facecolor(), format="png")
    finally:
        plt.close(figure)
    return path


def _fit(rgb: np.ndarray, mask: np.ndarray | None, height: int, width: int):
    """Scale a panel (nearest neighbour, aspect kept) to fit ``height`` x ``width`` and centre it there."""
    h, w = rgb.shape[:2]
    scale = min(height / h, width / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    rows = np.minimum((np.arange(new_h) / scale).astype(int), h - 1)
    cols = np.minimum((np.arange(new_w) / scale).astype(int), w - 1)
    canvas = np.zeros((height, width, 3))
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = rgb[rows][:, cols]
    fitted_mask = None
    if mask is not None:
        fitted_mask = np.zeros((height, width), dtype=bool)
        fitted_mask[top : top + new_h, left : left + new_w] = mask[rows][:, cols]
    return canvas, fitted_mask


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` that touch a pixel outside it (4-neighbourhood)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner
