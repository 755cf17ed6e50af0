"""Loss terms of Qu et al. (papers 003/004) that are more than a mean squared error.

Every term of the papers is a squared L2 norm; the reduction is a mean over elements here (the
papers do not say), so that the terms' scales do not depend on the image size. The adversarial
terms are the least-squares (LSGAN) forms the papers write: ``||D(real) - 1||^2 + ||D(fake)||^2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["code_distribution_loss", "least_squares", "modality_class_loss", "soft_label_loss"]


def least_squares(prediction: torch.Tensor, target: float) -> torch.Tensor:
    """``mean((prediction - target) ** 2)``: the LSGAN term, ``target`` 1 for real and 0 for fake."""
    return torch.mean((prediction.float() - target) ** 2)


def code_distribution_loss(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """``loss_normal`` (paper 003, Sec. 2.3): the code's average mean towards 0 and its average standard
    deviation towards 1, ``mean(mu)^2 + (mean(exp(0.5 * log_var)) - 1)^2`` (it replaces the VAE's KL
    term, with the code discriminator)."""
    return torch.mean(mean.float()) ** 2 + (torch.mean(torch.exp(0.5 * log_variance.float())) - 1.0) ** 2


def modality_class_loss(logits: torch.Tensor, modality: int) -> torch.Tensor:
    """The category term ``||c - i||^2``: the modality head's outputs towards the one-hot of ``modality``."""
    target = F.one_hot(torch.full((logits.shape[0],), modality, device=logits.device), logits.shape[1])
    return torch.mean((logits.float() - target.float()) ** 2)


def soft_label_loss(logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """The lesion terms' L2 between the label probabilities (softmax of ``logits``) and a one-hot label."""
    return torch.mean((torch.softmax(logits.float(), dim=1) - onehot.float()) ** 2)
