"""Synthetic cohorts: the mask gate's reasons, each image gate on a case built to fail it, the
builder end to end on a tiny phantom (training sources only, provenance, confidence maps, a cohort
that validates, determinism), the kill / rerun cycle, and the nnU-Net and BraTS exports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from medsynth.constants import CAVITY, EDEMA, NORMAL_BRAIN, TUMOR
from medsynth.data.cohort import preprocessing_fingerprint, require_same_preprocessing, resolve_cohort
from medsynth.data.manifest import read_manifest, sequences_of
from medsynth.inference import SliceStackInferer, synthesis_preprocessing
from medsynth.networks import CGSAMRGenerator, SynthesisInferenceNetwork, make_lesion_unet
from medsynth.synthetic import (
    IntensityGate,
    LesionMaskPlausibility,
    LesionMaskPlausibilityd,
    LesionVolumeRange,
    MemorisationGate,
    SegmentationConsistencyGate,
    SyntheticCohortBuilder,
    TrainingSliceBank,
    export_brats,
    export_nnunet,
    training_sources,
)
from medsynth.synthetic.augment import STATE_DIRNAME, SUMMARY_NAME

SHAPE = (40, 40, 6)


# -- the mask gate -------------------------------------------------------------------------------
def _brain(shape=(40, 40, 8)) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    return (grid[0] ** 2 + grid[1] ** 2) < 0.8


def _lesion_map(brain: np.ndarray, centre=(12, 20), radius=5, core=2) -> np.ndarray:
    """Edema discs (slices 1..6) around a tumour core (slices 2..5, a cavity line in it) at ``centre``."""
    label = brain.astype(np.int16) * NORMAL_BRAIN
    x, y = np.ogrid[: brain.shape[0], : brain.shape[1]]
    distance = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2)
    for z in range(1, 7):
        label[..., z][(distance <= radius) & brain[..., z]] = EDEMA
    for z in range(2, 6):
        label[..., z][distance <= core + 0.5] = TUMOR
        label[centre[0], centre[1], z] = CAVITY
    return label


def test_a_plausible_mask_passes_and_each_implausible_one_names_its_reason(tmp_path):
    brain = _brain()
    source = _lesion_map(brain)
    validator = LesionMaskPlausibility(min_component_voxels=10)
    assert validator(source, brain, source_label=source).accepted

    outside = source.copy()
    outside[0, 0, 0] = EDEMA  # a corner outside the brain
    assert validator(outside, brain).reason == "outside_brain"

    bare_core = brain.astype(np.int16)  # a tumour in normal brain, no edema around it
    bare_core[10:15, 18:23, 2:6] = TUMOR
    verdict = validator(bare_core, brain)
    assert verdict.reason == "not_nested" and verdict.measures["core_exposure"] > 0.5
    # Real masks (BraTS) carry stray core voxels and partly exposed cores: a source's own exposure
    # (plus the margin) is allowed, and components under min_component_voxels are the sliver rule's.
    speckled = source.copy()
    speckled[30, 20, 3] = TUMOR  # one core voxel in normal brain
    assert validator.core_exposure(speckled) == validator.core_exposure(source)
    half_bare = source.copy()
    half_bare[..., 2:6][(half_bare[..., 2:6] == EDEMA) & (np.arange(40)[:, None, None] < 12)] = NORMAL_BRAIN
    exposure = validator.core_exposure(half_bare)
    assert 0.0 < exposure <= 0.5 and validator.core_exposure(bare_core) > 0.5
    assert validator(bare_core, brain, source_label=half_bare).reason == "not_nested"  # more exposed
    assert validator(half_bare, brain, source_label=half_bare).accepted
    loose = LesionMaskPlausibility(min_component_voxels=10, max_core_exposure=0.0)
    verdict = loose(half_bare, brain, source_label=half_bare)
    assert verdict.accepted and verdict.measures["source_core_exposure"] == exposure
    assert loose(half_bare, brain, source_label=source).reason == "not_nested"

    sliver = source.copy()
    sliver[28, 20, 3] = EDEMA  # a one-voxel island the source did not have
    verdict = validator(sliver, brain, source_label=source)
    assert verdict.reason == "sliver" and "the source had 0" in verdict.detail
    # The same islands in the source are its own: not the manipulation's doing.
    assert validator(sliver, brain, source_label=sliver).accepted

    paths = []
    for k, radius in enumerate((4, 5, 6)):
        path = tmp_path / f"train{k}.nii.gz"
        nib.save(
            nib.Nifti1Image(_lesion_map(brain, radius=radius).astype(np.uint8), np.diag([2, 2, 3, 1.0])), path
        )
        paths.append(path)
    volume_range = LesionVolumeRange.from_label_files(paths, margin=0.1)
    assert volume_range.patients == 3
    ranged = LesionMaskPlausibility(volume_range, min_component_voxels=10)
    assert ranged(source, brain, voxel_volume=12.0).accepted
    huge = _lesion_map(brain, radius=11)
    verdict = ranged(huge, brain, voxel_volume=12.0)
    assert verdict.reason == "volume_out_of_range" and "mm³" in verdict.detail

    mirrored_across = _lesion_map(brain, centre=(20, 20), radius=7)  # straddles the midline x = 19.5
    verdict = validator(mirrored_across, brain, source_label=source)
    assert verdict.reason == "crosses_midline"
    assert validator(mirrored_across, brain, source_label=mirrored_across).accepted  # the source did too


def test_real_brats_masks_pass_the_mask_gate_against_themselves(brats_dir, tmp_path):
    manifest = resolve_cohort(str(brats_dir), tmp_path / "cache", progress=False)
    validator = LesionMaskPlausibility()
    for _, row in manifest.iterrows():
        label = nib.load(row["label"]).get_fdata()
        verdict = validator(label, nib.load(row["brain_mask"]).get_fdata(), source_label=label)
        assert verdict.accepted, (row["patient_id"], verdict.reason, verdict.detail)


def test_the_dictionary_form_reads_the_voxel_volume_from_the_affine():
    brain = _brain()
    label = MetaTensor(
        torch.as_tensor(_lesion_map(brain))[None], affine=torch.diag(torch.tensor([2.0, 2, 3, 1]))
    )
    out = LesionMaskPlausibilityd("label", validator=LesionMaskPlausibility(min_component_voxels=10))(
        {"label": label, "brain_mask": torch.as_tensor(brain)[None]}
    )
    verdict = out["label_plausibility"]
    assert verdict["accepted"]
    assert verdict["volumes_mm3"]["lesion"] == pytest.approx(
        12.0 * np.isin(_lesion_map(brain), (2, 3, 4)).sum()
    )


# -- the image gates -----------------------------------------------------------------------------
class ThresholdSegmenter(nn.Module):
    """Edema where channel 0 is above 0.5, else normal brain: a segmenter whose answer is known."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros((x.shape[0], 5, *x.shape[2:])) + self.anchor
        logits[:, NORMAL_BRAIN] = 0.5
        logits[:, EDEMA] = x[:, 0]
        return logits


