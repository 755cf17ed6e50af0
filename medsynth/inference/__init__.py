"""Volume synthesis with trained SAMR / CG-SAMR networks."""

from medsynth.inference.accelerate import InferenceModule, optimize_for_inference
from medsynth.inference.synthesis import one_hot_labels, stack_atlas, synthesize_volume
from medsynth.inference.workflow import MANIPULATIONS, SynthesisInference, find_atlas_files, make_manipulation, resolve_inputs

__all__ = [
    "InferenceModule",
    "optimize_for_inference",
    "MANIPULATIONS",
    "SynthesisInference",
    "find_atlas_files",
    "make_manipulation",
    "one_hot_labels",
    "resolve_inputs",
    "stack_atlas",
    "synthesize_volume",
]
