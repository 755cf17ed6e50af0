"""UCG-SAMR (TMI 2021 Sec. III-E): unpaired data, the four networks, every loss stream of eq. 7-10,
and the bundle's train, evaluate (Tables III and IV layouts) and inference workflows."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import ConfigParser, run

from medsynth.data.cohort import resolve_cohort
from medsynth.data.dataset import make_slice_dataset
from medsynth.data.unpaired import UnpairedSliceDataset
from medsynth.engines import ImagePool
from medsynth.networks import (
    CGSAMRGenerator,
    CycleGANGenerators,
    ResnetTranslator,
    UCGSAMRGenerator,
    UNITGenerators,
    to_domain1,
)
from medsynth.utils.bundles import bundle_config_files

pytestmark = [
    pytest.mark.filterwarnings("ignore:parsing config_file"),
    pytest.mark.usefixtures("from_repository_root"),
]

REPO = Path(__file__).resolve().parents[1]
UCG = REPO / "bundles" / "ucg_samr"
CYCLEGAN = REPO / "bundles" / "cyclegan"
COHORT = {"phantom_patients": 6, "phantom_shape": [40, 40, 6]}
TINY = {**COHORT, "image_size": 32, "base_width": 4, "num_res_blocks": 1, "num_epochs": 1, "batch_size": 2,
        "d_base_filters": 8, "d_num_layers": 2, "unet_channels": [4, 8, 16, 32, 64], "val_interval": 1,
        "sample_interval": 1}  # fmt: skip


@pytest.fixture(scope="module")
def cohort_cache(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ucg_cache"))
    resolve_cohort("", path, phantom_patients=6, phantom_shape=(40, 40, 6), progress=False)
    return path


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_disjoint_unpaired_data_never_yields_a_pair(cohort_cache):
    manifest = resolve_cohort("", cohort_cache, phantom_patients=6, phantom_shape=(40, 40, 6), progress=False)
    slices = make_slice_dataset(manifest, "train", image_size=32, progress=False, with_tissue=True)
    unpaired = UnpairedSliceDataset(slices, seed=3, disjoint_patients=True)
    assert set(unpaired.mask_patients).isdisjoint(unpaired.image_patients)
    assert sorted(unpaired.mask_patients + unpaired.image_patients) == sorted(set(slices.patient_ids))
    partners = []
    for epoch in range(3):
        unpaired.set_epoch(epoch)
        partners.append(unpaired.partners.copy())
        for index in range(len(unpaired)):
            item = unpaired[index]
            assert (
                item["mask_patient"] in unpaired.mask_patients
                and item["image_patient"] in unpaired.image_patients
            )
            assert item["mask"].shape == (5, 32, 32) and item["tissue"].shape == (3, 32, 32)
            assert item["image"].shape[0] == 5
    assert not np.array_equal(partners[0], partners[1])  # redrawn every epoch
    unpaired.set_epoch(1)
    np.testing.assert_array_equal(unpaired.partners, partners[1])  # deterministic for (seed, epoch)
    shared = UnpairedSliceDataset(slices, seed=3, disjoint_patients=False)
    assert shared.mask_patients == shared.image_patients == sorted(set(slices.patient_ids))
    alone = manifest[manifest["patient_id"] == manifest.iloc[0]["patient_id"]].assign(split="train")
    with pytest.raises(ValueError, match="at least 2 training patients"):
        UnpairedSliceDataset(
            make_slice_dataset(alone, "train", image_size=32, progress=False, with_tissue=True)
        )


def test_the_four_networks_share_a_latent_space_and_f2_is_cg_samrs_decoder():
    generator = UCGSAMRGenerator()
    assert count(generator) == 3_757_743
    assert count(generator.image_decoder) == count(CGSAMRGenerator().decoder)  # F2: CG-SAMR's decoder
    small = UCGSAMRGenerator(base_width=4, num_res_blocks=1).eval()
    mask = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 32, 32)), 5).permute(0, 3, 1, 2).float()
    tissue, images = torch.rand(2, 3, 32, 32), torch.rand(2, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        z1, z2 = small.encode_masks(to_domain1(mask, tissue)), small.encode_images(images)
        assert z1.shape == z2.shape  # one latent space
        out = small(mask, None, tissue)
        assert out["images"].shape == (2, 5, 32, 32) and out["confidence"].shape == (2, 5, 16, 16)
        assert small.segment(images).shape == (2, 5, 32, 32)
        assert small.decode_masks(z1).shape == (2, 8, 32, 32)
    with pytest.raises(ValueError, match="tissue maps"):
        small(mask, None, None)


@pytest.mark.parametrize("with_confidence_loss", [True, False])
def test_one_step_has_every_stream_of_eq_7_to_10(tmp_path, cohort_cache, with_confidence_loss):
    parser = ConfigParser()
    parser.read_config(bundle_config_files(UCG, "train"))
    parser.update({**TINY, "cache_dir": cohort_cache, "output_dir": str(tmp_path)})
    if not with_confidence_loss:
        parser["confidence_loss"] = None
    trainer = parser.get_parsed_content("train#trainer")
    batch = trainer.prepare_batch(next(iter(trainer.data_loader)), "cpu")
    assert set(batch["mask_patient"]).isdisjoint(batch["image_patient"])
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in trainer.networks.items()}
    record = trainer.train_step(batch)
    streams = {"loss_recon1", "loss_recon2", "loss_gan1", "loss_gan2", "loss_cyc1", "loss_cyc2"}
    cm = {"loss_cm_recon2", "loss_cm_cyc2"}
    assert set(record) >= streams | {"loss_g", "loss_d1", "loss_d2"}
    assert (cm <= set(record)) == with_confidence_loss and (cm & set(record) == set()) != with_confidence_loss
    assert all(np.isfinite(v) for v in record.values())
    assert record["loss_g"] == pytest.approx(sum(v for k, v in record.items() if k in streams | cm), rel=1e-5)
    for name, net in trainer.networks.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters(), strict=True)), name


def test_cyclegan_step_has_its_adversarial_and_cycle_terms_and_a_seeded_pool(tmp_path, cohort_cache):
    parser = ConfigParser()
    parser.read_config(bundle_config_files(CYCLEGAN, "train"))
    parser.update({**TINY, "cyclegan_ngf": 4, "cache_dir": cohort_cache, "output_dir": str(tmp_path)})
    trainer = parser.get_parsed_content("train#trainer")
    generators = trainer.networks["generator"]
    assert count(ResnetTranslator(3, 3)) == 11_378_179  # the public resnet_9blocks: "11.378 M"
    assert count(CycleGANGenerators()) == 11_400_133 + 11_400_136  # 8 -> 5 and 5 -> 8 channels
    assert generators.masks_to_images.encoder[1].conv.in_channels == 8
    batch = trainer.prepare_batch(next(iter(trainer.data_loader)), "cpu")
    record = trainer.train_step(batch)
    assert set(record) >= {"loss_gan_a", "loss_gan_b", "loss_cyc_a", "loss_cyc_b", "loss_d1", "loss_d2"}
    expected = (
        record["loss_gan_a"] + record["loss_gan_b"] + 10 * (record["loss_cyc_a"] + record["loss_cyc_b"])
    )
    assert record["loss_g"] == pytest.approx(expected, rel=1e-5)
    draws = []
    for _ in range(2):
        pool = ImagePool(size=2, seed=5)
        images = [torch.full((1, 1, 2, 2), float(k)) for k in range(6)]
        draws.append([float(pool.query(image)[0, 0, 0, 0]) for image in images])
    assert draws[0] == draws[1] and draws[0][:2] == [0.0, 1.0]  # fills first, then seeded swaps
    assert set(draws[0][2:]) <= {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}


def test_synsegnet_trains_its_segmenter_on_the_synthesised_images(tmp_path, cohort_cache):
    parser = ConfigParser()
    parser.read_config(bundle_config_files(REPO / "bundles" / "synsegnet", "train"))
    parser.update({**TINY, "cyclegan_ngf": 4, "cache_dir": cohort_cache, "output_dir": str(tmp_path)})
    trainer = parser.get_parsed_content("train#trainer")
    segmenter = trainer.networks["generator"].segmenter
    before = [p.detach().clone() for p in segmenter.parameters()]
    record = trainer.train_step(trainer.prepare_batch(next(iter(trainer.data_loader)), "cpu"))
    expected = (
        record["loss_gan_a"] + record["loss_gan_b"] + 10 * (record["loss_cyc_a"] + record["loss_cyc_b"])
    )
    assert record["loss_g"] == pytest.approx(expected + record["loss_seg"], rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, segmenter.parameters(), strict=True))


def test_unit_step_has_its_five_weighted_terms(tmp_path, cohort_cache):
    parser = ConfigParser()
    parser.read_config(bundle_config_files(REPO / "bundles" / "unit", "train"))
    parser.update({**TINY, "unit_ngf": 4, "cache_dir": cohort_cache, "output_dir": str(tmp_path)})
    trainer = parser.get_parsed_content("train#trainer")
    unit = trainer.networks["generator"]
    assert count(UNITGenerators()) == 18_079_629
    with torch.no_grad():  # one latent space: both encoders give codes of the same shape
        assert (
            unit.encode_masks(torch.zeros(1, 8, 32, 32)).shape
            == unit.encode_images(torch.zeros(1, 5, 32, 32)).shape
        )
    record = trainer.train_step(trainer.prepare_batch(next(iter(trainer.data_loader)), "cpu"))
    weights = {"loss_gan": 1, "loss_rec": 10, "loss_kl": 0.01, "loss_cyc": 10, "loss_cyc_kl": 0.01}
    assert record["loss_g"] == pytest.approx(sum(w * record[name] for name, w in weights.items()), rel=1e-5)


@pytest.mark.parametrize("bundle", ["ucg_samr", "cyclegan", "synsegnet", "unit"])
def test_the_bundle_trains_evaluates_both_directions_and_synthesises(tmp_path, cohort_cache, bundle):
    out = tmp_path / bundle
    UCG = REPO / "bundles" / bundle
    common = {
        "output_dir": str(out),
        "cache_dir": cohort_cache,
        **TINY,
        **({"cyclegan_ngf": 4, "unit_ngf": 4} if bundle != "ucg_samr" else {}),
    }
    meta = str(UCG / "configs" / "metadata.json")
    run(config_file=bundle_config_files(UCG, "train"), meta_file=meta, **common)
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "atlas.json").is_file()
    evaluate = bundle_config_files(UCG, "evaluate")
    assert Path(evaluate[-1]).name == "ucg_samr_evaluate.json"
    run(config_file=evaluate, meta_file=meta, **common)
    table3 = pd.read_csv(out / "eval" / "table1_test.csv", index_col=0)  # Table III: Table I's layout
    assert list(table3.columns[:5]) == ["Edema", "Cavity", "Tumor", "SSIM", "PSNR"]
    assert list(table3.index) == ["T1w", "Gd-T1w", "T2w", "FLAIR", "APTw", "Avg."]
    table4 = pd.read_csv(out / "eval" / "table4_test.csv", index_col=0)
    assert list(table4.index) == ["edema", "cavity", "tumor"] and "Dice" in table4.columns
    assert ((table4["Dice"].dropna() >= 0) & (table4["Dice"].dropna() <= 1)).all()
    run(config_file=bundle_config_files(UCG, "inference"), meta_file=meta, splits="test", **common)
    manifest = resolve_cohort("", cohort_cache, phantom_patients=6, phantom_shape=(40, 40, 6), progress=False)
    test = manifest[manifest["split"] == "test"].iloc[0]
    written = nib.load(out / "inference" / test["patient_id"] / "flair.nii.gz")
    assert written.shape == nib.load(test["label"]).shape


def test_compare_puts_tables_iii_and_iv_side_by_side(tmp_path, cohort_cache):
    from medsynth.studies.compare import compare_runs

    settings = {"cache_dir": cohort_cache, **TINY, "cyclegan_ngf": 4}
    runs = {}
    for bundle in ("ucg_samr", "cyclegan"):
        runs[bundle] = tmp_path / bundle
        run(
            config_file=bundle_config_files(REPO / "bundles" / bundle, "train"),
            output_dir=str(runs[bundle]),
            **settings,
        )
    specs = [f"{runs[b]}=bundles/{b}" for b in runs]
    written = compare_runs(specs, tmp_path / "cmp", overrides=settings, figure=False)
    table4 = pd.read_csv(written["table4_csv"], header=[0, 1], index_col=0)
    assert set(table4.columns.get_level_values(0)) == {"ucg_samr", "cyclegan"}
    assert "Dice" in set(table4.columns.get_level_values(1)) and list(table4.index) == [
        "edema",
        "cavity",
        "tumor",
    ]
    table3 = pd.read_csv(written["table1_csv"], header=[0, 1], index_col=0)
    assert set(table3.columns.get_level_values(0)) == {"ucg_samr", "cyclegan"}
