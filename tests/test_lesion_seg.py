"""The lesion-segmentation bundle and the mixing of real and extra instances: exact amounts, the
order of the modes, classic augmentation, and the bundle's train / evaluate / inference on a tiny
phantom (per-patient metrics, label maps in the input geometry)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import run
from torch.utils.data import Dataset

from medsynth.data.cohort import resolve_cohort
from medsynth.data.mixing import (
    AugmentedCopies,
    MixedDataset,
    MixingSampler,
    synthetic_count,
    training_mixture,
)

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file")

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "phantom_patients": 4,
    "phantom_shape": [48, 48, 6],
    "image_size": 32,
    "unet_channels": [4, 8, 16, 32, 64],
    "batch_size": 8,
}


class Items(Dataset):
    def __init__(self, count: int, value: float):
        self.count, self.value = count, value

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        image = torch.full((2, 16, 16), self.value)
        label = torch.zeros((1, 16, 16), dtype=torch.long)
        label[0, 4:8, 4:10] = 2
        return {"image": image, "label": label, "patient_id": f"p{index}", "extra": 1}


def test_amounts_follow_the_papers_percentages_and_qus_multiples():
    assert synthetic_count(1080, percent=50) == 1080 and synthetic_count(1080, percent=25) == 540
    assert synthetic_count(100, multiple=0.2) == 20 and synthetic_count(100, multiple=3) == 300
    assert synthetic_count(100, percent=0) == 0
    with pytest.raises(ValueError, match="exactly one"):
        synthetic_count(100, percent=50, multiple=1)
    with pytest.raises(ValueError, match="exactly one"):
        synthetic_count(100)


@pytest.mark.parametrize("extra_count", [3, 25])  # fewer than the pool, and more (drawn again)
def test_every_epoch_holds_all_real_instances_and_the_exact_extra_amount(extra_count):
    dataset = MixedDataset(Items(10, 0.0), Items(8, 1.0))
    sampler = MixingSampler(dataset, extra_count, "random", num_epochs=3, seed=4)
    assert len(sampler) == 10 + extra_count
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        real = sorted(i for i in indices if i < 10)
        extra = [i for i in indices if i >= 10]
        assert real == list(range(10)) and len(extra) == extra_count
        assert all(10 <= i < 18 for i in extra)
        if extra_count <= 8:
            assert len(set(extra)) == extra_count  # without replacement while the pool lasts
    sampler.set_epoch(1)
    again = MixingSampler(dataset, extra_count, "random", num_epochs=3, seed=4)
    again.set_epoch(1)
    assert list(again) == list(sampler)  # deterministic for a seed
    assert dataset[0]["source"] == "real" and dataset[12]["source"] == "synthetic"
    assert "extra" not in dataset[0]  # only the shared keys, so batches collate


@pytest.mark.parametrize("mode", ["synthetic_first", "real_first"])
def test_ordered_modes_put_one_source_before_the_other_with_steps_in_proportion(mode):
    dataset = MixedDataset(Items(10, 0.0), Items(8, 1.0))
    epochs = 4
    ordered = MixingSampler(dataset, 5, mode, num_epochs=epochs, seed=1)
    stream = []
    for epoch in range(epochs):
        ordered.set_epoch(epoch)
        stream += list(ordered)
    is_extra = np.array(stream) >= 10
    first_is_extra = mode == "synthetic_first"
    switch = int(np.argmin(is_extra) if first_is_extra else np.argmax(is_extra))
    assert is_extra[:switch].all() == first_is_extra and (is_extra[switch:] != first_is_extra).all()
    assert is_extra.sum() == epochs * 5 and (~is_extra).sum() == epochs * 10  # 5 : 10 of the steps
    random = MixingSampler(dataset, 5, "random", num_epochs=epochs, seed=1)
    assert sorted(stream) == sorted(random.run_order().tolist())  # the same draws, reordered


def test_a_share_of_the_real_instances_with_the_extra_amount_counted_on_the_whole_real_set():
    """Qu et al.'s Table 2 arms with less real data: 0.1R real + 1R extra, and extra alone."""
    real = Items(20, 0.5)
    mixture = training_mixture(real, classic=True, multiple=1.0, real_fraction=0.1, seed=3)
    assert mixture["dataset"].real_size == 2 and mixture["extra_count"] == 20
    again = training_mixture(real, classic=True, multiple=1.0, real_fraction=0.1, seed=3)
    assert list(again["dataset"].real.indices) == list(mixture["dataset"].real.indices)
    alone = training_mixture(real, classic=True, multiple=0.5, real_fraction=0.0)
    sources = [alone["dataset"][i]["source"] for i in alone["sampler"]]
    assert len(sources) == 10 and set(sources) == {"classic_augmentation"}
    with pytest.raises(ValueError, match="no training instance"):
        training_mixture(real, real_fraction=0.0)
    with pytest.raises(ValueError, match="real_fraction must be in 0..1"):
        training_mixture(real, real_fraction=1.5)


