"""The papers' comparison systems in the CG-SAMR harness: pix2pix (networks against the public
implementation's parameter counts, the trainer's losses, the bundle's workflows)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pytest
import torch
from monai.bundle import ConfigParser, run

from medsynth.data.cohort import resolve_cohort
from medsynth.networks import Pix2PixGenerator, UNetSkipGenerator, pix2pix_patch_discriminator
from medsynth.utils.bundles import bundle_config_files

pytestmark = [
    pytest.mark.filterwarnings("ignore:parsing config_file"),
    pytest.mark.usefixtures("from_repository_root"),
]

REPO = Path(__file__).resolve().parents[1]
PIX2PIX = REPO / "bundles" / "pix2pix"
TINY_DATA = {"phantom_patients": 3, "phantom_shape": [40, 40, 6], "image_size": 32}
TINY_NETWORK = {"pix2pix_ngf": 4, "pix2pix_num_downs": 5}
TINY = {**TINY_DATA, **TINY_NETWORK, "num_epochs": 1, "batch_size": 2, "d_base_filters": 8, "d_num_layers": 2,
        "val_interval": 1, "sample_interval": 1}  # fmt: skip


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_pix2pix_networks_have_the_public_implementations_parameter_counts():
    # unet_256 prints 54.414 M (3 -> 3 channels) and 54.408 M with its 2.765 M PatchGAN (1 -> 1 channel).
    assert count(UNetSkipGenerator(3, 3, num_downs=8, ngf=64)) == 54_413_955
    assert count(UNetSkipGenerator(1, 1, num_downs=8, ngf=64)) == 54_407_809
    assert count(pix2pix_patch_discriminator(2)) == 2_764_609
    assert count(pix2pix_patch_discriminator(6)) == 2_768_705
    patches = pix2pix_patch_discriminator(6)(torch.zeros(1, 6, 256, 256))[-1]
    assert patches.shape == (1, 1, 30, 30)  # the 70x70 PatchGAN's 30x30 map at 256x256
    generator = Pix2PixGenerator(5, num_downs=5, ngf=4)
    mask, atlas = torch.zeros(2, 5, 32, 32), torch.randn(2, 15, 32, 32)
    images = generator.eval()(mask, atlas)["images"]
    assert images.shape == (2, 5, 32, 32) and images.abs().max() <= 1
    torch.testing.assert_close(generator(mask, atlas + 1)["images"], images)  # no atlas: the papers' baseline
    assert count(Pix2PixGenerator(5, use_atlas=True, num_downs=5, ngf=4)) > count(generator)
    with pytest.raises(ValueError, match="divisible by 32"):
        generator(torch.zeros(1, 5, 48, 48))


def test_a_derived_bundle_with_its_own_training_and_paper_configs():
    train = bundle_config_files(PIX2PIX, "train")
    assert [Path(f).name for f in train] == ["train.json", "pix2pix.json", "pix2pix_train.json"]
    inference = bundle_config_files(PIX2PIX, "inference")
    assert [Path(f).name for f in inference] == ["inference.json", "pix2pix.json"]  # no train#... keys there
    paper = bundle_config_files(PIX2PIX, "paper")
    assert paper[-1] == str(PIX2PIX / "configs" / "paper.json")
    assert bundle_config_files(PIX2PIX, "evaluate")[-1].endswith("cg_samr/configs/evaluate.json")


def test_the_pix2pix_step_trains_a_conditional_gan_with_l1(tmp_path, tiny_phantom_cache):
    parser = ConfigParser()
    parser.read_config(bundle_config_files(PIX2PIX, "train"))
    parser.update({**TINY, "cache_dir": tiny_phantom_cache, "output_dir": str(tmp_path)})
    trainer = parser.get_parsed_content("train#trainer")
    assert set(trainer.networks) == {"generator", "discriminator"} and trainer.weight_reconstruction == 100
    batch = trainer.prepare_batch(next(iter(trainer.data_loader)), "cpu")
    before = [p.detach().clone() for p in trainer.networks["generator"].parameters()]
    record = trainer.train_step(batch)
    assert set(record) >= {"loss_g", "loss_g_gan", "loss_l1", "loss_d"}
    assert record["loss_g"] == pytest.approx(record["loss_g_gan"] + 100 * record["loss_l1"], rel=1e-5)
    changed = [
        not torch.equal(a, b) for a, b in zip(before, trainer.networks["generator"].parameters(), strict=True)
    ]
    assert any(changed)


def test_pix2pix_bundle_trains_evaluates_and_synthesises_in_the_input_geometry(tmp_path, tiny_phantom_cache):
    out = tmp_path / "pix2pix"
    common = {"output_dir": str(out), "cache_dir": tiny_phantom_cache}
    meta = str(PIX2PIX / "configs" / "metadata.json")
    run(config_file=bundle_config_files(PIX2PIX, "train"), meta_file=meta, **common, **TINY)
    run(config_file=bundle_config_files(PIX2PIX, "evaluate"), meta_file=meta, **common, **TINY)
    assert (out / "models" / "model.pt").is_file() and not (out / "models" / "segmenter.pt").exists()
    assert (out / "eval" / "table1_test.csv").is_file()
    run(config_file=bundle_config_files(PIX2PIX, "inference"), meta_file=meta, **common, **TINY_DATA,
        **TINY_NETWORK, splits="test")  # fmt: skip
    manifest = resolve_cohort(
        "", tiny_phantom_cache, phantom_patients=3, phantom_shape=(40, 40, 6), progress=False
    )
    test = manifest[manifest["split"] == "test"].iloc[0]
    written = nib.load(out / "inference" / test["patient_id"] / "t1w.nii.gz")
    source = nib.load(test["label"])
    assert written.shape == source.shape
    torch.testing.assert_close(
        torch.as_tensor(written.affine), torch.as_tensor(source.affine), atol=1e-4, rtol=0
    )
