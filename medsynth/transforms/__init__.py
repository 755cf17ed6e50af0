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
from medsynth.transforms.intensity import (
    DEFAULT_WINDOWS,
    ScaleToUnit,
    ScaleToUnitd,
    UnitToIntensity,
    UnitToIntensityd,
    scale_to_unit,
    unit_to_intensity,
    windows_for,
)
from medsynth.transforms.slices import (
    FitInPlane,
    FitInPlaned,
    axial_slice_stats,
    neighbour_slices,
    select_slices,
)
