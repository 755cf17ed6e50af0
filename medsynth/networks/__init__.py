"""Networks: reusable blocks and parts, then one module per method family.

* :mod:`.blocks`: convolution blocks (encoders, residual blocks, up-sampling steps, output heads,
  guidance modules);
* :mod:`.parts`: generator parts (dual encoder, residual trunk, stretch-out and confidence-guided
  decoders) and the one-tensor inference wrapper;
* :mod:`.discriminators`: PatchGAN, multi-scale PatchGAN, label-wise ROI wrapper;
* :mod:`.samr`: the SAMR and CG-SAMR generators;
* :mod:`.pix2pix`: the pix2pix U-Net generator and PatchGAN, the pix2pixHD global generator (the
  papers' paired baselines);
* :mod:`.unpaired`: UCG-SAMR (CG-SAMR trained from unpaired masks and images) and CycleGAN's
  generator pair (and SynSeg-Net's, with its segmenter), UNIT's VAE-GAN pair;
* :mod:`.segmentation`: the lesion U-Net;
* :mod:`.qu`: Qu et al.'s MRI-from-noise networks (structural-map VAE, MASK generator, the
  modality-conditioned U-Net, the two-headed discriminator, the lesion segmenters).
"""

from medsynth.networks.blocks import (
    NORM_TYPES,
    ConvEncoder,
    GuidanceModule,
    OutputHead,
    ResidualBlock,
    UpsamplingStep,
)
from medsynth.networks.discriminators import (
    ConditionalDiscriminator,
    LabelWiseDiscriminator,
    LabelWiseMultiScaleDiscriminator,
    MultiScalePatchDiscriminator,
    PatchGANDiscriminator,
    roi_masks,
)
from medsynth.networks.parts import (
    ConfidenceGuidedDecoder,
    DualEncoder,
    ResidualTrunk,
    StretchOutDecoder,
    SynthesisInferenceNetwork,
)
from medsynth.networks.pix2pix import (
    Pix2PixGenerator,
    Pix2PixHDGenerator,
    ResnetTranslator,
    UNetSkipGenerator,
    pix2pix_patch_discriminator,
)
from medsynth.networks.qu import (
    CodeDiscriminator,
    LesionSegmenters,
    MaskGenerator,
    ModalityDiscriminator,
    ModalityUNet,
    StructureVAE,
)
from medsynth.networks.samr import CGSAMRGenerator, SAMRGenerator
from medsynth.networks.segmentation import make_lesion_unet
from medsynth.networks.unpaired import (
    CycleGANGenerators,
    SynSegNetGenerators,
    UCGSAMRGenerator,
    UNITGenerators,
    to_domain1,
)

__all__ = [
    "NORM_TYPES",
    "CodeDiscriminator",
    "LesionSegmenters",
    "MaskGenerator",
    "ModalityDiscriminator",
    "ModalityUNet",
    "StructureVAE",
    "CGSAMRGenerator",
    "ConditionalDiscriminator",
    "ConfidenceGuidedDecoder",
    "ConvEncoder",
    "CycleGANGenerators",
    "DualEncoder",
    "GuidanceModule",
    "LabelWiseDiscriminator",
    "LabelWiseMultiScaleDiscriminator",
    "MultiScalePatchDiscriminator",
    "OutputHead",
    "PatchGANDiscriminator",
    "Pix2PixGenerator",
    "Pix2PixHDGenerator",
    "ResidualBlock",
    "ResidualTrunk",
    "ResnetTranslator",
    "SAMRGenerator",
    "StretchOutDecoder",
    "SynSegNetGenerators",
    "SynthesisInferenceNetwork",
    "UCGSAMRGenerator",
    "UNITGenerators",
    "UNetSkipGenerator",
    "UpsamplingStep",
    "make_lesion_unet",
    "pix2pix_patch_discriminator",
    "roi_masks",
    "to_domain1",
]
