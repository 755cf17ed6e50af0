"""The seeded random lesion manipulation of one synthetic candidate: which operations, which parameters.

A :class:`ManipulationPlan` is drawn from a generator (:func:`draw_plan`) and then carried out on a
label map (:func:`apply_plan`) with the functions of :mod:`medsynth.transforms.lesion`, in the
papers' order: transplant another training patient's lesion, mirror it across the midline, resize
the tumour. The plan records what was requested; :func:`apply_plan` returns what was achieved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medsynth.transforms.lesion import mirror_lesion, resize_tumor, transplant_lesion

__all__ = ["ManipulationPlan", "apply_plan", "draw_plan", "left_right_axis"]


@dataclass
class ManipulationPlan:
    """What to do to the source mask: ``donor`` (a training patient) for a transplant, ``mirror``,
    and ``resize_percent`` of the tumour (``None``: no resize)."""

    donor: str | None = None
    mirror: bool = False
    resize_percent: float | None = None

    @property
    def operations(self) -> list[str]:
        ops = ["transplant"] if self.donor else []
        ops += ["mirror"] if self.mirror else []
        if self.resize_percent is not None:
            ops.append("grow" if self.resize_percent >= 0 else "shrink")
        return ops

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "operations": self.operations}


def draw_plan(
    rng: np.random.Generator,
    donors: Sequence[str],
    mirror_prob: float = 0.5,
    resize_prob: float = 0.5,
    resize_percent_range: Sequence[float] = (-50.0, 100.0),
    transplant_prob: float = 0.3,
) -> ManipulationPlan:
    """Draw each operation with its probability; when none was drawn, one of them is, uniformly, so
    that a candidate is never its source's mask unchanged.

    Args:
        rng: the candidate's generator.
        donors: the training patients that may give their lesion (the source excluded).
        mirror_prob, resize_prob, transplant_prob: probability of each operation.
        resize_percent_range: ``(low, high)`` of the uniformly drawn tumour change in percent.
    """
    low, high = (float(v) for v in resize_percent_range)

    def percent() -> float:
        return round(float(rng.uniform(low, high)), 1)

    plan = ManipulationPlan()
    if donors and rng.random() < transplant_prob:
        plan.donor = str(donors[int(rng.integers(len(donors)))])
    plan.mirror = bool(rng.random() < mirror_prob)
    if rng.random() < resize_prob:
        plan.resize_percent = percent()
    if not plan.operations:
        choices = ["mirror", "resize", *(["transplant"] if donors else [])]
        choice = choices[int(rng.integers(len(choices)))]
        if choice == "mirror":
            plan.mirror = True
        elif choice == "resize":
            plan.resize_percent = percent()
        else:
            plan.donor = str(donors[int(rng.integers(len(donors)))])
    return plan


def left_right_axis(affine: np.ndarray) -> int:
    """The voxel axis of a NIfTI affine that runs left-right (the mirror axis)."""
    import nibabel as nib

    codes = nib.aff2axcodes(np.asarray(affine))
    return next(axis for axis, code in enumerate(codes) if code in ("L", "R"))


def apply_plan(
    plan: ManipulationPlan,
    label: np.ndarray,
    brain: np.ndarray,
    axis: int,
    load_donor: Callable[[str], np.ndarray] | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Carry out ``plan`` on a spatial label map; returns the new map and one info dict per operation
    (requested and achieved values, :data:`medsynth.transforms.lesion.INFO_DEFAULTS`).

    Raises:
        ManipulationNotPossibleError: an operation cannot be done on this map (no tumour to resize ...).
    """
    infos = []
    if plan.donor:
        if load_donor is None:
            raise ValueError("a transplant plan needs load_donor")
        label, info = transplant_lesion(label, brain, load_donor(plan.donor))
        infos.append({**info, "donor": plan.donor})
    if plan.mirror:
        label, info = mirror_lesion(label, brain, axis=axis)
        infos.append(info)
    if plan.resize_percent is not None:
        label, info = resize_tumor(label, brain, plan.resize_percent)
        infos.append(info)
    return label, infos
