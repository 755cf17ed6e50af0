"""The papers' comparison systems in the CG-SAMR harness: pix2pix and pix2pixHD (networks against
the public implementations' layouts and parameter counts, the trainer's losses, pix2pixHD's VGG term
from local weights only, the bundles' workflows)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pytest
import torch
from bundle_helpers import TINY_DATA, TINY_NETWORKS, TINY_TRAINING
from monai.bundle import ConfigParser, run

from medsynth.data.cohort import resolve_cohort
from medsynth.losses import VGGPerceptualLoss, vgg_perceptual_loss
from medsynth.losses.perceptual import VGG19Features
from medsynth.networks import (
    Pix2PixGenerator,
    Pix2PixHDGenerator,
    UNetSkipGenerator,
    pix2pix_patch_discriminator,
)
from medsynth.utils.bundles import bundle_config_files

pytestmark = [
    pytest.mark.filterwarnings("ignore:parsing config_file"),
    pytest.mark.usefixtures("from_repository_root"),
]

REPO = Path(__file__).resolve().parents[1]
PIX2PIX = REPO / "bundles" / "pix2pix"
TINY_NETWORK = TINY_NETWORKS["pix2pix"]
TINY_TRAIN = TINY_TRAINING
TINY = {**TINY_DATA, **TINY_NETWORK, **TINY_TRAIN}


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
    assert (
        set(trainer.networks) == {"generator", "discriminator"}
        and trainer.weights["reconstruction_loss"] == 100
    )
    batch = trainer.prepare_batch(next(iter(trainer.data_loader)), "cpu")
    before = [p.detach().clone() for p in trainer.networks["generator"].parameters()]
    record = trainer.train_step(batch)
    assert set(record) >= {"loss_g", "loss_g_gan", "loss_l1", "loss_d"}
    assert record["loss_g"] == pytest.approx(record["loss_g_gan"] + 100 * record["loss_l1"], rel=1e-5)
    changed = [
        not torch.equal(a, b) for a, b in zip(before, trainer.networks["generator"].parameters(), strict=True)
    ]
    assert any(changed)


@pytest.mark.parametrize("method", ["pix2pix", "pix2pixhd", "shin"])
def test_a_baseline_bundle_trains_evaluates_and_synthesises_in_the_input_geometry(
    method, tmp_path, tiny_phantom_cache
):
    bundle, network = REPO / "bundles" / method, TINY_NETWORKS[method]
    out = tmp_path / method
    common = {"output_dir": str(out), "cache_dir": tiny_phantom_cache}
    meta = str(bundle / "configs" / "metadata.json")
    run(
        config_file=bundle_config_files(bundle, "train"),
        meta_file=meta,
        **common,
        **TINY_DATA,
        **network,
        **TINY_TRAIN,
    )
    run(
        config_file=bundle_config_files(bundle, "evaluate"),
        meta_file=meta,
        **common,
        **TINY_DATA,
        **network,
        **TINY_TRAIN,
    )
    assert (out / "models" / "model.pt").is_file() and not (out / "models" / "segmenter.pt").exists()
    assert (out / "eval" / "table1_test.csv").is_file()
    inference = bundle_config_files(bundle, "inference")
    run(config_file=inference, meta_file=meta, **common, **TINY_DATA, **network, splits="test")
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


def test_the_pix2pixhd_global_generator_is_the_harness_parts_with_instance_norm():
    generator = Pix2PixHDGenerator(5, ngf=64, num_downsampling=4, num_res_blocks=9)
    parts = (generator.encoder, generator.trunk, generator.decoder)
    assert count(generator) == sum(count(part) for part in parts) == 182_455_813
    assert (
        generator.encoder.out_channels == 1024
        and len(generator.trunk) == 9
        and len(generator.decoder.branches) == 1
    )
    norms = [m for m in generator.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert norms and not any(m.affine for m in norms)  # pix2pixHD's instance norm has no affine terms
    small = Pix2PixHDGenerator(5, ngf=4, num_downsampling=2, num_res_blocks=1)
    mask, atlas = torch.zeros(2, 5, 16, 16), torch.randn(2, 15, 16, 16)
    torch.testing.assert_close(small(mask, atlas)["images"], small(mask, atlas * 3)["images"])  # no atlas


def _torchvision_style_vgg19(path: Path) -> Path:
    """A VGG19 state dict laid out as torchvision's (random weights: none are downloaded here)."""
    torch.manual_seed(0)
    state = {**VGG19Features().state_dict(), "classifier.0.weight": torch.zeros(2, 2)}
    torch.save(state, path)
    return path


def test_the_vgg_term_comes_only_from_local_weights(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert vgg_perceptual_loss("") is None
    assert "VGG perceptual term is off" in caplog.text
    with pytest.raises(FileNotFoundError, match="VGG19 weights not found"):
        vgg_perceptual_loss(tmp_path / "absent.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG19"):
        vgg_perceptual_loss(tmp_path / "wrong.pth")
    loss = vgg_perceptual_loss(_torchvision_style_vgg19(tmp_path / "vgg19.pth"))
    assert isinstance(loss, VGGPerceptualLoss) and loss.state_dict() == {}  # fixed weights: not checkpointed
    real = torch.rand(2, 5, 32, 32) * 2 - 1
    assert float(loss(real, real)) == 0.0
    fake = (real + 0.5 * torch.randn_like(real)).requires_grad_()
    value = loss(fake, real)
    value.backward()
    assert value > 0 and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.vgg.parameters())


def test_the_pix2pixhd_step_logs_feature_matching_and_the_vgg_term_where_weights_are_given(
    tmp_path, tiny_phantom_cache
):
    bundle = REPO / "bundles" / "pix2pixhd"
    records = {}
    for name, vgg in (("without", ""), ("with", str(_torchvision_style_vgg19(tmp_path / "vgg19.pth")))):
        parser = ConfigParser()
        parser.read_config(bundle_config_files(bundle, "train"))
        parser.update({**TINY_DATA, **TINY_NETWORKS["pix2pixhd"], **TINY_TRAIN, "vgg_weights": vgg,
                       "cache_dir": tiny_phantom_cache, "output_dir": str(tmp_path / name)})  # fmt: skip
        trainer = parser.get_parsed_content("train#trainer")
        assert trainer.weights["feature_matching_loss"] == pytest.approx(10 * 4 / 3 / 2)  # 2 layers, 2 scales
        batch = trainer.prepare_batch(next(iter(trainer.data_loader)), "cpu")
        records[name] = trainer.train_step(batch)
    assert "loss_fm" in records["without"] and "loss_vgg" not in records["without"]
    assert "loss_l1" not in records["without"]  # pix2pixHD has no L1 term
    assert records["with"]["loss_vgg"] > 0
