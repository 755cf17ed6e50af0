"""SAMR / CG-SAMR losses against known answers, and gradient flow through a full generator step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medsynth.constants import NUM_LABELS
from medsynth.losses import (
    PAPER_LOSS_WEIGHTS,
    ConfidenceMapLoss,
    FeatureMatchingLoss,
    LeastSquaresAdversarialLoss,
    ShapeConsistencyLoss,
    half_scale,
)
from medsynth.networks import CGSAMRGenerator, LabelWiseMultiScaleDiscriminator, make_lesion_unet


def constant_outputs(values: list[float], shapes: list[tuple[int, ...]]) -> list[list[torch.Tensor]]:
    """Fake discriminator outputs: one list per discriminator, last entry the prediction."""
    return [
        [torch.randn(2, 3, 4, 4), torch.full(shape, value)]
        for value, shape in zip(values, shapes, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# LSGAN


def test_lsgan_on_constant_predictions():
    loss = LeastSquaresAdversarialLoss()
    shapes = [(2, 1, 7, 7), (2, 1, 5, 5), (2, 1, 7, 7)]
    fake = constant_outputs([0.2, -0.5, 1.5], shapes)
    real = constant_outputs([0.9, 0.4, 1.0], shapes)
    expected_generator = (0.2 - 1) ** 2 + (-0.5 - 1) ** 2 + (1.5 - 1) ** 2
    assert loss.generator_loss(fake).item() == pytest.approx(expected_generator)
    expected_real = (0.9 - 1) ** 2 + (0.4 - 1) ** 2 + 0.0
    expected_fake = 0.2**2 + 0.5**2 + 1.5**2
    assert loss.discriminator_loss(real, fake).item() == pytest.approx(0.5 * (expected_real + expected_fake))
    # Plain prediction tensors are accepted as well.
    assert loss([out[-1] for out in fake], target_is_real=False).item() == pytest.approx(expected_fake)


def test_lsgan_on_varying_predictions_is_mean_squared_error():
    torch.manual_seed(0)
    predictions = [torch.randn(2, 1, 6, 6), torch.randn(2, 1, 3, 3)]
    expected = sum(((p - 1) ** 2).mean() for p in predictions)
    torch.testing.assert_close(LeastSquaresAdversarialLoss()(predictions, target_is_real=True), expected)


# ---------------------------------------------------------------------------------------------
# Feature matching


def features(seed: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, 4, 8, 8), (2, 8, 4, 4), (2, 1, 3, 3)]
    return [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(2)]


def test_feature_matching_is_zero_for_identical_features():
    real = features(0)
    fake = [[t.clone() for t in out] for out in real]
    assert FeatureMatchingLoss()(fake, real).item() == 0.0
    assert FeatureMatchingLoss(criterion="l2")(fake, real).item() == 0.0


def test_feature_matching_known_value_ignores_predictions():
    real = features(0)
    offsets = [[0.5, -2.0, 100.0], [1.0, 0.25, -100.0]]  # last layer (prediction) must not count
    fake = [[t + d for t, d in zip(out, ds, strict=True)] for out, ds in zip(real, offsets, strict=True)]
    l1 = FeatureMatchingLoss(criterion="l1", weight=5.0)(fake, real)
    assert l1.item() == pytest.approx(5.0 * (0.5 + 2.0 + 1.0 + 0.25), rel=1e-5)
    l2 = FeatureMatchingLoss(criterion="l2")(fake, real)
    assert l2.item() == pytest.approx(0.25 + 4.0 + 1.0 + 0.0625, rel=1e-5)


def test_feature_matching_detaches_real_features():
    real = [[t.requires_grad_() for t in out] for out in features(0)]
    fake = [[t.requires_grad_() for t in out] for out in features(1)]
    FeatureMatchingLoss()(fake, real).backward()
    assert all(t.grad is None for out in real for t in out)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for out in fake for t in out[:-1])


def test_feature_matching_rejects_mismatched_outputs():
    with pytest.raises(ValueError, match="same, non-zero number"):
        FeatureMatchingLoss()(features(0), features(1)[:1])
    with pytest.raises(ValueError, match="unknown criterion"):
        FeatureMatchingLoss(criterion="l3")


# ---------------------------------------------------------------------------------------------
# Shape consistency (Dice of eq. 4)


def hand_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 4 per class over all pixels of the batch, averaged over the classes."""
    probabilities = logits.softmax(dim=1)
    losses = []
    for c in range(logits.shape[1]):
        r, s = target[:, c].flatten(), probabilities[:, c].flatten()
        losses.append(1 - 2 * (r * s).sum() / (r.sum() + s.sum()))
    return torch.stack(losses).mean()


