"""Synthesis inference as MONAI pieces: the cases (:mod:`.cases`), the pre- and post-transforms
(:mod:`.transforms`), the slice-stacking inferer (:mod:`.inferer`) and the network accelerator
(:mod:`.accelerate`). A bundle's ``inference.json`` runs them in a MONAI ``SupervisedEvaluator``."""

from medsynth.inference.accelerate import InferenceModule, optimize_for_inference
from medsynth.inference.cases import find_atlas_files, synthesis_cases, synthesis_inputs
from medsynth.inference.inferer import SliceStackInferer, random_slices
from medsynth.inference.transforms import (
    BrainMaskd,
    CheckSynthesisInputsd,
    OutputWindowsd,
    RealImageWindowsd,
    SaveSynthesisd,
    SplitConfidenced,
    synthesis_postprocessing,
    synthesis_preprocessing,
)

__all__ = [
    "BrainMaskd",
    "CheckSynthesisInputsd",
    "InferenceModule",
    "OutputWindowsd",
    "RealImageWindowsd",
    "SaveSynthesisd",
    "SplitConfidenced",
    "SliceStackInferer",
    "find_atlas_files",
    "optimize_for_inference",
    "random_slices",
    "synthesis_cases",
    "synthesis_inputs",
    "synthesis_postprocessing",
    "synthesis_preprocessing",
]
