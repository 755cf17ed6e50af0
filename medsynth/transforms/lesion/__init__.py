"""Lesion-mask manipulations (mirror, resize the tumour, transplant), split the way MONAI splits a
transform family: :mod:`.functional` (pure functions), :mod:`.array` (array transforms, ``Rand*``
variants) and :mod:`.dictionary` (``*d`` wrappers)."""

from medsynth.transforms.lesion.array import (
    MANIPULATIONS,
    LesionManipulation,
    MirrorLesion,
    RandLesionManipulation,
    RandMirrorLesion,
    RandResizeTumor,
    RandTransplantLesion,
    ResizeTumor,
    TransplantLesion,
)
from medsynth.transforms.lesion.dictionary import (
    LesionManipulationd,
    MirrorLesiond,
    RandLesionManipulationd,
    RandMirrorLesiond,
    RandResizeTumord,
    RandTransplantLesiond,
    ResizeTumord,
    TransplantLesiond,
)
from medsynth.transforms.lesion.functional import (
    INFO_DEFAULTS,
    INFO_META_KEY,
    ManipulationNotPossibleError,
    brain_midline,
    mirror_lesion,
    resize_tumor,
    transplant_lesion,
)

__all__ = [
    "INFO_DEFAULTS",
    "INFO_META_KEY",
    "MANIPULATIONS",
    "LesionManipulation",
    "LesionManipulationd",
    "ManipulationNotPossibleError",
    "MirrorLesion",
    "MirrorLesiond",
    "RandLesionManipulation",
    "RandLesionManipulationd",
    "RandMirrorLesion",
    "RandMirrorLesiond",
    "RandResizeTumor",
    "RandResizeTumord",
    "RandTransplantLesion",
    "RandTransplantLesiond",
    "ResizeTumor",
    "ResizeTumord",
    "TransplantLesion",
    "TransplantLesiond",
    "brain_midline",
    "mirror_lesion",
    "resize_tumor",
    "transplant_lesion",
]
