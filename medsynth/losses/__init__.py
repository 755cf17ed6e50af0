"""Losses of SAMR / CG-SAMR: adversarial (LSGAN), feature matching, shape consistency, confidence map;
and the lesion segmenter's voxel-weighted Dice + cross-entropy (the study's confidence-weighted arm).

The papers' weights of the generator objective (CG-SAMR eq. 6) are in :data:`PAPER_LOSS_WEIGHTS`;
every loss also takes a ``weight`` argument (default 1) for callers that prefer to set it there.
"""

from medsynth.losses.adversarial import (
    AdversarialLoss,
    LeastSquaresAdversarialLoss,
    VanillaAdversarialLoss,
    predictions_of,
)
from medsynth.losses.confidence import ConfidenceMapLoss, half_scale
from medsynth.losses.feature_matching import FeatureMatchingLoss
from medsynth.losses.perceptual import VGGPerceptualLoss, vgg_perceptual_loss
from medsynth.losses.segmentation import VoxelWeightedDiceCELoss
from medsynth.losses.shape_consistency import ShapeConsistencyLoss

# lambda1 (feature matching), lambda2 (shape consistency), lambda3 (confidence map); the
# adversarial term has weight 1.
PAPER_LOSS_WEIGHTS: dict[str, float] = {
    "adversarial": 1.0,
    "feature_matching": 5.0,
    "shape_consistency": 1.0,
    "confidence": 1.0,
}

__all__ = [
    "PAPER_LOSS_WEIGHTS",
    "AdversarialLoss",
    "ConfidenceMapLoss",
    "FeatureMatchingLoss",
    "LeastSquaresAdversarialLoss",
    "ShapeConsistencyLoss",
    "VGGPerceptualLoss",
    "VanillaAdversarialLoss",
    "VoxelWeightedDiceCELoss",
    "half_scale",
    "predictions_of",
    "vgg_perceptual_loss",
]
