"""The CG-SAMR and SAMR MONAI bundles: train, evaluate, inference, DDP, verify_net_in_out, ckpt_export.

Every run uses the bundles' own configs with tiny overrides (a 3-patient phantom cohort of
40x40x6 voxels, 32x32 slices, narrow networks, one epoch), from the repository root as documented
(the configs' ``%`` macros name files relative to it). SAMR is an override of CG-SAMR's configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from bundle_helpers import TINY_DATA, TINY_NETWORKS, TINY_TRAINING
from monai.bundle import ckpt_export, run, verify_net_in_out

from medsynth.metrics import BRAIN_COLUMNS
from medsynth.utils.bundles import WORKFLOWS, bundle_config_files

pytestmark = [
    pytest.mark.filterwarnings("ignore:parsing config_file"),
    pytest.mark.usefixtures("from_repository_root"),
]

REPO = Path(__file__).resolve().parents[1]
TINY_NETWORK = TINY_NETWORKS["cg_samr"]
TINY_TRAIN = {**TINY_DATA, **TINY_NETWORK, **TINY_TRAINING}


def configs(bundle: str, *names: str) -> list[str]:
    return [str(REPO / "bundles" / bundle / "configs" / name) for name in names]


# What each bundle's documented commands list, per workflow.
BUNDLE_CONFIGS = {
    bundle: {workflow: bundle_config_files(REPO / "bundles" / bundle, workflow) for workflow in WORKFLOWS}
    for bundle in ("cg_samr", "samr")
}


def test_workflow_config_lists_of_a_base_and_a_derived_bundle():
    assert BUNDLE_CONFIGS["cg_samr"]["evaluate"] == configs("cg_samr", "train.json", "evaluate.json")
    assert BUNDLE_CONFIGS["samr"]["train"] == configs("cg_samr", "train.json") + configs("samr", "samr.json")
    assert BUNDLE_CONFIGS["samr"]["inference"] == configs("cg_samr", "inference.json") + configs(
        "samr", "samr.json"
    )
    assert BUNDLE_CONFIGS["samr"]["evaluate"][-1] == configs("cg_samr", "evaluate.json")[0]
    with pytest.raises(FileNotFoundError, match="not a bundle"):
        bundle_config_files(REPO / "docs")


@pytest.fixture(scope="module")
def cache_dir(tiny_phantom_cache) -> str:
    """The tiny phantom cohort's cache (conftest), under this module's usual name."""
    return tiny_phantom_cache


def _train_evaluate_infer(bundle: str, out: Path, cache_dir: str, **inference_overrides) -> Path:
    common = {
        "output_dir": str(out),
        "cache_dir": cache_dir,
        "logging_file": configs("cg_samr", "logging.conf")[0],
    }
    meta = configs(bundle, "metadata.json")[0]
    run(config_file=BUNDLE_CONFIGS[bundle]["train"], meta_file=meta, **common, **TINY_TRAIN)
    run(config_file=BUNDLE_CONFIGS[bundle]["evaluate"], meta_file=meta, **common, **TINY_TRAIN)
    run(
        config_file=BUNDLE_CONFIGS[bundle]["inference"],
        meta_file=configs(bundle, "metadata.json")[0],
        **common,
        **TINY_DATA,
        **TINY_NETWORK,
        splits="test",
        manipulation="mirror",
        **inference_overrides,
    )
    return out


def _check_outputs(out: Path, confidence: bool, manifest: pd.DataFrame) -> None:
    assert len(list((out / "checkpoints").glob("checkpoint_epoch=1.pt"))) == 1
    assert (out / "models" / "model.pt").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    samples = sorted((out / "samples").glob("*.png"))
    assert samples and all(p.stat().st_size > 1000 for p in samples)
    table = pd.read_csv(out / "metrics" / "table1_val.csv", index_col=0)
    assert list(table.columns) == ["Edema", "Cavity", "Tumor", "SSIM", "PSNR", *BRAIN_COLUMNS]
    assert list(table.index) == ["T1w", "Gd-T1w", "T2w", "FLAIR", "APTw", "Avg."]
    metrics = json.loads((out / "metrics" / "metrics.json").read_text())
    assert -1.0 <= metrics["mean_ssim"] <= 1.0 and metrics["epoch"] == 1
    assert 0 <= metrics["mean_mae_brain"] <= 255 and -1.0 <= metrics["mean_ssim_brain"] <= 1.0
    assert pd.read_csv(out / "eval" / "table1_test.csv", index_col=0).shape == (6, 8)
    cases = pd.read_csv(out / "eval" / "table1_test_cases.csv")
    assert cases["case"].tolist() == [manifest.loc[manifest["split"] == "test", "patient_id"].item()] * 5
    assert list((out / "eval" / "samples").glob("*.png"))
    # The model's atlas travels with it, and evaluation used it.
    atlas_record = json.loads((out / "models" / "atlas.json").read_text())
    assert atlas_record["kind"] == "shared" and (out / "models" / "atlas" / "atlas_t1w.nii.gz").is_file()
    evaluated = json.loads((out / "eval" / "metrics.json").read_text())
    assert evaluated["atlas"]["fingerprint"] == atlas_record["fingerprint"] and evaluated["split"] == "test"
    checkpoint = torch.load(next((out / "checkpoints").glob("*.pt")), weights_only=True)
    networks = ("generator", "discriminator", "segmenter")
    expected = {"trainer", "best_model_saver", *networks}
    expected |= {f"{name}_{kind}" for name in networks for kind in ("optimizer", "scheduler")}
    assert set(checkpoint) == expected | ({"confidence_loss"} if confidence else set())
    assert set(checkpoint["discriminator"]) and all(
        k.startswith("discriminators.") for k in checkpoint["discriminator"]
    )
    generator_keys = set(checkpoint["generator"])
    assert any(k.startswith("decoder.synthesis.") for k in generator_keys) == confidence
    assert (
        any(k.startswith("decoder.branches.0.0.conv_block") for k in generator_keys) != confidence
    )  # SAMR's branch block

    # Inference: every test patient, every sequence, in the geometry of its label map.
    [patient] = manifest.loc[manifest["split"] == "test", "patient_id"]
    label_file = manifest.loc[manifest["patient_id"] == patient, "label"].item()
    reference = nib.load(label_file)
    case = out / "inference" / patient
    for sequence in ("t1w", "gd_t1w", "t2w", "flair", "aptw", "label"):
        image = nib.load(case / f"{sequence}.nii.gz")
        assert image.shape == reference.shape
        np.testing.assert_allclose(image.affine, reference.affine, atol=1e-5)
        assert np.isfinite(image.get_fdata()).all()
    record = json.loads((case / "synthesis.json").read_text())
    assert record["manipulation"] == "mirror" and record["intensity_windows"] == "real images"
    assert record["checkpoint"].endswith("models/model.pt")
    synthesized = pd.read_csv(out / "inference" / "manifest.csv")
    assert synthesized["patient_id"].tolist() == [patient] and synthesized["split"].tolist() == ["test"]


def _manifest(cache_dir: str) -> pd.DataFrame:
    from medsynth.data.cohort import resolve_cohort

    return resolve_cohort("", cache_dir, phantom_patients=3, phantom_shape=(40, 40, 6), progress=False)


def test_cg_samr_bundle_train_evaluate_inference(tmp_path, cache_dir):
    out = _train_evaluate_infer("cg_samr", tmp_path / "cg_samr", cache_dir)
    manifest = _manifest(cache_dir)
    _check_outputs(out, confidence=True, manifest=manifest)
    _check_augment(out, cache_dir, manifest)


def _check_augment(out: Path, cache_dir: str, manifest: pd.DataFrame) -> None:
    """``medsynth augment`` on the trained bundle: the documented command, tiny sizes."""
    from medsynth.cli import main

    # The jointly trained U-Net was saved beside the generator, at the same epoch: the segmentation gate.
    assert (out / "models" / "segmenter.pt").is_file()
    tiny = [f"{k}={json.dumps(v)}" for k, v in {**TINY_DATA, **TINY_NETWORK}.items()]
    tiny += [f"cache_dir={cache_dir}", "unet_channels=[4,8,16,32,64]", "volume_margin=1.0"]
    synthetic = out / "synthetic"
    command = ["augment", "--output-dir", str(out), "--cases", "2", "--out", str(synthetic), "--seed", "5"]
    command += ["--segmentation-threshold", "0"]  # a one-epoch U-Net: the gate is measured, not strict
    assert main([*command, "--export", "nnunet", "--set", *tiny]) == 0
    summary = json.loads((synthetic / "augment_summary.json").read_text())
    assert summary["accepted"] == 2 and summary["gates"]["segmentation"]["real_training_dice"]
    cases = pd.read_csv(synthetic / "manifest.csv")
    train = set(manifest.loc[manifest["split"] == "train", "patient_id"])
    assert set(cases["source_patient"]) <= train and set(cases["split"]) == {"train"}
    provenance = json.loads((synthetic / cases["patient_id"][0] / "provenance.json").read_text())
    assert provenance["bundle"].startswith("CG-SAMR") and provenance["seed"] == 5
    assert (synthetic / cases["patient_id"][0] / "confidence_flair.nii.gz").is_file()
    assert (
        len(list((synthetic / "export_nnunet" / "Dataset501_MedsynthSynthetic" / "labelsTr").iterdir())) == 2
    )
    # The run's seed draws the cases; the training cohort (phantom and split) stays the model's.
    assert json.loads((synthetic / "augment_run.json").read_text())["seed"] == 5


def test_samr_bundle_train_evaluate_inference(tmp_path, cache_dir):
    # The optimized inference network (eager rewrites: no compile time in the test suite).
    out = _train_evaluate_infer("samr", tmp_path / "samr", cache_dir, inference_backend="eager")
    _check_outputs(out, confidence=False, manifest=_manifest(cache_dir))


@pytest.mark.parametrize("bundle", ["cg_samr", "samr"])
def test_verify_net_in_out_and_torchscript_export(tmp_path, bundle):
    meta = configs(bundle, "metadata.json")[0]
    inference = BUNDLE_CONFIGS[bundle]["inference"]
    # num_sequences given: the network check needs no dataset.
    verify_net_in_out(
        "network_def", meta_file=meta, config_file=inference, device="cpu", num_sequences=5, **TINY_NETWORK
    )

    torch.manual_seed(0)
    from medsynth.networks import CGSAMRGenerator, SAMRGenerator, SynthesisInferenceNetwork

    generator_class = CGSAMRGenerator if bundle == "cg_samr" else SAMRGenerator
    network = SynthesisInferenceNetwork(generator_class(num_sequences=5, **TINY_NETWORK)).eval()
    torch.save(network.state_dict(), tmp_path / "model.pt")
    ckpt_export(
        "network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(tmp_path / "model.pt"),
        meta_file=meta,
        config_file=inference,
        num_sequences=5,
        **TINY_NETWORK,
    )
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.rand(2, 20, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), network(x))


@pytest.mark.slow
def test_multi_gpu_config_runs_ddp_on_two_cpu_processes(tmp_path, cache_dir):
    # The fixture generated the cohort: two processes never race to create it.
    from ddp_helpers import run_ddp

    out = tmp_path / "ddp"
    overrides = {"output_dir": str(out), "cache_dir": cache_dir, **TINY_TRAIN, "num_epochs": 2}
    run_ddp(configs("cg_samr", "train.json", "multi_gpu_train.json"), overrides, port=29517)
    # Rank 0 alone writes checkpoints, tables and grids.
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == [
        "checkpoint_epoch=1.pt",
        "checkpoint_epoch=2.pt",
    ]
    assert json.loads((out / "metrics" / "metrics.json").read_text())["epoch"] == 2
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [
        "epoch_0001_sample_0.png",
        "epoch_0001_sample_1.png",
        "epoch_0002_sample_0.png",
        "epoch_0002_sample_1.png",
    ]
    checkpoint = torch.load(out / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 2 * checkpoint["trainer"]["epoch_length"]
    assert not any(key.startswith("module.") for key in checkpoint["generator"])


def test_a_trained_model_scores_every_case_of_another_cohort_with_its_own_atlas(tmp_path, cache_dir):
    """Train on phantom cohort A; evaluate and synthesize on phantom cohort B (another seed, its own
    atlas): every case of B is scored, with A's atlas, and nothing is re-split or rebuilt."""
    from medsynth.cli import main
    from medsynth.data.atlas import atlas_fingerprint, find_atlas_files

    out = tmp_path / "model"
    common = {"output_dir": str(out), "cache_dir": cache_dir}
    run(config_file=BUNDLE_CONFIGS["cg_samr"]["train"], **common, **TINY_TRAIN)
    other = tmp_path / "cohort_b"
    assert (
        main(["phantom", "--out", str(other), "--patients", "4", "--seed", "5", "--shape", "40", "40", "6"])
        == 0
    )
    b_manifest = pd.read_csv(other / "manifest.csv")
    b_atlas = atlas_fingerprint(find_atlas_files(other / "atlas"))
    model_atlas = json.loads((out / "models" / "atlas.json").read_text())["fingerprint"]
    assert b_atlas != model_atlas  # a different cohort's atlas: using it would be a different model input

    assert (
        main(
            [
                "evaluate",
                "--bundle",
                str(REPO / "bundles" / "cg_samr"),
                "--output-dir",
                str(out),
                "--dataset-dir",
                str(other),
                "--set",
                f"cache_dir={cache_dir}",
                *[f"{k}={json.dumps(v)}" for k, v in TINY_TRAIN.items()],
            ]
        )
        == 0
    )
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "all" and metrics["atlas"]["fingerprint"] == model_atlas
    assert metrics["cases"] == len(b_manifest) == 4
    cases = pd.read_csv(out / "eval" / "table1_all_cases.csv")
    assert sorted(cases["case"].unique()) == sorted(b_manifest["patient_id"])
    # The table is the per-case rows recomputed (any table can be rebuilt, or bootstrapped, from them).
    from medsynth.metrics import table_from_cases

    table = pd.read_csv(out / "eval" / "table1_all.csv", index_col=0)
    recomputed = table_from_cases(
        cases, ["t1w", "gd_t1w", "t2w", "flair", "aptw"], ["Edema", "Cavity", "Tumor"]
    )
    np.testing.assert_allclose(recomputed.to_numpy(dtype=float), table.to_numpy(dtype=float), rtol=1e-6)
    grids = sorted(path.name for path in (out / "eval" / "samples").glob("*.png"))
    assert grids and all(name.startswith("all_split_sample_") for name in grids)

    # Inference on B uses the model's atlas too; without it (a model folder with no atlas) it refuses.
    run(
        config_file=BUNDLE_CONFIGS["cg_samr"]["inference"],
        **common,
        **TINY_DATA,
        **TINY_NETWORK,
        dataset_dir=str(other),
        inference_dir=str(tmp_path / "synth_b"),
    )
    synthesized = pd.read_csv(tmp_path / "synth_b" / "manifest.csv")
    assert len(synthesized) == 4
    used = {(tmp_path / "synth_b" / p).resolve() for p in synthesized["atlas_t1w"]}
    assert used == {(out / "models" / "atlas" / "atlas_t1w.nii.gz").resolve()}
    (out / "models" / "atlas.json").unlink()
    with pytest.raises(Exception) as raised:
        run(
            config_file=BUNDLE_CONFIGS["cg_samr"]["inference"],
            **common,
            **TINY_DATA,
            **TINY_NETWORK,
            dataset_dir=str(other),
            inference_dir=str(tmp_path / "synth_c"),
        )
    causes, error = [], raised.value
    while error is not None:
        causes.append(str(error))
        error = error.__cause__
    assert any("no model atlas" in cause and "atlas='cohort'" in cause for cause in causes), causes


def test_yes_no_settings_from_the_command_line_mean_what_they_say():
    from medsynth.engines import ResumeCheckpointLoader
    from medsynth.utils.bundles import as_flag

    # `monai.bundle run --resume false` passes the string "false" (fire), which Python reads as true.
    assert [as_flag(v) for v in ("false", "False", "0", "no", False, 0)] == [False] * 6
    assert [as_flag(v) for v in ("true", "TRUE", "1", "yes", True, 1)] == [True] * 6
    with pytest.raises(ValueError, match="resume must be true or false"):
        as_flag("maybe", "resume")
    assert ResumeCheckpointLoader("x", {}, enabled="false").enabled is False
