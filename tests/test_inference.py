"""Synthesis inference as MONAI transforms: geometry and intensity round trips, the slice-stacking
inferer against a plain slice loop, input checks, manipulations, optimized networks, and the
output folder read back as a cohort."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from torch import nn

from medsynth.constants import NUM_LABELS
from medsynth.errors import InputDataError
from medsynth.inference import (
    SliceStackInferer,
    find_atlas_files,
    synthesis_cases,
    synthesis_postprocessing,
    synthesis_preprocessing,
)
from medsynth.networks import CGSAMRGenerator, SynthesisInferenceNetwork
from medsynth.transforms.intensity import ScaleToUnit, unit_to_intensity, windows_for
from medsynth.transforms.slices import neighbour_slices

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
    atlas = np.stack(
        [np.where(brain, 100.0 * (k + 1) + 20 * grid[0] + 10 * rng.random(shape), 0.0) for k in range(3)]
    )
    return label, atlas.astype(np.float32)


def _clip_to_window(atlas: np.ndarray) -> np.ndarray:
    """The atlas after the [0, p99.5 of its non-zero voxels] window round trip."""
    out = np.empty_like(atlas)
    for c, volume in enumerate(atlas):
        upper = np.percentile(volume[volume != 0], 99.5)
        out[c] = np.clip(volume, 0.0, upper)
    return out


def _write_case(folder, shape, affine, images=False, seed=0):
    label, atlas = _label_and_atlas(shape, seed)
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), folder / "case7_label.nii.gz")
    atlas_dir = folder / "atlas"
    atlas_dir.mkdir()
    for name, volume in zip(
        ("T1", "atlas_t2w", "flair"), atlas, strict=True
    ):  # aliases and the atlas_ prefix
        nib.save(nib.Nifti1Image(volume, affine), atlas_dir / f"{name}.nii.gz")
    cases = synthesis_cases(SEQUENCES, mask_file=str(folder / "case7_label.nii.gz"), atlas_dir=str(atlas_dir))
    if images:  # "real" images: the atlas scaled, so their windows differ from the atlas' own
        for sequence, volume in zip(SEQUENCES, atlas, strict=True):
            nib.save(nib.Nifti1Image(3.0 * volume, affine), folder / f"{sequence}.nii.gz")
            cases[0][sequence] = str(folder / f"{sequence}.nii.gz")
    return label, atlas, cases


def synthesize(
    network, cases, out, image_size, manipulation="none", backend="none", batch_size=8, sequences=SEQUENCES
):
    """What a bundle's inference.json runs: preprocessing, the inferer and postprocessing in MONAI's
    evaluator."""
    preprocessing = synthesis_preprocessing(sequences, image_size, manipulation=manipulation)
    postprocessing = synthesis_postprocessing(preprocessing, str(out), sequences, manipulation)
    inferer = SliceStackInferer(batch_size=batch_size, backend=backend)
    loader = DataLoader(Dataset(cases, preprocessing), batch_size=1)
    SupervisedEvaluator("cpu", loader, network, inferer=inferer, postprocessing=postprocessing).run()
    return inferer


@pytest.mark.parametrize("shape", [(24, 30, 5), (32, 32, 4), (70, 50, 3)])  # pad, fit, resize
def test_synthesis_reproduces_the_input_grid_and_intensities(tmp_path, shape):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    _, atlas, cases = _write_case(tmp_path, shape, affine)
    synthesize(CentreAtlasSlice(), cases, tmp_path / "out", image_size=32, batch_size=2)
    expected = _clip_to_window(atlas)
    for c, sequence in enumerate(SEQUENCES):
        image = nib.load(tmp_path / "out" / "case7_label" / f"{sequence}.nii.gz")
        volume = image.get_fdata()
        assert volume.shape == shape and image.get_data_dtype() == np.float32
        if max(shape[:2]) <= 32:  # pad/crop is exact
            np.testing.assert_allclose(volume, expected[c], rtol=1e-4, atol=1e-2)
        else:  # area down- and up-sampling keep the image close, not equal
            assert np.corrcoef(volume.ravel(), expected[c].ravel())[0, 1] > 0.9


def test_the_inferer_matches_a_plain_slice_loop_and_real_image_windows(tmp_path):
    # A padded grid (no resampling): the oracle is a loop over slices of the raw arrays.
    shape, size = (28, 30, 4), 32
    label, atlas, cases = _write_case(tmp_path, shape, np.eye(4), images=True)
    torch.manual_seed(0)
    network = SynthesisInferenceNetwork(
        CGSAMRGenerator(num_sequences=3, base_width=4, num_res_blocks=1)
    ).eval()
    synthesize(network, cases, tmp_path / "out", image_size=size, batch_size=3)

    pad = [((size - s) // 2, size - s - (size - s) // 2) for s in shape[:2]]
    atlas_padded = torch.as_tensor(np.pad(atlas, [(0, 0), *pad, (0, 0)]))
    atlas_unit = ScaleToUnit(windows_for(SEQUENCES))(atlas_padded)
    mask = torch.nn.functional.one_hot(torch.as_tensor(np.pad(label, [*pad, (0, 0)])), NUM_LABELS)
    mask = mask.permute(3, 0, 1, 2).float()
    with torch.no_grad():
        slices = [
            network(torch.cat([mask[..., z], neighbour_slices(atlas_unit, z, 1)])[None])[0]
            for z in range(shape[2])
        ]
    unit = torch.stack(slices, dim=-1)[:, pad[0][0] : pad[0][0] + shape[0], pad[1][0] : pad[1][0] + shape[1]]
    real = torch.as_tensor(3.0 * atlas)
    windows = ScaleToUnit(windows_for(SEQUENCES)).compute_windows(real, torch.as_tensor(label > 0))
    expected = unit_to_intensity(unit, windows).numpy()
    record = json.loads((tmp_path / "out" / "case7_label" / "synthesis.json").read_text())
    assert record["intensity_windows"] == "real images"
    for c, sequence in enumerate(SEQUENCES):
        written = nib.load(tmp_path / "out" / "case7_label" / f"{sequence}.nii.gz").get_fdata()
        np.testing.assert_allclose(written, expected[c], rtol=1e-5, atol=1e-3 * float(np.ptp(expected[c])))
        low, high = windows[c].tolist()
        assert low - 1e-3 <= written.min() and written.max() <= high + 1e-3


def _refusal(preprocessing, item) -> InputDataError:
    """The InputDataError behind MONAI's "applying transform" error."""
    with pytest.raises(RuntimeError, match="applying transform") as raised:
        preprocessing(item)
    cause = raised.value.__cause__
    assert isinstance(cause, InputDataError), repr(cause)
    return cause


