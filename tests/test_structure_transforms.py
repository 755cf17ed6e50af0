"""Qu et al.'s Algorithms 1-3 and the lesion-label fusion rule on constructed images with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medsynth.transforms.structure import (
    BrainAreaMask,
    BrainAreaMaskd,
    StructuralFeatureMap,
    StructuralFeatureMapd,
    StructuralMapFilter,
    brain_area_mask,
    closed_contour_mask,
    fuse_structure_and_label,
    label_inside_brain,
    remove_lesion_structure,
    soft_structural_map,
    structural_feature_map,
)


def _square(size: int = 32, low: int = 8, high: int = 24, value: float = 1.0) -> torch.Tensor:
    image = torch.zeros(1, size, size)
    image[:, low:high, low:high] = value
    return image


def test_algorithm1_marks_exactly_the_pixels_whose_neighbourhood_changes():
    """On a bright square, the Sobel min/max differences exceed beta exactly where the 3x3
    neighbourhood is not constant: the square's morphological gradient (dilation minus erosion)."""
    image = _square()
    structure = StructuralFeatureMap(beta=0.5)(image)[0].numpy()
    inside = image[0].numpy() > 0
    box = np.ones((3, 3), bool)
    expected = ndimage.binary_dilation(inside, box) & ~ndimage.binary_erosion(inside, box, border_value=1)
    np.testing.assert_array_equal(structure.astype(bool), expected)
    # No structure in a constant image; a higher threshold keeps only the strong edges.
    assert StructuralFeatureMap(beta=0.5)(torch.full((1, 16, 16), 0.7)).sum() == 0
    strong = StructuralFeatureMap(beta=2.5)(image)[0].numpy().astype(bool)
    assert strong.sum() < expected.sum() and not (strong & ~expected).any()
    # Each channel gets its own map; the dictionary form writes a new key and keeps the image.
    two = torch.cat([image, torch.zeros_like(image)])
    maps = StructuralFeatureMapd("image", "structure", beta=0.5)({"image": two})
    assert maps["structure"].shape == (2, 32, 32) and maps["structure"][1].sum() == 0
    assert maps["image"] is two


def test_the_soft_map_tends_to_the_hard_map_and_has_gradients():
    image = _square(value=0.6) + 0.05 * torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))
    hard = structural_feature_map(image[None], beta=0.5)
    soft = soft_structural_map(image[None], beta=0.5, sharpness=500.0)
    assert torch.mean(torch.abs(hard - soft)) < 0.02
    x = image[None].clone().requires_grad_(True)
    soft_structural_map(x, beta=0.5).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_algorithm2_brain_area_is_the_nonzero_area_enlarged_by_p_pixels():
    image = _square()  # brain rows/columns 8..23
    np.testing.assert_array_equal(BrainAreaMask(p=0)(image)[0].numpy(), image[0].numpy())
    grown = BrainAreaMask(p=8)(image)[0].numpy()
    # Resized to 40 x 40 about the centre and cropped back: rows and columns 6..25 (nearest neighbour).
    expected = np.zeros((32, 32))
    expected[6:26, 6:26] = 1
    np.testing.assert_array_equal(grown, expected)
    assert grown[image[0].numpy() > 0].all()  # it contains the brain
    # Any channel counts; the dictionary form; negative p refused.
    mixed = torch.zeros(2, 32, 32)
    mixed[1, 10:12, 10:12] = 0.3
    assert BrainAreaMaskd("image", "area", p=0)({"image": mixed})["area"].sum() == 4
    with pytest.raises(ValueError, match="p must be >= 0"):
        brain_area_mask(image[None], -1)


def _ring(gap: int = 0, size: int = 48, radius: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size] - size / 2 + 0.5
    distance = np.hypot(yy, xx)
    ring = (np.abs(distance - radius) < 1.0).astype(np.float32)
    if gap:
        ring[: size // 2, size // 2 - gap // 2 : size // 2 + gap // 2 + 1] = 0  # open the top of the ring
    return ring, (distance < radius + 1.0).astype(np.float32)


def test_algorithm3_keeps_closed_outlines_and_rejects_open_ones():
    closed, disc = _ring()
    filled = closed_contour_mask(closed)
    # The closed ring is filled to the disc (the blur widens its outline by about a pixel).
    assert filled[disc > 0].all() and np.abs(filled - disc).mean() < 0.04
    keep = StructuralMapFilter(mae_threshold=0.05)
    assert keep(closed, disc)
    opened, _ = _ring(gap=7)
    assert not keep(opened, disc) and keep.mae(opened, disc) > 0.2  # an open outline fills nothing
    with pytest.raises(ValueError, match="differ in shape"):
        keep.mae(closed, disc[:10])


def test_lesion_label_fusion_rule():
    brain = torch.zeros(2, 1, 16, 16)
    brain[:, :, 2:14, 2:14] = 1
    label = torch.ones(2, 1, 16, 16)  # normal brain
    label[0, :, 5:8, 5:8] = 4  # lesion inside the brain
    label[1, :, 0:3, 0:3] = 2  # lesion partly outside
    assert label_inside_brain(label, brain, lesion_labels=(2, 3, 4)).tolist() == [True, False]
    structure = torch.ones(2, 1, 16, 16)
    cleared = remove_lesion_structure(structure, label, lesion_labels=(2, 3, 4))
    assert cleared[0, 0, 5:8, 5:8].sum() == 0 and cleared[0].sum() == 256 - 9
    onehot = torch.nn.functional.one_hot(label[:, 0].long(), 5).permute(0, 3, 1, 2)
    fused = fuse_structure_and_label(cleared, onehot, label_weight=0.5)
    assert fused.shape == (2, 5, 16, 16) and float(fused.min()) >= 0 and float(fused.max()) <= 1
    assert fused[0, 4, 6, 6] == 0.5 and fused[0, 1, 0, 0] == 1.0  # lesion: label only; normal: both
    with pytest.raises(ValueError, match="do not fuse"):
        fuse_structure_and_label(cleared, onehot[..., :8], 0.5)
