"""SAMR / CG-SAMR generators, label-wise multi-scale discriminators and the lesion U-Net."""

from medsynth.networks.blocks import (
    NORM_TYPES,
    ConvEncoder,
    GuidanceModule,
    OutputHead,
    ResidualBlock,
    UpsamplingStep,
)
from medsynth.networks.discriminators import (
    LabelWiseMultiScaleDiscriminator,
    PatchGANDiscriminator,
    roi_masks,
)
from medsynth.networks.generators import CGSAMRGenerator, SAMRGenerator, SynthesisInferenceNetwork
from medsynth.networks.segmentation import make_lesion_unet

__all__ = [
    "NORM_TYPES",
    "CGSAMRGenerator",
    "ConvEncoder",
    "GuidanceModule",
    "LabelWiseMultiScaleDiscriminator",
    "OutputHead",
    "PatchGANDiscriminator",
    "ResidualBlock",
    "SAMRGenerator",
    "SynthesisInferenceNetwork",
    "UpsamplingStep",
    "make_lesion_unet",
    "roi_masks",
]