def test_inference_refuses_bad_input_naming_the_case_and_file(tmp_path):
    affine = np.eye(4)
    label, atlas, cases = _write_case(tmp_path, (16, 16, 3), affine)
    preprocessing = synthesis_preprocessing(SEQUENCES, 16)
    bad_label = label.copy()
    bad_label[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(bad_label.astype(np.uint8), affine), tmp_path / "bad.nii.gz")
    error = _refusal(preprocessing, {**cases[0], "label": str(tmp_path / "bad.nii.gz")})
    assert error.patient_id == "case7_label" and error.path.endswith("bad.nii.gz")
    assert "unknown label value(s) [7]" in str(error)
    nib.save(nib.Nifti1Image(atlas[0, :, :, :2], affine), tmp_path / "short.nii.gz")
    error = _refusal(preprocessing, {**cases[0], "atlas_t2w": str(tmp_path / "short.nii.gz")})
    assert error.path.endswith("short.nii.gz") and "not on the grid of the label map" in str(error)
    shifted = affine.copy()
    shifted[0, 3] = 5.0
    nib.save(nib.Nifti1Image(atlas[0], shifted), tmp_path / "shifted.nii.gz")
    assert "not on the grid" in str(
        _refusal(preprocessing, {**cases[0], "atlas_flair": str(tmp_path / "shifted.nii.gz")})
    )
    nan_atlas = atlas[1].copy()
    nan_atlas[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan_atlas, affine), tmp_path / "nan.nii.gz")
    assert "1 NaN/inf voxel" in str(
        _refusal(preprocessing, {**cases[0], "atlas_t1w": str(tmp_path / "nan.nii.gz")})
    )
    with pytest.raises(InputDataError, match="no atlas file"):
        find_atlas_files(tmp_path)


def test_outputs_keep_a_flipped_anisotropic_input_geometry(tmp_path):
    # A left-right and anterior-posterior flipped (LPS-like), anisotropic grid: outputs must keep it.
    affine = np.array([[-0.9, 0, 0, 40.0], [0, -1.1, 0, 30.0], [0, 0, 4.4, -10.0], [0, 0, 0, 1]])
    label, atlas, cases = _write_case(tmp_path, (28, 36, 4), affine)
    assert list(find_atlas_files(tmp_path / "atlas")) == list(SEQUENCES)
    synthesize(CentreAtlasSlice(), cases, tmp_path / "out", image_size=40)  # padding only: exact
    out = tmp_path / "out" / "case7_label"  # the mask file stem
    expected = _clip_to_window(atlas)
    for c, sequence in enumerate(SEQUENCES):
        image = nib.load(out / f"{sequence}.nii.gz")
        assert image.shape == label.shape
        np.testing.assert_allclose(image.affine, affine, atol=1e-5)
        np.testing.assert_allclose(image.get_fdata(), expected[c], rtol=1e-4, atol=1e-2)
    np.testing.assert_array_equal(np.asarray(nib.load(out / "label.nii.gz").dataobj), label)
    np.testing.assert_array_equal(np.asarray(nib.load(out / "brain_mask.nii.gz").dataobj), label > 0)
    record = json.loads((out / "synthesis.json").read_text())
    assert record["manipulation"] == "none" and record["intensity_windows"] == "atlas"