def _case(label: torch.Tensor, lesion_value: float = 1.0) -> torch.Tensor:
    images = torch.full((3, *label.shape), -0.5)
    images[0][label >= EDEMA] = lesion_value
    return images


def test_the_segmentation_gate_fails_a_case_whose_lesion_is_not_found():
    label = torch.as_tensor(_lesion_map(_brain())).long()
    gate = SegmentationConsistencyGate(ThresholdSegmenter(), threshold=0.95)
    found = gate(_case(label), label, label > 0)
    assert found.passed and found.score == pytest.approx(1.0)
    lost = gate(_case(label, lesion_value=-1.0), label, label > 0)  # the lesion is invisible
    assert not lost.passed and lost.score == 0.0 and "< 0.950" in lost.detail
    auto = SegmentationConsistencyGate(ThresholdSegmenter(), threshold="auto", auto_fraction=0.9)
    with pytest.raises(RuntimeError, match="calibrate"):
        auto(_case(label), label, label > 0)
    assert auto.calibrate([(_case(label), label)]) == pytest.approx(1.0)
    assert auto.threshold == pytest.approx(0.9)


def test_the_memorisation_gate_refuses_or_flags_a_copy_of_a_training_patient():
    torch.manual_seed(0)
    brain = torch.as_tensor(_brain()).float()
    volumes = [(f"p{k}", torch.rand((3, *brain.shape)) * 2 - 1, brain) for k in range(2)]
    bank = TrainingSliceBank.from_volumes(volumes, size=16)
    assert len(bank.patients) == 2 * brain.shape[-1]
    label = torch.as_tensor(_lesion_map(_brain())).long()
    copy = volumes[1][1].clone()
    copy[..., 4] += 0.01  # one slice touched: still a copy
    refused = MemorisationGate(bank, threshold=0.03)(copy, label, brain)
    assert not refused.passed and refused.flagged and refused.measures["nearest_patient"] == "p1"
    flagged = MemorisationGate(bank, threshold=0.03, action="flag")(copy, label, brain)
    assert flagged.passed and flagged.flagged
    new = MemorisationGate(bank, threshold=0.03)(torch.rand_like(copy) * 2 - 1, label, brain)
    assert new.passed and not new.flagged and new.score > 0.03
    # Only the slices a manipulation changed are compared: a copied slice outside them is the
    # source's own anatomy, a copied slice inside them is memorisation.
    partly = torch.rand_like(copy) * 2 - 1
    partly[..., 3] = volumes[0][1][..., 3]
    changed = torch.zeros(brain.shape[-1], dtype=torch.bool)
    changed[5:7] = True
    assert MemorisationGate(bank, threshold=0.03)(partly, label, brain, changed).passed
    changed[3] = True
    refused = MemorisationGate(bank, threshold=0.03)(partly, label, brain, changed)
    assert not refused.passed and refused.measures["nearest_patient"] == "p0"
    nothing = MemorisationGate(bank, threshold=0.03)(copy, label, brain, torch.zeros_like(changed))
    assert nothing.passed and "no changed" in nothing.detail
    between = bank.between_patients()  # each real slice to the other patient's nearest: never 0 here
    assert between.shape == (len(bank.patients),) and bool((between > 0.03).all())


