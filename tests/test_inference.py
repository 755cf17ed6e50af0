"""Volume synthesis: geometry and intensity round trips, input checks, the NIfTI workflow."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medsynth.inference import SynthesisInference, find_atlas_files, synthesize_volume
from medsynth.networks import CGSAMRGenerator, SynthesisInferenceNetwork

SEQUENCES = ("t1w", "t2w", "flair")


class CentreAtlasSlice(nn.Module):
    """Returns, for each sequence, the centre atlas slice of its input: synthesis then reproduces the
    atlas, so any error in slicing, fitting, orientation or intensity scaling shows up."""

    def __init__(self, mask_channels: int = 5):
        super().__init__()
        self.mask_channels = mask_channels
        self.scale = nn.Parameter(torch.ones(()))  # gives the module a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x[:, self.mask_channels + 1 :: 3]


def _label_and_atlas(shape, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid[0] ** 2 + grid[1] ** 2 + 0.3 * grid[2] ** 2) < 0.7
    label = brain.astype(np.int64)
    label[brain & (np.abs(grid[0] - 0.3) < 0.2) & (np.abs(grid[1]) < 0.2)] = 2
    label[brain & (np.abs(grid[0] - 0.3) < 0.1) & (np.abs(grid[1]) < 0.1)] = 4
    atlas = np.stack([np.where(brain, 100.0 * (k + 1) + 20 * grid[0] + 10 * rng.random(shape), 0.0) for k in range(3)])
    return label, atlas.astype(np.float32)


def _clip_to_window(atlas: np.ndarray) -> np.ndarray:
    """The atlas after the [0, p99.5 of its non-zero voxels] window round trip."""
    out = np.empty_like(atlas)
    for c, volume in enumerate(atlas):
        upper = np.percentile(volume[volume != 0], 99.5)
        out[c] = np.clip(volume, 0.0, upper)
    return out


@pytest.mark.parametrize("shape", [(24, 30, 5), (32, 32, 4), (70, 50, 3)])  # pad, fit, resize
def test_synthesis_reproduces_the_input_grid_and_intensities(shape):
    label, atlas = _label_and_atlas(shape)
    volumes = synthesize_volume(CentreAtlasSlice(), label, atlas, sequences=SEQUENCES, image_size=32, batch_size=2)
    assert list(volumes) == list(SEQUENCES)
    expected = _clip_to_window(atlas)
    for c, sequence in enumerate(SEQUENCES):
        assert volumes[sequence].shape == shape and volumes[sequence].dtype == np.float32
        if max(shape[:2]) <= 32:  # pad/crop is exact
            np.testing.assert_allclose(volumes[sequence], expected[c], rtol=1e-4, atol=1e-2)
        else:  # area down- and up-sampling keep the image close, not equal
            correlation = np.corrcoef(volumes[sequence].ravel(), expected[c].ravel())[0, 1]
            assert correlation > 0.9


def test_synthesis_uses_given_windows_and_is_deterministic():
    label, atlas = _label_and_atlas((32, 32, 3))
    torch.manual_seed(0)
    network = SynthesisInferenceNetwork(CGSAMRGenerator(num_sequences=3, base_width=4, num_res_blocks=1))
    windows = torch.tensor([[0.0, 1000.0], [-5.0, 5.0], [10.0, 20.0]])
    first = synthesize_volume(network, label, atlas, sequences=SEQUENCES, image_size=32, windows=windows)
    second = synthesize_volume(network, label, atlas, sequences=SEQUENCES, image_size=32, windows=windows, batch_size=1)
    for c, sequence in enumerate(SEQUENCES):
        np.testing.assert_allclose(first[sequence], second[sequence], rtol=1e-5, atol=1e-4)
        low, high = windows[c].tolist()
        assert low - 1e-3 <= first[sequence].min() and first[sequence].max() <= high + 1e-3


def test_synthesis_rejects_bad_input():
    label, atlas = _label_and_atlas((16, 16, 3))
    network = CentreAtlasSlice()
    bad = label.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match="unknown label"):
        synthesize_volume(network, bad, atlas, sequences=SEQUENCES, image_size=16)
    with pytest.raises(ValueError, match="grid"):
        synthesize_volume(network, label, atlas[:, :, :8], sequences=SEQUENCES, image_size=16)
    with pytest.raises(ValueError, match="atlas must be"):
        synthesize_volume(network, label, atlas[:2], sequences=SEQUENCES, image_size=16)
    nan_atlas = atlas.copy()
    nan_atlas[0, 1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        synthesize_volume(network, label, nan_atlas, sequences=SEQUENCES, image_size=16)


def _write_case(tmp_path, affine):
    label, atlas = _label_and_atlas((28, 36, 4))
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), tmp_path / "case7_label.nii.gz")
    atlas_dir = tmp_path / "atlas"
    atlas_dir.mkdir()
    for name, volume in zip(("T1", "atlas_t2w", "flair"), atlas):  # aliases and the atlas_ prefix
        nib.save(nib.Nifti1Image(volume, affine), atlas_dir / f"{name}.nii.gz")
    return label, atlas, atlas_dir


def test_workflow_writes_nifti_in_the_input_geometry(tmp_path):
    # A left-right and anterior-posterior flipped (LPS-like), anisotropic grid: outputs must keep it.
    affine = np.array([[-0.9, 0, 0, 40.0], [0, -1.1, 0, 30.0], [0, 0, 4.4, -10.0], [0, 0, 0, 1]])
    label, atlas, atlas_dir = _write_case(tmp_path, affine)
    assert list(find_atlas_files(atlas_dir)) == list(SEQUENCES)
    workflow = SynthesisInference(
        CentreAtlasSlice(),
        output_dir=str(tmp_path / "out"),
        sequences=SEQUENCES,
        image_size=40,  # padding only: the round trip is exact
        mask_file=str(tmp_path / "case7_label.nii.gz"),
        atlas_dir=str(atlas_dir),
    )
    [record] = workflow.run()
    out = tmp_path / "out" / "case7_label"  # the mask file stem
    expected = _clip_to_window(atlas)
    for c, sequence in enumerate(SEQUENCES):
        image = nib.load(out / f"{sequence}.nii.gz")
        assert image.shape == label.shape
        np.testing.assert_allclose(image.affine, affine, atol=1e-5)
        np.testing.assert_allclose(image.get_fdata(), expected[c], rtol=1e-4, atol=1e-2)
    written_label = nib.load(out / "label.nii.gz")
    np.testing.assert_array_equal(np.asarray(written_label.dataobj), label)
    assert json.loads((out / "synthesis.json").read_text())["manipulation"] == "none"
    assert record["intensity_windows"] == "atlas"


def test_workflow_applies_and_writes_the_manipulated_mask(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    label, _, atlas_dir = _write_case(tmp_path, affine)
    workflow = SynthesisInference(
        CentreAtlasSlice(),
        output_dir=str(tmp_path / "out"),
        sequences=SEQUENCES,
        image_size=32,
        mask_file=str(tmp_path / "case7_label.nii.gz"),
        atlas_dir=str(atlas_dir),
        manipulation="grow",
    )
    [record] = workflow.run()
    grown = np.asarray(nib.load(tmp_path / "out" / "case7_label" / "label.nii.gz").dataobj)
    assert record["manipulation_info"]["applied"]
    assert (grown == 4).sum() > 1.5 * (label == 4).sum()
    assert ((grown > 0) == (label > 0)).all()  # the brain is unchanged
    with pytest.raises(ValueError, match="unknown manipulation"):
        SynthesisInference(CentreAtlasSlice(), str(tmp_path), SEQUENCES, mask_file="x", atlas_dir="y", manipulation="flip")


def test_workflow_optimized_network_writes_the_same_volumes(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    _write_case(tmp_path, affine)
    torch.manual_seed(0)
    network = SynthesisInferenceNetwork(CGSAMRGenerator(num_sequences=len(SEQUENCES), base_width=4, num_res_blocks=1))
    outputs = {}
    for backend in ("none", "eager"):
        workflow = SynthesisInference(
            network,
            output_dir=str(tmp_path / backend),
            sequences=SEQUENCES,
            image_size=32,
            mask_file=str(tmp_path / "case7_label.nii.gz"),
            atlas_dir=str(tmp_path / "atlas"),
            batch_size=3,
            backend=backend,
        )
        workflow.run()
        assert (type(workflow.network).__name__ == "InferenceModule") == (backend != "none")
        outputs[backend] = [nib.load(tmp_path / backend / "case7_label" / f"{s}.nii.gz").get_fdata() for s in SEQUENCES]
    for plain, optimized in zip(outputs["none"], outputs["eager"]):
        assert np.ptp(plain) > 0
        np.testing.assert_allclose(optimized, plain, atol=1e-4 * np.ptp(plain))
    with pytest.raises(ValueError, match="backend"):
        SynthesisInference(network, str(tmp_path), SEQUENCES, mask_file="x", atlas_dir="y", backend="tensorrt")
    with pytest.raises(ValueError, match="precision"):
        SynthesisInference(network, str(tmp_path), SEQUENCES, mask_file="x", atlas_dir="y", precision="fp16")