def small_segmentation_example():
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, NUM_LABELS, (2, 1, 6, 6), generator=generator)
    target = F.one_hot(labels[:, 0], NUM_LABELS).permute(0, 3, 1, 2).float()
    real_logits = torch.randn(2, NUM_LABELS, 6, 6, generator=generator) * 2
    fake_logits = torch.randn(2, NUM_LABELS, 6, 6, generator=generator) * 2
    return labels, target, real_logits, fake_logits


def test_shape_consistency_equals_equation_4_by_hand():
    labels, target, real_logits, fake_logits = small_segmentation_example()
    expected = hand_dice_loss(real_logits, target) + hand_dice_loss(fake_logits, target)
    exact = ShapeConsistencyLoss(smooth_nr=0.0, smooth_dr=0.0)
    torch.testing.assert_close(exact(real_logits, fake_logits, target), expected)
    torch.testing.assert_close(exact(real_logits, fake_logits, labels), expected)  # label map target
    smoothed = ShapeConsistencyLoss()(real_logits, fake_logits, target)
    assert smoothed.item() == pytest.approx(expected.item(), abs=1e-5)
    perfect = target * 50.0
    assert ShapeConsistencyLoss()(perfect, perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_generalized_option_uses_sudre_class_weights():
    _, target, real_logits, fake_logits = small_segmentation_example()

    def sudre(logits):
        p = logits.softmax(dim=1)
        r_sum = target.sum(dim=(0, 2, 3))
        w = 1 / r_sum**2
        intersection = (target * p).sum(dim=(0, 2, 3))
        total = (target + p).sum(dim=(0, 2, 3))
        return 1 - 2 * (w * intersection).sum() / (w * total).sum()

    loss = ShapeConsistencyLoss(generalized=True, smooth_nr=0.0, smooth_dr=0.0)
    torch.testing.assert_close(
        loss(real_logits, fake_logits, target), sudre(real_logits) + sudre(fake_logits)
    )


def test_shape_consistency_rejects_mismatched_target():
    _, target, real_logits, fake_logits = small_segmentation_example()
    with pytest.raises(ValueError, match="one-hot"):
        ShapeConsistencyLoss()(real_logits, fake_logits, target[:, :4])


# ---------------------------------------------------------------------------------------------
# Confidence map loss


@pytest.mark.parametrize("c,a,b", [(0.5, 0.3, -0.2), (0.9, -1.0, 1.0), (0.05, 0.0, 0.0)])
def test_confidence_loss_on_constant_maps(c, a, b):
    loss = ConfidenceMapLoss().eval()
    value = loss(torch.full((2, 5, 8, 8), a), torch.full((2, 5, 8, 8), c), torch.full((2, 5, 16, 16), b))
    assert value.item() == pytest.approx(c * abs(a - b) - 0.1 * math.log(c), rel=1e-5)


def test_confidence_loss_pools_real_images_by_two_by_two_means():
    real = torch.tensor([[1.0, 3.0, 0.0, 0.0], [5.0, 7.0, 0.0, 4.0]]).view(1, 1, 2, 4)
    torch.testing.assert_close(half_scale(real), torch.tensor([[[[4.0, 1.0]]]]))
    intermediate = torch.tensor([[[[2.0, 1.0]]]])
    confidence = torch.tensor([[[[0.5, 0.25]]]])
    expected = (0.5 * 2.0 + 0.25 * 0.0) / 2 - 0.1 * (math.log(0.5) + math.log(0.25)) / 2
    assert ConfidenceMapLoss()(intermediate, confidence, real).item() == pytest.approx(expected, rel=1e-6)
    # Real images already at half scale are used as they are.
    assert ConfidenceMapLoss()(intermediate, confidence, half_scale(real)).item() == pytest.approx(
        expected, rel=1e-6
    )
    with pytest.raises(ValueError, match="neither"):
        ConfidenceMapLoss()(intermediate, confidence, torch.zeros(1, 1, 4, 6))
    with pytest.raises(ValueError, match="even H and W"):
        ConfidenceMapLoss()(intermediate, confidence, torch.zeros(1, 1, 3, 6))


def test_confidence_loss_log_is_finite_at_zero_confidence():
    value = ConfidenceMapLoss(eps=1e-6)(
        torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    )
    assert value.item() == pytest.approx(-0.1 * math.log(1e-6))


def test_lambda_cm_switches_once_mean_confidence_exceeds_threshold():
    shape = (1, 5, 4, 4)
    y = torch.zeros(shape)
    loss = ConfidenceMapLoss(weight=2.0)
    assert loss.regularizer == 0.1
    loss(y, torch.full(shape, 0.7), y)  # not above the threshold
    assert not loss.switched and loss.regularizer == 0.1

    loss.eval()
    loss(y, torch.full(shape, 0.9), y)  # evaluation never switches
    assert not loss.switched
    loss.train()

    first = loss(y, torch.full(shape, 0.8), y)  # this call still uses 0.1, then switches
    assert first.item() == pytest.approx(2.0 * -0.1 * math.log(0.8), rel=1e-5)
    assert loss.switched and loss.regularizer == 0.03
    later = loss(y, torch.full(shape, 0.2), y)  # one-way: stays at 0.03
    assert later.item() == pytest.approx(2.0 * -0.03 * math.log(0.2), rel=1e-5)
    assert loss.regularizer == 0.03

    restored = ConfidenceMapLoss()
    assert not restored.switched
    restored.load_state_dict(loss.state_dict())
    assert restored.switched and restored.regularizer == 0.03


# ---------------------------------------------------------------------------------------------
# One generator step: every loss reaches the generator


def test_generator_objective_gradients_reach_every_generator_parameter():
    torch.manual_seed(0)
    n, size = 4, 32
    generator = CGSAMRGenerator(num_sequences=n, base_width=4, num_res_blocks=1)
    discriminator = LabelWiseMultiScaleDiscriminator(in_channels=NUM_LABELS + 4 * n, base_filters=8)
    unet = make_lesion_unet(n, channels=(4, 8, 16), strides=(2, 2))
    labels = torch.randint(0, NUM_LABELS, (2, size, size))
    mask = F.one_hot(labels, NUM_LABELS).permute(0, 3, 1, 2).float()
    atlas = torch.rand(2, 3 * n, size, size) * 2 - 1
    real = torch.rand(2, n, size, size) * 2 - 1

    out = generator(mask, atlas)
    fake_outputs = discriminator(mask, out["images"], atlas)
    real_outputs = discriminator(mask, real, atlas)
    adversarial = LeastSquaresAdversarialLoss()
    total = (
        adversarial.generator_loss(fake_outputs)
        + FeatureMatchingLoss(weight=PAPER_LOSS_WEIGHTS["feature_matching"])(fake_outputs, real_outputs)
        + ShapeConsistencyLoss()(unet(real), unet(out["images"]), mask)
        + ConfidenceMapLoss()(out["intermediate"], out["confidence"], real)
    )
    total.backward()
    assert torch.isfinite(total)
    for name, parameter in generator.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in unet.parameters())

    # The discriminator step on detached images leaves the generator untouched.
    generator.zero_grad(set_to_none=True)
    discriminator.zero_grad(set_to_none=True)
    d_loss = adversarial.discriminator_loss(
        discriminator(mask, real, atlas), discriminator(mask, out["images"].detach(), atlas)
    )
    d_loss.backward()
    assert all(p.grad is None for p in generator.parameters())
    assert all(p.grad is not None for p in discriminator.parameters())