def test_the_intensity_gate_fails_nan_and_values_outside_the_training_windows():
    gate = IntensityGate.from_windows(torch.tensor([[[0.0, 100.0]], [[10.0, 120.0]]]), margin=0.1)
    brain = torch.ones((1, 4, 4, 2))
    assert gate(torch.full((1, 4, 4, 2), 50.0), None, brain).passed
    nan = torch.full((1, 4, 4, 2), 50.0)
    nan[0, 0, 0, 0] = float("nan")
    assert not gate(nan, None, brain).passed
    high = torch.full((1, 4, 4, 2), 50.0)
    high[0, :2] = 500.0  # far above 120 + 10 %
    result = gate(high, None, brain)
    assert not result.passed and result.score == pytest.approx(0.5)


# -- the builder ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> pd.DataFrame:
    cache = tmp_path_factory.mktemp("cache")
    return resolve_cohort("", cache, phantom_patients=6, phantom_shape=SHAPE, progress=False)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, cohort) -> dict:
    """An untrained CG-SAMR generator and U-Net, saved as a training run would save them."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    sequences = sequences_of(cohort)
    network = _network(len(sequences))
    torch.save(network.state_dict(), folder / "model.pt")
    segmenter = make_lesion_unet(len(sequences), channels=(4, 8, 16, 32, 64))
    torch.save(segmenter.state_dict(), folder / "segmenter.pt")
    return {"model": str(folder / "model.pt"), "segmenter": str(folder / "segmenter.pt")}


def _network(num_sequences: int) -> SynthesisInferenceNetwork:
    generator = CGSAMRGenerator(num_sequences, base_width=4, num_downsampling=2, num_res_blocks=1)
    return SynthesisInferenceNetwork(generator, with_confidence=True)


def _builder(cohort, weights, out, num_cases=3, **kwargs) -> SyntheticCohortBuilder:
    sequences = list(sequences_of(cohort))
    settings = {
        "segmentation_threshold": 0.0,  # an untrained U-Net: the gate is measured, not strict
        "min_component_voxels": 3,
        "volume_margin": 1.0,
        "progress": False,
        **kwargs,
    }
    return SyntheticCohortBuilder(
        cohort,
        sequences,
        _network(len(sequences)),
        synthesis_preprocessing(sequences, 32),
        SliceStackInferer(batch_size=8),
        str(out),
        num_cases=num_cases,
        seed=3,
        ckpt_path=weights["model"],
        image_size=32,
        segmenter=make_lesion_unet(len(sequences), channels=(4, 8, 16, 32, 64)),
        segmenter_path=weights["segmenter"],
        bundle="test",
        **settings,
    )


def test_a_synthetic_cohort_has_gated_cases_with_provenance_and_reads_as_a_cohort(tmp_path, cohort, weights):
    out = tmp_path / "synthetic"
    summary = _builder(cohort, weights, out).run()
    assert summary["accepted"] == 3
    assert summary["candidates"] == 3 + sum(summary["rejected"].values())
    assert set(summary["gates"]) == {"segmentation", "memorisation", "intensity"}
    assert (out / SUMMARY_NAME).is_file() and (out / "contact_sheet.png").stat().st_size > 5000

    train = set(cohort.loc[cohort["split"] == "train", "patient_id"])
    manifest = read_manifest(out / "manifest.csv")
    assert len(manifest) == 3 and set(manifest["split"]) == {"train"}
    assert set(manifest["source_patient"]) <= train
    for _, row in manifest.iterrows():
        case = Path(row["label"]).parent
        provenance = json.loads((case / "provenance.json").read_text())
        assert provenance["source_patient"] == row["source_patient"] and provenance["source_split"] == "train"
        assert provenance["checkpoint"]["sha256"] and provenance["segmenter"]["sha256"]
        assert provenance["medsynth_version"] and provenance["seed"] == 3
        requested = provenance["manipulation"]["requested"]
        assert requested["operations"] and len(provenance["manipulation"]["achieved"]) == len(
            requested["operations"]
        )
        assert requested["donor"] is None or requested["donor"] in train
        assert set(provenance["gates"]) == {"segmentation", "memorisation", "intensity"}
        reference = nib.load(row["label"])
        source_label = nib.load(cohort.set_index("patient_id").loc[row["source_patient"], "label"])
        assert reference.shape == source_label.shape
        np.testing.assert_allclose(reference.affine, source_label.affine, atol=1e-5)
        assert not np.array_equal(reference.get_fdata(), source_label.get_fdata())  # it was manipulated
        for sequence in sequences_of(cohort):
            confidence = nib.load(row[f"confidence_{sequence}"]).get_fdata()
            assert confidence.shape == reference.shape and 0.0 <= confidence.min() <= confidence.max() <= 1.0
            assert np.isfinite(nib.load(row[sequence]).get_fdata()).all()
    # The folder is a cohort the data layer validates and every bundle reads.
    again = resolve_cohort(str(out), tmp_path / "cache", progress=False)
    assert sorted(again["patient_id"]) == sorted(manifest["patient_id"])

    # Deterministic for a seed: another folder, the same cases.
    twin = tmp_path / "twin"
    _builder(cohort, weights, twin).run()
    twin_manifest = read_manifest(twin / "manifest.csv")
    assert twin_manifest["patient_id"].tolist() == manifest["patient_id"].tolist()
    for name in manifest["patient_id"]:
        np.testing.assert_array_equal(
            nib.load(out / name / "label.nii.gz").get_fdata(),
            nib.load(twin / name / "label.nii.gz").get_fdata(),
        )
        np.testing.assert_allclose(
            nib.load(out / name / "t1w.nii.gz").get_fdata(),
            nib.load(twin / name / "t1w.nii.gz").get_fdata(),
            atol=1e-4,
        )
    # One folder, one model and one set of settings.
    with pytest.raises(ValueError, match="another settings"):
        _builder(cohort, weights, out, memorisation_threshold=0.5).run()


def test_a_killed_run_continues_without_redoing_finished_cases(tmp_path, cohort, weights, monkeypatch):
    out = tmp_path / "synthetic"
    builder = _builder(cohort, weights, out, num_cases=3)
    original = SyntheticCohortBuilder._write_case
    written = []

    def dies_on_the_second_case(self, case, *args):
        if written:
            raise KeyboardInterrupt  # the run is killed while synthesising its second case
        written.append(case)
        return original(self, case, *args)

    monkeypatch.setattr(SyntheticCohortBuilder, "_write_case", dies_on_the_second_case)
    with pytest.raises(KeyboardInterrupt):
        builder.run()
    monkeypatch.setattr(SyntheticCohortBuilder, "_write_case", original)
    [first] = written
    state = out / STATE_DIRNAME / f"{first}.json"
    finished_at = state.stat().st_mtime_ns
    assert read_manifest(out / "manifest.csv")["patient_id"].tolist() == [first]
    cases = [p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert cases == [first]  # nothing half-written beside it

    summary = _builder(cohort, weights, out, num_cases=3).run()
    assert summary["accepted"] == 3 and state.stat().st_mtime_ns == finished_at
    uninterrupted = tmp_path / "uninterrupted"
    _builder(cohort, weights, uninterrupted, num_cases=3).run()
    assert (
        read_manifest(out / "manifest.csv")["patient_id"].tolist()
        == read_manifest(uninterrupted / "manifest.csv")["patient_id"].tolist()
    )


def test_validation_and_test_patients_are_never_sources(cohort, tmp_path, weights):
    test_patient = cohort.loc[cohort["split"] == "test", "patient_id"].iloc[0]
    train_patient = cohort.loc[cohort["split"] == "train", "patient_id"].iloc[0]
    with pytest.raises(ValueError, match=f"{test_patient} \\(test\\)"):
        _builder(cohort, weights, tmp_path / "leak", source_patients=[train_patient, test_patient])
    # A patient planted in the training split as well as the test split is refused outright.
    planted = pd.concat([cohort, cohort[cohort["patient_id"] == test_patient].assign(split="train")])
    with pytest.raises(ValueError, match=test_patient):
        training_sources(planted)
    sources = training_sources(cohort)
    assert set(sources["split"]) == {"train"} and test_patient not in sources.index


def test_exports_nnunet_layout_and_a_brats_folder_the_brats_adapter_reads_back(tmp_path, cohort, weights):
    out = tmp_path / "synthetic"
    _builder(cohort, weights, out, num_cases=2).run()
    manifest = read_manifest(out / "manifest.csv")
    sequences = list(sequences_of(manifest))
    train = cohort[cohort["split"] == "train"]

    dataset = export_nnunet(manifest, tmp_path / "nnunet_raw", 502, "Synth", real=cohort)
    assert dataset.name == "Dataset502_Synth"
    description = json.loads((dataset / "dataset.json").read_text())
    assert description["channel_names"] == {"0": "T1w", "1": "Gd-T1w", "2": "T2w", "3": "FLAIR", "4": "APTw"}
    assert description["labels"] == {"background": 0, "edema": 1, "cavity": 2, "tumor": 3}
    cases = [*manifest["patient_id"], *train["patient_id"]]
    assert description["numTraining"] == len(cases) and description["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == sorted(f"{c}.nii.gz" for c in cases)
    images = sorted(p.name for p in (dataset / "imagesTr").iterdir())
    assert images == sorted(f"{c}_{k:04d}.nii.gz" for c in cases for k in range(len(sequences)))
    label = nib.load(dataset / "labelsTr" / f"{manifest['patient_id'][0]}.nii.gz").get_fdata()
    source = nib.load(manifest["label"][0]).get_fdata()
    assert set(np.unique(label)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(label == 3, source == TUMOR)
    np.testing.assert_array_equal(label == 0, source <= NORMAL_BRAIN)
    try:
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    except ImportError:
        pass  # nnunetv2 not installed (extra "nnunet"): the layout checks above stand
    else:
        verify_dataset_integrity(str(dataset), num_processes=1)  # raises on any problem

    brats = export_brats(manifest, tmp_path / "brats")
    [first] = [p for p in brats.iterdir() if p.name == manifest["patient_id"][0]]
    assert sorted(p.name for p in first.iterdir()) == sorted(
        f"{first.name}_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair", "apt", "seg")
    )
    assert set(np.unique(nib.load(first / f"{first.name}_seg.nii.gz").get_fdata())) <= {0, 1, 2, 4}
    read_back = resolve_cohort(str(brats), tmp_path / "cache", label_convention="brats", progress=False)
    for _, row in read_back.iterrows():
        original = nib.load(manifest.set_index("patient_id").loc[row["patient_id"], "label"]).get_fdata()
        np.testing.assert_array_equal(nib.load(row["label"]).get_fdata(), original)


def test_cohorts_preprocessed_differently_are_not_mixed(tmp_path):
    assert preprocessing_fingerprint("") is None and preprocessing_fingerprint(tmp_path) is None
    for name, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "nyul_landmarks.json").write_text(json.dumps({"t1w": [0.0, value, 100.0]}))
    a, b = preprocessing_fingerprint(tmp_path / "a"), preprocessing_fingerprint(tmp_path / "b")
    assert a["digest"] != b["digest"]
    require_same_preprocessing({"a": a, "a again": dict(a), "phantom": None})
    with pytest.raises(ValueError, match="preprocessed differently"):
        require_same_preprocessing({"a": a, "b": b})
    os.makedirs(tmp_path / "synthetic")
    (tmp_path / "synthetic" / "preprocessing_fingerprint.json").write_text(json.dumps(a))
    assert preprocessing_fingerprint(tmp_path / "synthetic") == a


def test_dask_workers_make_the_same_cases_as_one_process(tmp_path, cohort, weights):
    single = tmp_path / "single"
    _builder(cohort, weights, single, num_cases=2).run()
    parallel = tmp_path / "parallel"
    summary = _builder(cohort, weights, parallel, num_cases=2, workers=2).run()
    assert summary["accepted"] == 2
    names = read_manifest(single / "manifest.csv")["patient_id"].tolist()
    assert read_manifest(parallel / "manifest.csv")["patient_id"].tolist() == names
    for name in names:
        np.testing.assert_array_equal(
            nib.load(single / name / "label.nii.gz").get_fdata(),
            nib.load(parallel / name / "label.nii.gz").get_fdata(),
        )


def test_the_inference_network_returns_confidence_maps_only_where_the_generator_has_them():
    from medsynth.networks import SAMRGenerator

    x = torch.randn(2, 5 + 3 * 2, 32, 32)
    cg = SynthesisInferenceNetwork(CGSAMRGenerator(2, base_width=4, num_res_blocks=1), with_confidence=True)
    out = cg.eval()(x)
    assert out.shape == (2, 4, 32, 32) and bool(((out[:, 2:] > 0) & (out[:, 2:] < 1)).all())
    torch.testing.assert_close(out[:, :2], SynthesisInferenceNetwork(cg.generator)(x))  # the same weights
    samr = SynthesisInferenceNetwork(SAMRGenerator(2, base_width=4, num_res_blocks=1), with_confidence=True)
    assert samr.eval()(x).shape == (2, 2, 32, 32)


def test_the_cli_finds_an_input_problem_that_monai_wrapped():
    from medsynth.utils.errors import input_problem_in

    try:
        try:
            raise FileNotFoundError("weights not found: models/segmenter.pt (retrain ...)")
        except FileNotFoundError as cause:
            raise RuntimeError("Failed to evaluate ConfigExpression") from cause
    except RuntimeError as wrapped:
        assert "segmenter.pt" in str(input_problem_in(wrapped))
    assert input_problem_in(RuntimeError("a bug, not the user's input")) is None


def test_the_confidence_weighted_arm_trains_on_synthetic_voxels_weighted_by_their_confidence(
    tmp_path, cohort, weights, monkeypatch
):
    from monai.bundle import run

    from medsynth.data.dataset import make_slice_dataset
    from medsynth.data.mixing import training_mixture
    from medsynth.engines import PrepareBatchWithWeights
    from medsynth.losses import VoxelWeightedDiceCELoss

    out = tmp_path / "synthetic"
    _builder(cohort, weights, out, num_cases=2).run()
    cache = tmp_path / "cache"
    real = make_slice_dataset(cohort, "train", 32, progress=False)
    mixture = training_mixture(
        real, str(out), percent=50, confidence_weighted=True, image_size=32, cache_dir=str(cache)
    )
    dataset = mixture["dataset"]
    assert torch.equal(dataset[0]["weight"], torch.ones(1, 32, 32))
    synthetic = make_slice_dataset(
        resolve_cohort(str(out), cache, progress=False), "train", 32, with_confidence=True, progress=False
    )
    first = synthetic[0]
    assert first["confidence"].shape == (len(synthetic.sequences), 32, 32)
    weight = dataset[len(real)]["weight"]
    torch.testing.assert_close(weight, first["confidence"].mean(0, keepdim=True))
    assert 0.0 <= weight.min() and weight.max() <= 1.0 and weight.min() < 1.0

    batch = torch.utils.data.default_collate([dataset[i] for i in (0, len(real), len(real) + 1)])
    image, target = PrepareBatchWithWeights()(batch)
    assert target.shape == (3, 2, 32, 32) and torch.equal(target[:, :1], batch["label"].float())
    scores = torch.randn(3, 5, 32, 32, requires_grad=True)
    VoxelWeightedDiceCELoss()(scores, target).backward()
    assert torch.isfinite(scores.grad).all()
    with pytest.raises(ValueError, match="needs a synthetic cohort"):
        training_mixture(real, confidence_weighted=True, percent=50, classic=True)

    # The bundle's arm: one epoch of lesion_seg on the weighted mixture.
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    configs = repo / "bundles" / "lesion_seg" / "configs"
    run_dir = tmp_path / "lesion"
    run(
        config_file=str(configs / "train.json"),
        meta_file=str(configs / "metadata.json"),
        output_dir=str(run_dir),
        cache_dir=str(cache),
        phantom_patients=6,
        phantom_shape=list(SHAPE),
        image_size=32,
        unet_channels=[4, 8, 16, 32, 64],
        batch_size=8,
        num_epochs=1,
        val_interval=1,
        synthetic_dir=str(out),
        synthetic_percent=50,
        confidence_weighting=True,
    )
    assert (run_dir / "checkpoints" / "checkpoint_epoch=1.pt").is_file()