def test_classic_augmentation_copies_are_deterministic_per_index_and_keep_label_values():
    copies = AugmentedCopies(Items(3, 0.5), count=7, seed=2)
    assert len(copies) == 7
    first, again = copies[5], copies[5]
    torch.testing.assert_close(first["image"], again["image"])
    assert first["image"].shape == (2, 16, 16) and set(first["label"].unique().tolist()) <= {0, 2}
    assert type(first["image"]) is torch.Tensor  # plain, like the real items, so mixed batches collate
    changed = [not torch.equal(copies[i]["label"], Items(3, 0.5)[0]["label"]) for i in range(7)]
    assert any(changed)  # the copies are augmented, not repeated


def test_a_synthetic_cohort_joins_the_real_training_instances(tmp_path):
    from medsynth.data.dataset import make_slice_dataset

    cache = tmp_path / "cache"
    real_manifest = resolve_cohort("", cache, phantom_patients=4, phantom_shape=(48, 48, 6), progress=False)
    other = resolve_cohort("", cache, seed=7, phantom_patients=4, phantom_shape=(48, 48, 6), progress=False)
    real = make_slice_dataset(real_manifest, "train", 32, progress=False)
    other_dir = str(Path(other["label"].iloc[0]).parents[1])  # a ready cohort folder stands in
    mixture = training_mixture(real, other_dir, percent=25, cache_dir=str(cache), image_size=32)
    assert mixture["extra_count"] == round(len(real) / 2)
    assert len(mixture["sampler"]) == len(real) + mixture["extra_count"]
    item = mixture["dataset"][len(real)]
    assert item["source"] == "synthetic" and item["image"].shape[-2:] == (32, 32)
    plain = training_mixture(real)
    assert plain["extra_count"] == 0 and len(plain["sampler"]) == len(real)
    with pytest.raises(ValueError, match="not both"):
        training_mixture(real, other_dir, percent=25, classic=True)


@pytest.fixture(autouse=True)
def _from_the_repository_root(monkeypatch):
    monkeypatch.chdir(REPO)


def _configs(*names: str) -> list[str]:
    return [str(REPO / "bundles" / "lesion_seg" / "configs" / name) for name in names]


def test_lesion_seg_bundle_trains_evaluates_per_patient_and_segments_in_the_input_geometry(tmp_path):
    common = {"output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), **TINY}
    meta = _configs("metadata.json")[0]
    # The classic-augmentation arm at 50 %: the mixture path of the training data.
    run(
        config_file=_configs("train.json"),
        meta_file=meta,
        num_epochs=2,
        val_interval=1,
        classic_augmentation=True,
        synthetic_percent=50,
        **common,
    )
    out = tmp_path / "run"
    assert (out / "models" / "model.pt").is_file() and len(list((out / "checkpoints").glob("*.pt"))) == 2
    run(config_file=_configs("train.json", "evaluate.json"), meta_file=meta, **common)
    table = pd.read_csv(out / "eval" / "segmentation_test.csv", index_col=0)
    assert list(table.index) == ["edema", "cavity", "tumor"]
    assert list(table.columns) == ["Dice", "HD95", "Sensitivity", "Specificity", "Cases"]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["patients"] == 1
    assert metrics["mean_dice"] == pytest.approx(np.nanmean(table["Dice"]))
    cases = pd.read_csv(out / "eval" / "segmentation_test_cases.csv")
    manifest = resolve_cohort(
        "", common["cache_dir"], phantom_patients=4, phantom_shape=(48, 48, 6), progress=False
    )
    [test_patient] = manifest.loc[manifest["split"] == "test", "patient_id"]
    assert set(cases["patient_id"]) == {test_patient}

    run(config_file=_configs("inference.json"), meta_file=meta, splits=["test"], **common)
    written = nib.load(out / "inference" / test_patient / "lesion_seg.nii.gz")
    reference = nib.load(manifest.set_index("patient_id").loc[test_patient, "label"])
    assert written.shape == reference.shape
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-5)
    assert set(np.unique(written.get_fdata())) <= {0, 1, 2, 3, 4}

    # The model scores every case of another cohort with one command.
    other = resolve_cohort(
        "", common["cache_dir"], seed=9, phantom_patients=3, phantom_shape=(48, 48, 6), progress=False
    )
    other_dir = str(Path(other["label"].iloc[0]).parents[1])
    run(
        config_file=_configs("train.json", "evaluate.json"),
        meta_file=meta,
        eval_dataset_dir=other_dir,
        eval_split="all",
        **common,
    )
    external = pd.read_csv(out / "eval" / "segmentation_all_cases.csv")
    assert set(external["patient_id"]) == set(other["patient_id"])
    assert json.loads((out / "eval" / "metrics.json").read_text())["patients"] == 3