def test_the_voxel_weighted_segmentation_loss_is_monai_dicece_at_unit_weights_and_ignores_zero_weights():
    from monai.losses import DiceCELoss

    from medsynth.losses import VoxelWeightedDiceCELoss

    torch.manual_seed(0)
    scores = torch.randn(3, NUM_LABELS, 12, 12)
    labels = torch.randint(0, NUM_LABELS, (3, 1, 12, 12)).float()
    loss = VoxelWeightedDiceCELoss()
    monai_loss = DiceCELoss(to_onehot_y=True, softmax=True)(scores, labels)
    torch.testing.assert_close(loss(scores, labels), monai_loss)
    torch.testing.assert_close(loss(scores, torch.cat([labels, torch.ones_like(labels)], 1)), monai_loss)

    # Zero-weight voxels do not count: changing the prediction there changes nothing.
    weights = torch.ones_like(labels)
    weights[..., :6] = 0.0
    target = torch.cat([labels, weights], 1)
    changed = scores.clone()
    changed[..., :6] = torch.randn_like(changed[..., :6]) * 10
    torch.testing.assert_close(loss(changed, target), loss(scores, target))
    assert not torch.isclose(loss(changed, labels), loss(scores, labels))
    # Down-weighted wrong voxels cost less than fully weighted ones.
    wrong = F.one_hot((labels[:, 0].long() + 1) % NUM_LABELS, NUM_LABELS).movedim(-1, 1).float() * 8
    half = torch.cat([labels, torch.full_like(labels, 0.5)], 1)
    assert loss(wrong, half) < loss(wrong, labels)
    with pytest.raises(ValueError, match="1 \\(labels\\) or 2"):
        loss(scores, torch.cat([labels, labels, labels], 1))