def test_the_manipulated_mask_is_applied_and_written_exactly(tmp_path):
    # A resampled grid (70 > 32): the label map written is still the full-resolution one used.
    label, _, cases = _write_case(tmp_path, (70, 50, 3), np.diag([1.0, 1.0, 2.0, 1.0]))
    synthesize(CentreAtlasSlice(), cases, tmp_path / "out", image_size=32, manipulation="grow")
    grown = np.asarray(nib.load(tmp_path / "out" / "case7_label" / "label.nii.gz").dataobj)
    from medsynth.transforms.lesion import ResizeTumor

    np.testing.assert_array_equal(grown, ResizeTumor(100.0)(label))
    record = json.loads((tmp_path / "out" / "case7_label" / "synthesis.json").read_text())
    assert record["manipulation"] == "grow" and record["manipulation_info"][
        "achieved_ratio"
    ] == pytest.approx(2.0, rel=0.01)
    with pytest.raises(ValueError, match="unknown manipulation"):
        synthesis_cases(SEQUENCES, mask_file="x", atlas_dir="y", manipulation="flip")


def test_an_optimized_network_writes_the_same_volumes(tmp_path):
    _, _, cases = _write_case(tmp_path, (28, 30, 4), np.diag([1.0, 1.0, 2.0, 1.0]))
    torch.manual_seed(0)
    network = SynthesisInferenceNetwork(
        CGSAMRGenerator(num_sequences=len(SEQUENCES), base_width=4, num_res_blocks=1)
    )
    outputs = {}
    for backend in ("none", "eager"):
        inferer = synthesize(network, cases, tmp_path / backend, image_size=32, backend=backend, batch_size=3)
        assert (inferer._optimized is not None) == (backend != "none")
        outputs[backend] = [
            nib.load(tmp_path / backend / "case7_label" / f"{s}.nii.gz").get_fdata() for s in SEQUENCES
        ]
    for plain, optimized in zip(outputs["none"], outputs["eager"], strict=True):
        assert np.ptp(plain) > 0
        np.testing.assert_allclose(optimized, plain, atol=1e-4 * np.ptp(plain))
    with pytest.raises(ValueError, match="backend"):
        SliceStackInferer(backend="tensorrt")
    with pytest.raises(ValueError, match="precision"):
        SliceStackInferer(precision="fp16")


def test_a_synthesized_cohort_is_a_cohort(tmp_path):
    """Inference over a cohort writes manifest.csv beside the cases; the data layer reads it back."""
    from medsynth.data.cohort import resolve_cohort
    from medsynth.data.dataset import make_slice_dataset
    from medsynth.data.manifest import sequences_of

    source = resolve_cohort(
        "", tmp_path / "cache", phantom_patients=3, phantom_shape=(32, 32, 4), progress=False
    )
    sequences = list(sequences_of(source))
    cases = synthesis_cases(sequences, source, manipulation="mirror")
    synthesize(
        CentreAtlasSlice(),
        cases,
        tmp_path / "synthetic",
        image_size=32,
        manipulation="mirror",
        sequences=sequences,
    )
    cohort = resolve_cohort(str(tmp_path / "synthetic"), tmp_path / "cache2", progress=False)
    assert sorted(cohort["patient_id"]) == sorted(source["patient_id"])
    assert dict(zip(cohort["patient_id"], cohort["split"], strict=True)) == dict(
        zip(source["patient_id"], source["split"], strict=True)
    )
    assert (cohort["source_patient"] == cohort["patient_id"]).all()
    for column in [f"atlas_{s}" for s in sequences]:  # the atlas the cases were synthesized with
        assert set(cohort[column]) == set(source[column])
    dataset = make_slice_dataset(cohort, "train", image_size=32, progress=False)
    item = dataset[0]
    assert item["image"].shape == (len(sequences), 32, 32) and item["mask"].shape == (NUM_LABELS, 32, 32)
    # Re-running a case replaces its row instead of adding one.
    synthesize(
        CentreAtlasSlice(),
        cases[:1],
        tmp_path / "synthetic",
        image_size=32,
        manipulation="mirror",
        sequences=sequences,
    )
    assert len(resolve_cohort(str(tmp_path / "synthetic"), tmp_path / "cache3", progress=False)) == len(
        source
    )


