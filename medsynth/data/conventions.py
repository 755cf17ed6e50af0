"""Label conventions: what the values of a label map mean, declared rather than guessed.

The project's convention (``"medsynth"``, the papers'): 0 background, 1 normal brain, 2 edema,
3 cavity / necrosis, 4 tumour, the brain being every voxel above 0. Tumour segmentations of
challenges label the lesion only, so their 0 is both the background and the normal brain; they
are converted inside the brain (a brain mask, or the voxels where any sequence is non-zero):

* ``"brats"`` (BraTS 2018-2021 ``seg``): 1 necrosis / non-enhancing core, 2 edema, 4 enhancing tumour;
* ``"brats2023"`` (BraTS 2023 ``seg``): 1 necrosis, 2 edema, 3 enhancing tumour;
* a JSON file ``{"values": {"<source value>": <project label>, ...}, "outside_brain": 0}``
  (``outside_brain`` optional: when given, voxels outside the brain get it and ``values`` applies
  inside; otherwise ``values`` applies everywhere).

A label map declared in the project's convention that looks like a lesion-only segmentation is
refused (:func:`foreign_convention_problem`), with the convention it resembles.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsynth.constants import (
    BACKGROUND,
    BRATS2023_SEG_TO_LABEL,
    BRATS_SEG_TO_LABEL,
    LABEL_NAMES,
    NORMAL_BRAIN,
    NUM_LABELS,
)
from medsynth.utils.labels import integer_map_problem, unique_values

__all__ = [
    "LABEL_CONVENTIONS",
    "PROJECT_CONVENTION",
    "LabelConvention",
    "foreign_convention_problem",
    "label_convention",
    "to_project_labels",
]

PROJECT_CONVENTION = "medsynth"
# Below this share of normal brain among the labelled voxels a map is not in the project's convention.
MIN_NORMAL_BRAIN_SHARE = 0.5


@dataclass(frozen=True)
class LabelConvention:
    """How the values of a label map become the project's labels.

    Attributes:
        name: the convention's name (or its mapping file).
        values: source value -> project label; ``None`` for the project's own convention.
        outside_brain: the project label of voxels outside the brain, or ``None`` when ``values``
            applies everywhere.
    """

    name: str
    values: dict[int, int] | None = field(default=None)
    outside_brain: int | None = None


LABEL_CONVENTIONS: dict[str, LabelConvention] = {
    PROJECT_CONVENTION: LabelConvention(PROJECT_CONVENTION),
    "brats": LabelConvention("brats", dict(BRATS_SEG_TO_LABEL), BACKGROUND),
    "brats2023": LabelConvention("brats2023", dict(BRATS2023_SEG_TO_LABEL), BACKGROUND),
}


def label_convention(spec: str | os.PathLike | LabelConvention) -> LabelConvention:
    """The convention named ``spec`` (a key of :data:`LABEL_CONVENTIONS`) or read from a JSON mapping file.

    Raises:
        ValueError: unknown name, unreadable file, or a mapping to values outside the project's labels.
    """
    if isinstance(spec, LabelConvention):
        return spec
    text = str(spec).strip()
    if text in LABEL_CONVENTIONS:
        return LABEL_CONVENTIONS[text]
    path = Path(text)
    if not path.is_file():
        raise ValueError(
            f"unknown label convention {text!r}: use one of {sorted(LABEL_CONVENTIONS)} or a JSON mapping "
            f"file"
        )
    try:
        record = json.loads(path.read_text())
        values = {int(source): int(target) for source, target in record["values"].items()}
        outside = record.get("outside_brain")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f'label convention file {path}: {error} (expected {{"values": {{...}}}})') from error
    bad = sorted(
        {v for v in values.values() if not 0 <= v < NUM_LABELS} | ({outside} - {None, *range(NUM_LABELS)})
    )
    if bad:
        raise ValueError(f"label convention file {path}: maps to {bad}, outside the project's labels 0..4")
    return LabelConvention(str(path), values, None if outside is None else int(outside))


def to_project_labels(
    label: np.ndarray, convention: LabelConvention, brain: np.ndarray | None = None
) -> np.ndarray:
    """``label`` in the project's convention (uint8).

    Args:
        label: the label map as stored.
        convention: what its values mean (:func:`label_convention`).
        brain: boolean brain mask of the same shape; needed when the convention labels the lesion only.

    Raises:
        ValueError: values the convention does not define, or no brain mask where one is needed.
    """
    problem = integer_map_problem(label)
    if problem is not None:
        raise ValueError(f"label map {problem}")
    data = np.asarray(label).astype(np.int64)
    if convention.values is None:
        return np.asarray(data).astype(np.uint8)
    unknown = sorted(set(unique_values(np.asarray(data)).tolist()) - set(convention.values))
    if unknown:
        raise ValueError(
            f"label value(s) {unknown} are not defined by the {convention.name!r} convention "
            f"(it defines {sorted(convention.values)})"
        )
    lookup = np.zeros(max(convention.values) + 1, dtype=np.uint8)
    for source, target in convention.values.items():
        lookup[source] = target
    converted = lookup[data]
    if convention.outside_brain is not None:
        if brain is None:
            raise ValueError(
                f"the {convention.name!r} convention needs a brain mask (it labels the lesion only)"
            )
        converted = np.where(brain, converted, np.uint8(convention.outside_brain)).astype(np.uint8)
    return converted


def foreign_convention_problem(label: np.ndarray) -> str | None:
    """Why a label map declared in the project's convention looks like another one, or ``None``.

    In the project's convention normal brain (1) is most of the labelled voxels; in a tumour
    segmentation (BraTS) the labelled voxels are the lesion only and 1 is necrosis.
    """
    values = np.bincount(
        np.clip(np.asarray(label).reshape(-1).astype(np.int64), 0, None), minlength=NUM_LABELS
    )
    labelled = int(values[1:].sum())
    if labelled == 0 or values[NORMAL_BRAIN] >= MIN_NORMAL_BRAIN_SHARE * labelled:
        return None
    present = [int(v) for v in np.flatnonzero(values)]
    looks_like = "brats2023" if values[3] and not values[4] else "brats"
    share = 100.0 * values[NORMAL_BRAIN] / labelled
    convention = ", ".join(f"{value} {name.replace('_', ' ')}" for value, name in LABEL_NAMES.items())
    which = "BraTS 2023 seg" if looks_like == "brats2023" else "BraTS seg"
    return (
        f"does not look like this project's label convention ({convention}): normal brain (1) is only "
        f"{share:.0f} % of the labelled voxels, values {present}. It looks like a lesion-only segmentation "
        f"such as {which} (label_convention {looks_like!r}); declare its label convention (a CSV column "
        "label_convention, or the label_convention setting) instead of reading it as the project's"
    )
