"""Synthetic cohorts: manipulated lesion masks turned into gated, labelled cases with provenance.

:mod:`.manipulation` draws and applies the lesion manipulation of a candidate, :mod:`.masks` checks
that the new mask is plausible, :mod:`.gates` checks the synthesised images, :mod:`.augment` runs
the whole (``medsynth augment``, a bundle's ``augment.json``) and :mod:`.export` writes nnU-Net and
BraTS layouts.
"""

from medsynth.synthetic.augment import SyntheticCohortBuilder, confidence_column, training_sources
from medsynth.synthetic.export import export_brats, export_nnunet, to_brats_seg
from medsynth.synthetic.gates import (
    GateResult,
    IntensityGate,
    MemorisationGate,
    SegmentationConsistencyGate,
    TrainingSliceBank,
    lesion_dice,
)
from medsynth.synthetic.manipulation import ManipulationPlan, apply_plan, draw_plan, left_right_axis
from medsynth.synthetic.masks import (
    MASK_REJECTION_REASONS,
    LesionMaskPlausibility,
    LesionMaskPlausibilityd,
    LesionVolumeRange,
    MaskVerdict,
)

__all__ = [
    "MASK_REJECTION_REASONS",
    "GateResult",
    "IntensityGate",
    "LesionMaskPlausibility",
    "LesionMaskPlausibilityd",
    "LesionVolumeRange",
    "ManipulationPlan",
    "MaskVerdict",
    "MemorisationGate",
    "SegmentationConsistencyGate",
    "SyntheticCohortBuilder",
    "TrainingSliceBank",
    "apply_plan",
    "confidence_column",
    "draw_plan",
    "export_brats",
    "export_nnunet",
    "left_right_axis",
    "lesion_dice",
    "to_brats_seg",
    "training_sources",
]
