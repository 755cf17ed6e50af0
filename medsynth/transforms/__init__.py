"""MONAI-style transforms: lesion-mask manipulation, intensity scaling and slice extraction."""

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
from medsynth.transforms.lesion import (
    MANIPULATIONS,
    LesionManipulation,
    LesionManipulationd,
    ManipulationNotPossibleError,
    MirrorLesion,
    MirrorLesiond,
    RandLesionManipulation,
    RandLesionManipulationd,
    RandMirrorLesion,
    RandMirrorLesiond,
    RandResizeTumor,
    RandResizeTumord,
    RandTransplantLesion,
    RandTransplantLesiond,
    ResizeTumor,
    ResizeTumord,
    TransplantLesion,
    TransplantLesiond,
    brain_midline,
    mirror_lesion,
    resize_tumor,
    transplant_lesion,
)
from medsynth.transforms.slices import (
    FitInPlane,
    FitInPlaned,
    axial_slice_stats,
    neighbour_slices,
    select_slices,
)
from medsynth.transforms.structure import (
    BrainAreaMask,
    BrainAreaMaskd,
    StructuralFeatureMap,
    StructuralFeatureMapd,
    StructuralMapFilter,
)
from medsynth.transforms.tissue import TissueMapsForLabel, TissueMapsForLabeld, stacked_tissue_maps
