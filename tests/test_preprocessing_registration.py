"""Co-registration and resampling geometry (ANTs back end)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from preprocessing.registration import (
    load_transform,
    read_ants_affine,
    register_to_reference,
    resample_to_reference,
    rigid_matrix,
    save_transform,
    transform_displacement,
    write_ants_affine,
)


def _world_volume(seed: int = 0) -> nib.Nifti1Image:
    """A textured head-like ellipsoid on a 2 mm isotropic grid centred on the origin."""
    shape = (80, 90, 70)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    radii = np.array([30, 36, 28])[:, None, None, None]
    inside = np.sum((grid / radii) ** 2, axis=0) < 1
    texture = ndi.gaussian_filter(rng.normal(size=shape), 2.0)
    data = np.where(inside, 300 + 200 * texture / texture.std(), 0).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -2.0 * (np.array(shape) - 1) / 2
    return nib.Nifti1Image(ndi.gaussian_filter(data, 0.5), affine)


def _grid(shape, spacing, rotation_deg=(0, 0, 0)) -> nib.Nifti1Image:
    affine = rigid_matrix(rotation_deg) @ np.diag([*spacing, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return nib.Nifti1Image(np.zeros(shape, np.float32), affine)


def test_registration_recovers_known_rigid_transform_within_one_voxel():
    world = _world_volume()
    # Fixed: a thick-slab grid (like APTw); moving: another grid, another contrast, a known head pose.
    fixed = resample_to_reference(world, _grid((48, 56, 12), (1.6, 1.6, 4.4)))
    truth = rigid_matrix((4.0, -3.0, 6.0), (5.0, -4.0, 3.0))  # fixed point -> moving point is inv(truth)
    moving_grid = _grid((60, 70, 50), (2.2, 2.2, 2.4), rotation_deg=(0, 0, 10))
    moving = resample_to_reference(world, moving_grid, truth)
    moving = nib.Nifti1Image(
        np.where(np.asanyarray(moving.dataobj) > 0, 800 - np.asanyarray(moving.dataobj), 0).astype(
            np.float32
        ),
        moving.affine,
    )
    result = register_to_reference(moving, fixed, transform="rigid", seed=3)
    inside = np.argwhere(np.asanyarray(fixed.dataobj) > 0)
    points = nib.affines.apply_affine(fixed.affine, inside)
    expected = np.linalg.inv(truth)
    error_mm = transform_displacement(result.matrix, expected, points)
    spacing = np.array([1.6, 1.6, 4.4])
    delta = (np.c_[points, np.ones(len(points))] @ (result.matrix - expected).T)[:, :3]
    error_vox = np.linalg.norm(delta / spacing, axis=1)
    before = transform_displacement(np.eye(4), expected, points)
    assert before.mean() > 5.0  # the problem is not trivial
    assert error_vox.max() <= 1.0, (error_mm.mean(), error_vox.max())
    assert error_mm.mean() < 0.6
    # The warped image lives on the fixed grid and the seed makes the result reproducible.
    assert result.warped.shape == fixed.shape
    np.testing.assert_allclose(result.warped.affine, fixed.affine)
    again = register_to_reference(moving, fixed, transform="rigid", seed=3)
    np.testing.assert_array_equal(again.matrix, result.matrix)


def test_resampling_reproduces_a_linear_world_function_on_an_oblique_grid():
    source = _grid((40, 44, 30), (2.0, 2.0, 2.0))
    coords = nib.affines.apply_affine(source.affine, np.indices(source.shape).reshape(3, -1).T)
    weights = np.array([1.0, -2.0, 0.5])
    source = nib.Nifti1Image((coords @ weights + 100).reshape(source.shape).astype(np.float32), source.affine)
    target = _grid((20, 24, 10), (1.3, 1.7, 3.1), rotation_deg=(10, -5, 20))
    shift = rigid_matrix((0, 0, 0), (3.0, -2.0, 1.0))
    out = resample_to_reference(source, target, shift)
    assert out.shape == target.shape
    np.testing.assert_allclose(out.affine, target.affine)
    target_points = nib.affines.apply_affine(target.affine, np.indices(target.shape).reshape(3, -1).T)
    expected = (nib.affines.apply_affine(shift, target_points) @ weights + 100).reshape(target.shape)
    got = np.asanyarray(out.dataobj)
    core = (slice(3, -3), slice(3, -3), slice(2, -2))
    np.testing.assert_allclose(got[core], expected[core], atol=1e-2)


def test_nearest_neighbour_keeps_labels_integer():
    labels = np.zeros((20, 20, 10), np.uint8)
    labels[5:15, 5:15, 3:7] = 4
    labels[8:12, 8:12, 4:6] = 2
    img = nib.Nifti1Image(labels, np.diag([2.0, 2.0, 3.0, 1.0]))
    out = resample_to_reference(
        img, _grid((30, 30, 12), (1.5, 1.5, 2.5)), None, interpolation="nearestNeighbor"
    )
    assert np.asanyarray(out.dataobj).dtype == np.uint8
    assert set(np.unique(np.asanyarray(out.dataobj))) <= {0, 2, 4}


def test_transform_files_round_trip(tmp_path):
    matrix = rigid_matrix((5.0, -7.0, 12.0), (3.0, 1.0, -9.0), center=(10.0, -20.0, 5.0))
    np.testing.assert_allclose(
        read_ants_affine(write_ants_affine(matrix, tmp_path / "a.mat")), matrix, atol=1e-6
    )
    paths = save_transform(matrix, tmp_path / "t2w_to_aptw")
    np.testing.assert_allclose(load_transform(paths["json"]), matrix, atol=1e-12)
    np.testing.assert_allclose(load_transform(paths["mat"]), matrix, atol=1e-6)
    # Resampling through the ANTs file and through the matrix gives the same image.
    world = _world_volume(seed=2)
    grid = _grid((30, 30, 20), (3.0, 3.0, 3.0))
    a = np.asanyarray(resample_to_reference(world, grid, matrix).dataobj)
    b = np.asanyarray(resample_to_reference(world, grid, [str(paths["mat"])]).dataobj)
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_bad_arguments_are_refused():
    img = _grid((10, 10, 10), (1, 1, 1))
    with pytest.raises(ValueError, match="transform"):
        register_to_reference(img, img, transform="syn")
    with pytest.raises(ValueError, match="interpolation"):
        resample_to_reference(img, img, interpolation="cubic")
