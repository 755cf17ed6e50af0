"""Intensity scaling to [-1, 1] (and back) and the axial-slice transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medsynth.transforms.intensity import (
    ScaleToUnit,
    ScaleToUnitd,
    UnitToIntensityd,
    compute_window,
    scale_to_unit,
    unit_to_intensity,
    windows_for,
)
from medsynth.transforms.slices import FitInPlane, axial_slice_stats, neighbour_slices, select_slices


def test_anatomical_window_is_zero_to_brain_p99_5_and_inverts():
    rng = np.random.default_rng(0)
    volume = np.zeros((1, 10, 10, 4), dtype=np.float32)
    brain = np.zeros_like(volume)
    brain[:, 2:8, 2:8, :] = 1
    volume[brain > 0] = rng.uniform(100, 900, int(brain.sum()))
    volume[0, 0, 0, 0] = 5000.0  # outside the brain: must not move the window
    scaler = ScaleToUnit(windows_for(["t1w"]))
    windows = scaler.compute_windows(volume, brain)
    expected_upper = np.percentile(volume[brain > 0], 99.5)
    assert windows.shape == (1, 2)
    assert windows[0, 0] == 0.0
    assert windows[0, 1] == pytest.approx(expected_upper, rel=1e-5)

    scaled = scaler(volume, brain)
    assert scaled.min() == -1.0 and scaled.max() == 1.0
    assert scaled[0, 0, 0, 1] == -1.0  # intensity 0 -> -1
    assert scaled[0, 0, 0, 0] == 1.0  # clipped
    inside = (volume <= expected_upper) & (brain > 0)
    restored = unit_to_intensity(scaled, windows.numpy())
    np.testing.assert_allclose(restored[inside], volume[inside], rtol=1e-5, atol=1e-3)


def test_aptw_uses_the_fixed_plus_minus_five_percent_window():
    values = torch.tensor([[-7.0, -5.0, -2.5, 0.0, 2.5, 5.0, 8.0]])
    (window,) = windows_for(["aptw"])
    assert compute_window(values[0], window) == (-5.0, 5.0)
    scaled = scale_to_unit(values, (-5.0, 5.0))
    torch.testing.assert_close(scaled, torch.tensor([[-1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0]]))
    torch.testing.assert_close(unit_to_intensity(scaled[:, 1:6], (-5.0, 5.0)), values[:, 1:6])


def test_windows_are_configurable_per_sequence_and_checked():
    specs = windows_for(["t1w", "aptw"], {"aptw": (-4.0, 4.0), "t1w": (10.0, "p90")})
    assert specs == [(10.0, "p90"), (-4.0, 4.0)]
    data = torch.arange(1, 101, dtype=torch.float32)
    assert compute_window(data, specs[0]) == (10.0, pytest.approx(90.1, rel=1e-4))
    with pytest.raises(ValueError, match="p99.5"):
        windows_for(["t1w"], {"t1w": (0.0, "q99")})
    with pytest.raises(ValueError, match="no intensity window"):
        windows_for(["dwi"])


def test_dictionary_transforms_store_windows_and_invert_per_channel_and_batch():
    image = torch.stack([torch.linspace(0, 400, 64), torch.linspace(-4, 4, 64)]).reshape(2, 8, 8, 1)
    mask = torch.ones(1, 8, 8, 1)
    scaled = ScaleToUnitd("image", windows_for(["t2w", "aptw"]), window_keys="window", mask_key="mask")(
        {"image": image, "mask": mask}
    )
    assert scaled["window"].shape == (2, 2)
    assert scaled["window"][1].tolist() == [-5.0, 5.0]
    assert scaled["image"][1].abs().max() <= 0.8 + 1e-6  # +-4 % of a +-5 % window
    back = UnitToIntensityd("image", window_keys="window")(scaled)
    inside = image[0] <= scaled["window"][0, 1]
    torch.testing.assert_close(back["image"][0][inside], image[0][inside], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(back["image"][1], image[1], rtol=1e-5, atol=1e-5)
    # A batch (B, C, H, W) with (B, C, 2) windows, as inference sees it.
    batch = torch.stack([scaled["image"][..., 0]] * 3)
    restored = unit_to_intensity(batch, torch.stack([scaled["window"]] * 3))
    torch.testing.assert_close(restored[2, 1], image[1, ..., 0], rtol=1e-5, atol=1e-5)


def test_neighbour_slices_layout_and_edge_replication():
    depth = 5
    volume = torch.zeros(2, 3, 4, depth)
    for z in range(depth):
        volume[0, ..., z] = z
        volume[1, ..., z] = 10 + z
    stack = neighbour_slices(volume, 0)
    assert stack.shape == (6, 3, 4)
    assert stack[:, 0, 0].tolist() == [0, 0, 1, 10, 10, 11]  # z-1 replicates slice 0
    axial_first = volume.permute(0, 3, 1, 2).contiguous()
    assert torch.equal(neighbour_slices(axial_first, 2, axis=1), neighbour_slices(volume, 2))
    assert neighbour_slices(volume, 2)[:, 1, 1].tolist() == [1, 2, 3, 11, 12, 13]
    assert neighbour_slices(volume, depth - 1)[:, 2, 3].tolist() == [3, 4, 4, 13, 14, 14]
    assert neighbour_slices(volume.numpy(), 2)[:, 0, 0].tolist() == [1, 2, 3, 11, 12, 13]
    with pytest.raises(IndexError):
        neighbour_slices(volume, depth)


def test_fit_in_plane_pads_small_planes_centred_and_inverts():
    volume = MetaTensor(torch.arange(20 * 24 * 2, dtype=torch.float32).reshape(1, 20, 24, 2) + 1)
    fitter = FitInPlane(32)
    fitted = fitter(volume)
    assert fitted.shape == (1, 32, 32, 2)
    assert torch.equal(fitted[0, 6:26, 4:28], volume[0])  # centred, no interpolation
    assert fitted[0, :6].abs().sum() == 0 and fitted[0, :, :4].abs().sum() == 0  # zero padding
    restored = fitter.inverse(fitted)
    assert torch.equal(restored.as_tensor(), volume.as_tensor())
    assert restored.shape == volume.shape


def test_fit_in_plane_resizes_large_planes_without_cutting_and_keeps_labels():
    label = torch.zeros(1, 48, 40, 3)
    label[0, 0:4, 0:4] = 4  # a corner structure that a centre crop would cut
    label[0, 20:30, 15:25] = 2
    fitter = FitInPlane(24, mode="nearest")
    fitted = fitter(MetaTensor(label))
    assert fitted.shape == (1, 24, 24, 3)
    assert set(torch.unique(fitted).tolist()) == {0.0, 2.0, 4.0}
    assert (fitted == 4).sum() == 2 * 2 * 3  # 4x4 corner at half resolution
    restored = fitter.inverse(fitted)  # back to 48 x 40: pad to 48 x 48, resize, unpad
    assert restored.shape == label.shape
    assert (restored == 4)[0, :4, :4].all()
    cropped = FitInPlane(44, mode="nearest", crop_tolerance=0.1)(label)  # 48 <= 44 * 1.1: crop
    assert cropped.shape == (1, 44, 44, 3)
    assert (cropped == 2).sum() == (label == 2).sum()


def test_slice_stats_and_selection():
    label = np.zeros((10, 10, 4), dtype=np.uint8)
    brain = np.zeros_like(label)
    brain[2:8, 2:8, 1:] = 1  # 36 % of slices 1..3
    brain[4:5, 4:5, 0] = 1  # 1 % of slice 0
    label[brain > 0] = 1
    label[4:6, 4:6, 2] = 3
    stats = axial_slice_stats(label[None], brain[None])
    np.testing.assert_allclose(stats["brain_fraction"], [0.01, 0.36, 0.36, 0.36])
    assert stats["has_lesion"].tolist() == [False, False, True, False]
    assert select_slices(stats["brain_fraction"], stats["has_lesion"], "all").tolist() == [0, 1, 2, 3]
    assert select_slices(stats["brain_fraction"], stats["has_lesion"], "brain", 0.05).tolist() == [1, 2, 3]
    assert select_slices(stats["brain_fraction"], stats["has_lesion"], "lesion").tolist() == [2]
    with pytest.raises(ValueError, match="slice_selection"):
        select_slices(stats["brain_fraction"], stats["has_lesion"], "tumour")
