"""MONAI-style transforms: lesion-mask manipulation, intensity scaling and slice extraction."""

from medsynth.transforms.mask import (
    ManipulationNotPossibleError,
    MirrorLesion,
    MirrorLesiond,
    RandomLesionManipulation,
    RandomLesionManipulationd,
    RandomMirrorLesion,
    RandomMirrorLesiond,
    RandomResizeTumor,
    RandomResizeTumord,
    RandomTransplantLesion,
    RandomTransplantLesiond,
    ResizeTumor,
    ResizeTumord,
    TransplantLesion,
    TransplantLesiond,
    brain_midline,
    mirror_lesion,
    resize_tumor,
    transplant_lesion,
)