@pytest.mark.slow
def test_multi_gpu_config_runs_ddp_on_two_cpu_processes(tmp_path):
    from ddp_helpers import run_ddp

    from medsynth.data.dataset import make_slice_dataset

    cache = tmp_path / "cache"
    manifest = resolve_cohort(
        "", cache, phantom_patients=4, phantom_shape=(48, 48, 6), progress=False
    )  # no race
    out = tmp_path / "ddp"
    mixing = {"classic_augmentation": True, "synthetic_percent": 50, "mixing_mode": "synthetic_first"}
    overrides = {"output_dir": str(out), "cache_dir": str(cache), **TINY, "num_epochs": 2, "val_interval": 1}
    overrides.update(mixing)
    run_ddp(_configs("train.json", "multi_gpu_train.json"), overrides, port=29531)
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == [
        "checkpoint_epoch=1.pt",
        "checkpoint_epoch=2.pt",
    ]
    assert json.loads((out / "metrics" / "metrics.json").read_text())["epoch"] == 2
    # Each of the 2 processes stepped through its half of the mixed epoch (real + as many copies).
    real = len(make_slice_dataset(manifest, "train", 32, progress=False))
    per_rank = -(-2 * real // 2)
    steps = per_rank // TINY["batch_size"] if per_rank > TINY["batch_size"] else 1
    trainer_state = torch.load(out / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=False)["trainer"]
    assert trainer_state["epoch_length"] == steps


@pytest.mark.parametrize("mode", ["random", "synthetic_first"])
def test_under_ddp_the_ranks_together_draw_the_single_process_order_step_by_step(mode):
    dataset = MixedDataset(Items(10, 0.0), Items(8, 1.0))
    single = MixingSampler(dataset, 7, mode, num_epochs=3, seed=2)
    ranks = [MixingSampler(dataset, 7, mode, num_epochs=3, seed=2, num_replicas=3, rank=r) for r in range(3)]
    for epoch in range(3):
        single.set_epoch(epoch)
        for sampler in ranks:
            sampler.set_epoch(epoch)
        shards = [list(sampler) for sampler in ranks]
        assert all(len(shard) == len(ranks[0]) == 6 for shard in shards)  # 17 padded to 18
        interleaved = [index for step in zip(*shards, strict=True) for index in step]
        assert interleaved[:17] == list(single) and interleaved[17] == interleaved[0]
    with pytest.raises(ValueError, match="rank 3"):
        MixingSampler(dataset, 7, mode, num_replicas=3, rank=3)


def test_the_bundle_moves_the_mixing_sampler_through_its_epochs(tmp_path):
    """MONAI sets the epoch only of a DistributedSampler: the bundle's SamplerEpochSetter does it for
    the mixing sampler, so synthetic_first pre-trains on the extra instances, then fine-tunes on the
    real ones (50 %: one epoch of each over two epochs)."""
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_configs("train.json"))
    parser.update({**TINY, "num_epochs": 2, "val_interval": 2, "output_dir": str(tmp_path / "out"),
                   "cache_dir": str(tmp_path / "cache"), "classic_augmentation": True,
                   "synthetic_percent": 50, "mixing_mode": "synthetic_first"})  # fmt: skip
    trainer = parser.get_parsed_content("train#trainer")
    sources: dict[int, set] = {}

    def record(engine):  # the trainer decollates the batch into items after the iteration
        sources.setdefault(engine.state.epoch, set()).update(item["source"] for item in engine.state.batch)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    assert sources == {1: {"classic_augmentation"}, 2: {"real"}}