def test_outputs_equal_those_of_medsynth_0_1(tmp_path):
    """The volumes and label maps that medsynth 0.1.0's SynthesisInference wrote (before inference became
    MONAI transforms) for a seeded network, a flipped anisotropic grid, a padded and a resampled plane and
    a manipulation (tests/data/inference_medsynth_0_1.npz, made with that code)."""
    from pathlib import Path

    reference = np.load(Path(__file__).parent / "data" / "inference_medsynth_0_1.npz")
    affine = np.array([[-0.9, 0, 0, 40.0], [0, -1.1, 0, 30.0], [0, 0, 4.4, -10.0], [0, 0, 0, 1]])
    for name, shape, manipulation in (("pad", (28, 30, 4), "none"), ("resize", (40, 36, 3), "grow")):
        label, atlas = _label_and_atlas(shape, seed=1)
        case = tmp_path / name
        case.mkdir()
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), case / "case.nii.gz")
        (case / "atlas").mkdir()
        for sequence, volume in zip(SEQUENCES, atlas, strict=True):
            nib.save(nib.Nifti1Image(volume, affine), case / "atlas" / f"{sequence}.nii.gz")
        cases = synthesis_cases(
            SEQUENCES,
            mask_file=str(case / "case.nii.gz"),
            atlas_dir=str(case / "atlas"),
            manipulation=manipulation,
        )
        torch.manual_seed(0)
        network = SynthesisInferenceNetwork(CGSAMRGenerator(num_sequences=3, base_width=4, num_res_blocks=1))
        synthesize(network, cases, case / "out", image_size=32, manipulation=manipulation, batch_size=3)
        for sequence in (*SEQUENCES, "label"):
            written = nib.load(case / "out" / "case" / f"{sequence}.nii.gz")
            np.testing.assert_allclose(written.affine, affine, atol=1e-6)
            np.testing.assert_allclose(
                np.asarray(written.dataobj), reference[f"{name}_{sequence}"], rtol=1e-5, atol=1e-4
            )


class AtlasAndConfidence(nn.Module):
    """A network returning images and (CG-SAMR-like) confidence maps: the atlas' centre slices, then a
    known map per sequence (0.25, 0.5, 0.75) so that its way back to the input grid is checkable."""

    def __init__(self):
        super().__init__()
        self.images = CentreAtlasSlice()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = self.images(x)
        levels = torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype, device=x.device)[None, :, None, None]
        return torch.cat([images, levels.expand_as(images)], dim=1)


def test_confidence_maps_come_back_on_the_input_grid_with_the_images(tmp_path):
    shape = (24, 30, 5)
    _, atlas, cases = _write_case(tmp_path, shape, np.diag([1.0, 1.0, 2.0, 1.0]))

    def run(network, out):
        preprocessing = synthesis_preprocessing(SEQUENCES, 32)
        postprocessing = synthesis_postprocessing(preprocessing, str(out), SEQUENCES, with_confidence=True)
        loader = DataLoader(Dataset(cases, preprocessing), batch_size=1)
        SupervisedEvaluator("cpu", loader, network, inferer=SliceStackInferer(batch_size=2),
                            postprocessing=postprocessing).run()  # fmt: skip

    run(AtlasAndConfidence(), tmp_path / "out")
    case = tmp_path / "out" / "case7_label"
    for level, sequence in zip((0.25, 0.5, 0.75), SEQUENCES, strict=True):
        confidence = nib.load(case / f"confidence_{sequence}.nii.gz")
        assert confidence.shape == shape
        np.testing.assert_allclose(confidence.get_fdata(), level, atol=1e-6)
    expected = _clip_to_window(atlas)
    np.testing.assert_allclose(nib.load(case / "t1w.nii.gz").get_fdata(), expected[0], rtol=1e-4, atol=1e-2)
    manifest = (tmp_path / "out" / "manifest.csv").read_text()
    assert "case7_label/confidence_flair.nii.gz" in manifest
    # A generator without maps (SAMR) under the same setting: the images alone, no confidence file.
    run(CentreAtlasSlice(), tmp_path / "plain")
    assert (tmp_path / "plain" / "case7_label" / "t1w.nii.gz").is_file()
    assert not list((tmp_path / "plain" / "case7_label").glob("confidence_*"))
