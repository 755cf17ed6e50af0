"""The one check of a label map: finite, integer-valued and holding only the allowed values.

Used by the cohort validation, the lesion-mask transforms, inference and the preprocessing, so a
label map is accepted or refused in the same words everywhere.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from medsynth.constants import LABEL_NAMES, NUM_LABELS

__all__ = ["VALID_LABELS", "checked_label_map", "integer_map_problem", "label_map_problem", "unique_values"]

VALID_LABELS: tuple[int, ...] = tuple(range(NUM_LABELS))
_CONVENTION = ", ".join(f"{value} {name.replace('_', ' ')}" for value, name in LABEL_NAMES.items())


def unique_values(data: np.ndarray) -> np.ndarray:
    """Sorted distinct values; a counting pass for small non-negative integers (label maps), else a sort."""
    if np.issubdtype(data.dtype, np.integer) and data.size:
        low, high = int(data.min()), int(data.max())
        if low >= 0 and high < 65536:
            return np.flatnonzero(np.bincount(data.reshape(-1), minlength=high + 1))
    return np.unique(data)


def integer_map_problem(data: np.ndarray) -> str | None:
    """Why ``data`` is not made of whole numbers (empty, NaN/inf, fractions: a label map that was
    interpolated or stored as float), or ``None``. Label maps are refused, never rounded."""
    data = np.asarray(data)
    if data.size == 0:
        return "is empty"
    if data.dtype != bool and not np.issubdtype(data.dtype, np.integer):
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            return f"contains {bad} NaN/inf value(s)"
        values = unique_values(data)
        non_integer = values[values != np.round(values)]
        if non_integer.size:
            return (
                f"has non-integer values {non_integer[:5].tolist()} (an interpolated or resampled label "
                "map? labels are refused, never rounded: resample label maps with nearest neighbour)"
            )
    return None


def label_map_problem(data: np.ndarray, allowed: Collection[int] = VALID_LABELS) -> str | None:
    """Why ``data`` is not a label map with values in ``allowed`` (a phrase that follows the map's name,
    e.g. ``"has unknown label value(s) [7] (...)"``), or ``None`` when it is one."""
    data = np.asarray(data)
    problem = integer_map_problem(data)
    if problem is not None:
        return problem
    values = unique_values(data)
    unknown = sorted(set(values.astype(np.int64).tolist()) - {int(v) for v in allowed})
    if unknown:
        if tuple(allowed) == VALID_LABELS:
            expected = f"allowed: {list(VALID_LABELS)}: {_CONVENTION}"
        else:
            expected = f"allowed: {min(allowed)}..{max(allowed)}"
        return f"has unknown label value(s) {unknown[:10]} ({expected})"
    return None


def checked_label_map(
    data: np.ndarray, name: str = "label map", allowed: Collection[int] = VALID_LABELS
) -> np.ndarray:
    """``data`` as an int16 array after :func:`label_map_problem` found nothing; raises ``ValueError`` naming
    ``name``."""
    problem = label_map_problem(data, allowed)
    if problem is not None:
        raise ValueError(f"{name} {problem}")
    return np.asarray(data).astype(np.int16)
