"""Shin et al. (2018) in the CG-SAMR harness: tissue maps (the phantom's ground truth, the lesion
excluded), the transform that keeps them consistent with a (manipulated) lesion mask, the generator
that takes them, and the bundle's training, evaluation, inference and cohort synthesis."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import TINY_DATA, TINY_NETWORKS, TINY_TRAINING
from monai.bundle import ConfigParser, run

from medsynth.constants import EDEMA, NORMAL_BRAIN, TISSUE_COLUMNS, TUMOR
from medsynth.data.cohort import resolve_cohort
from medsynth.data.dataset import make_slice_dataset
from medsynth.data.manifest import read_manifest
from medsynth.errors import InputDataError
from medsynth.inference import synthesis_cases
from medsynth.networks import Pix2PixGenerator, SynthesisInferenceNetwork
from medsynth.transforms import TissueMapsForLabel
from medsynth.utils.bundles import bundle_config_files

pytestmark = [
    pytest.mark.filterwarnings("ignore:parsing config_file"),
    pytest.mark.usefixtures("from_repository_root"),
]

REPO = Path(__file__).resolve().parents[1]
SHIN = REPO / "bundles" / "shin"
TINY = {**TINY_DATA, **TINY_NETWORKS["shin"], **TINY_TRAINING}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_manifest(cache: str):
    return resolve_cohort("", cache, phantom_patients=3, phantom_shape=(40, 40, 6), progress=False)


def test_tissue_maps_follow_the_label_map():
    label = torch.full((1, 4, 4, 1), NORMAL_BRAIN)
    label[0, 0] = 0
    label[0, 1, :2] = TUMOR
    label[0, 1, 2:] = EDEMA
    tissue = torch.zeros(3, 4, 4, 1)
    tissue[:, 2] = torch.tensor([0.2, 0.3, 0.5])[:, None, None]
    tissue[:, 3] = torch.tensor([0.6, 0.6, 0.6])[:, None, None]  # sums to 1.8: renormalised
    maps = TissueMapsForLabel()(tissue, label)
    assert torch.all(maps[:, 0] == 0) and torch.all(maps[:, 1] == 0)  # background and lesion
    torch.testing.assert_close(maps[:, 2, :, 0], torch.tensor([0.2, 0.3, 0.5])[:, None].expand(3, 4))
    torch.testing.assert_close(maps[:, 3].sum(dim=0), torch.ones(4, 1))
    # A lesion removed from the mask (mirrored away, shrunk): the source's maps have nothing there.
    label[0, 1] = NORMAL_BRAIN
    removed = TissueMapsForLabel()(tissue, label)
    torch.testing.assert_close(removed[:, 1, :, 0], torch.tensor([0.0, 0.0, 1.0])[:, None].expand(3, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        TissueMapsForLabel()(tissue, label[..., :2, :])


def test_the_phantom_carries_ground_truth_tissue_maps(tiny_phantom_cache):
    manifest = tiny_manifest(tiny_phantom_cache)
    assert all(manifest[c].map(lambda p: Path(p).is_file()).all() for c in TISSUE_COLUMNS)
    row = manifest.iloc[0]
    maps = np.stack([nib.load(row[c]).get_fdata() for c in TISSUE_COLUMNS])
    label = np.rint(nib.load(row["label"]).get_fdata())
    t1w = nib.load(row["t1w"]).get_fdata()
    assert np.all(maps[:, label == 0] == 0) and maps.max() <= 1.0
    assert maps[:, label >= 2].sum(axis=0).mean() < 0.5 < maps[:, label == 1].sum(axis=0).mean()
    # White matter is the brightest normal tissue on T1w, CSF the darkest.
    normal = label == 1
    dominant = maps.argmax(axis=0)[normal]
    means = [t1w[normal][dominant == k].mean() for k in range(3)]
    assert means[0] < means[1] < means[2], means

    dataset = make_slice_dataset(manifest, "train", image_size=32, progress=False, with_tissue=True)
    item = dataset[len(dataset) // 2]
    assert item["tissue"].shape == (3, 32, 32)
    # Fitted to 32 x 32 by area averaging: only the edges of the normal brain blend with zeros.
    total = item["tissue"].sum(dim=0)
    assert total.max() <= 1 + 1e-5 and total[item["label"][0] == NORMAL_BRAIN].mean() > 0.9
    assert torch.all(total[item["label"][0] == 0] < 1)
    with pytest.raises(ValueError, match="tissue maps come with the phantom"):
        make_slice_dataset(manifest.drop(columns=list(TISSUE_COLUMNS)), "train", image_size=32,
                           progress=False, with_tissue=True)  # fmt: skip


def test_the_shin_generator_takes_the_tissue_maps():
    # Paper size: pix2pix's unet_256 with 5 + 3 input channels (3 x 4 x 4 x 64 more weights than pix2pix).
    assert count(Pix2PixGenerator(5, tissue_maps=True)) == 54_423_173
    assert count(Pix2PixGenerator(5, tissue_maps=True)) - count(Pix2PixGenerator(5)) == 3 * 16 * 64
    generator = Pix2PixGenerator(5, tissue_maps=True, num_downs=5, ngf=4, dropout=0.0).eval()
    mask, atlas = torch.rand(1, 5, 32, 32), torch.rand(1, 15, 32, 32)
    tissue = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        first = generator(mask, atlas, tissue)["images"]
        assert not torch.allclose(first, generator(mask, atlas, torch.rand(1, 3, 32, 32))["images"])
        assert torch.equal(first, generator(mask, torch.rand(1, 15, 32, 32), tissue)["images"])  # no atlas
        network = SynthesisInferenceNetwork(generator, tissue_maps=True)
        torch.testing.assert_close(network(torch.cat([mask, atlas, tissue], dim=1)), first)
    with pytest.raises(ValueError, match="needs the 3 tissue maps"):
        generator(mask, atlas)


def test_the_shin_step_feeds_tissue_maps_to_both_networks(tmp_path, tiny_phantom_cache):
    parser = ConfigParser()
    parser.read_config(bundle_config_files(SHIN, "train"))
    parser.update({**TINY, "cache_dir": tiny_phantom_cache, "output_dir": str(tmp_path)})
    trainer = parser.get_parsed_content("train#trainer")
    generator = trainer.networks["generator"]
    assert generator.in_channels == 5 + 3 and not generator.use_atlas
    first_conv = next(
        m for m in trainer.networks["discriminator"].modules() if isinstance(m, torch.nn.Conv2d)
    )
    assert first_conv.in_channels == 5 + 3 + 5  # the condition (mask, tissue) and the images
    batch = trainer.prepare_batch(next(iter(trainer.data_loader)), "cpu")
    assert batch["tissue"].shape[1] == 3
    record = trainer.train_step(batch)
    assert record["loss_g"] == pytest.approx(record["loss_g_gan"] + 100 * record["loss_l1"], rel=1e-5)


def test_shin_inference_needs_tissue_maps_and_names_the_patient(tiny_phantom_cache):
    manifest = tiny_manifest(tiny_phantom_cache)
    items = synthesis_cases(["t1w"], manifest, tissue_maps=True)
    assert all(item[c] for item in items for c in TISSUE_COLUMNS)
    bare = manifest.drop(columns=["tissue_gm"])
    with pytest.raises(InputDataError, match=r"patient phantom_000.*tissue_gm"):
        synthesis_cases(["t1w"], bare, tissue_maps=True)
    with pytest.raises(InputDataError, match="give tissue_dir"):
        atlas_dir = str(Path(manifest.iloc[0]["atlas_t1w"]).parent)
        synthesis_cases(["t1w"], mask_file=manifest.iloc[0]["label"], atlas_dir=atlas_dir, tissue_maps=True)


def test_a_shin_model_synthesises_a_cohort_from_manipulated_masks(tmp_path, tiny_phantom_cache):
    out = tmp_path / "shin"
    common = {"output_dir": str(out), "cache_dir": tiny_phantom_cache, **TINY_DATA, **TINY_NETWORKS["shin"]}
    meta = str(SHIN / "configs" / "metadata.json")
    run(config_file=bundle_config_files(SHIN, "train"), meta_file=meta, **common, **TINY_TRAINING)
    run(
        config_file=bundle_config_files(SHIN, "augment"),
        meta_file=meta,
        **common,
        num_cases=3,
        segmentation_threshold="$None",  # pix2pix-family models train no U-Net
        memorisation_action="flag",
        min_component_voxels=1,
    )
    # The generator refuses to run without its tissue maps, so every case written went through them.
    cohort = read_manifest(out / "synthetic" / "manifest.csv")
    assert len(cohort) >= 1 and set(cohort["source_patient"]) <= set(
        tiny_manifest(tiny_phantom_cache)["patient_id"]
    )
    case = cohort.iloc[0]
    assert nib.load(case["t1w"]).shape == nib.load(case["label"]).shape
