"""Qu et al.'s networks and two training stages on tiny constructed batches: shapes, the sampling of
structural maps from noise, and every loss term present and falling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from medsynth.constants import LESION_LABELS
from medsynth.engines.qu import LabelBank, MultimodalGenerationTrainer, StructuralMapTrainer, fused_label
from medsynth.networks import PatchGANDiscriminator
from medsynth.networks.qu import (
    LESION_SCHEMES,
    CodeDiscriminator,
    LesionSegmenters,
    MaskGenerator,
    ModalityDiscriminator,
    ModalityUNet,
    StructureVAE,
)
from medsynth.transforms.structure import label_inside_brain

FEATURES = (4, 8, 8, 8)
SIZE, MODALITIES = 16, 3


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two slices: a bright brain square with a lesion, in MODALITIES channels of [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    image = -torch.ones(2, MODALITIES, SIZE, SIZE)
    image[:, :, 3:13, 3:13] = torch.rand(2, MODALITIES, 10, 10, generator=g) * 0.5
    label = torch.zeros(2, 1, SIZE, SIZE, dtype=torch.long)
    label[:, :, 3:13, 3:13] = 1
    label[0, :, 5:8, 5:8], label[1, :, 8:11, 6:9] = 4, 2
    image[:, :, 5:8, 5:8] += 0.4 * (label[:, :, 5:8, 5:8] == 4)
    mask = torch.nn.functional.one_hot(label[:, 0], 5).permute(0, 3, 1, 2).float()
    return {"image": image, "mask": mask, "label": label, "atlas": image}


def _adam(*modules: torch.nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam([p for m in modules for p in m.parameters()], lr=2e-3, betas=(0.5, 0.999))


def _records(trainer, epochs: int) -> list[dict[str, float]]:
    records: list[dict[str, float]] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: records.append(engine.state.output))
    trainer.run()
    assert len(records) == epochs
    return records


def _falls(records: list[dict[str, float]], name: str, window: int = 4) -> bool:
    first = sum(r[name] for r in records[:window]) / window
    last = sum(r[name] for r in records[-window:]) / window
    return last < first


def test_networks_shapes_and_sampling_from_noise():
    vae = StructureVAE(FEATURES, code_channels=3)
    assert vae.code_shape(SIZE, SIZE) == (3, 2, 2)
    maps = vae.sample(4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    assert maps.shape == (4, 1, SIZE, SIZE) and 0 < float(maps.min()) and float(maps.max()) < 1
    with pytest.raises(ValueError, match="divisible by 8"):
        vae.code_shape(20, 16)
    unet = ModalityUNet(MODALITIES, 5, FEATURES)
    fused = torch.rand(2, 5, SIZE, SIZE)
    images = unet(fused)
    assert images.shape == (2, MODALITIES, SIZE, SIZE) and float(images.abs().max()) <= 1
    # The modality code changes the output: the decoder is conditioned at the bottleneck.
    levels = unet.encode_fused(fused)
    assert not torch.allclose(unet.decode(levels, 0), unet.decode(levels, 1))
    d, c = ModalityDiscriminator(MODALITIES, 4, 2)(images[:, :1])
    assert d.shape[:2] == (2, 1) and c.shape == (2, MODALITIES)
    for scheme in LESION_SCHEMES:
        segmenters = LesionSegmenters(MODALITIES, 5, scheme, FEATURES)
        assert segmenters(images).shape == (2, MODALITIES, 5, SIZE, SIZE)
    counts = {s: len(LesionSegmenters(4, 5, s, FEATURES).encoders) for s in LESION_SCHEMES}
    assert counts == {"single": 1, "shared_encoder": 1, "per_modality": 4}
    assert MaskGenerator(FEATURES)(maps).shape == (4, 1, SIZE, SIZE)


def test_structural_map_stage_every_loss_term_falls():
    torch.manual_seed(0)
    vae, d_map = StructureVAE(FEATURES, 3), PatchGANDiscriminator(1, 4, 2)
    d_code, mask = CodeDiscriminator(3, 8), MaskGenerator(FEATURES)
    epochs = 40
    trainer = StructuralMapTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=[_batch()],
        networks={
            "vae": vae,
            "map_discriminator": d_map,
            "code_discriminator": d_code,
            "mask_generator": mask,
        },
        optimizers={"discriminator": _adam(d_map, d_code), "generator": _adam(vae), "mask": _adam(mask)},
        beta=0.1,
        enlarge_pixels=2,
    )
    records = _records(trainer, epochs)
    names = {"loss_code_discriminator", "loss_map_discriminator", "loss_adversarial", "loss_normal",
             "loss_self_supervised", "loss_mask"}  # fmt: skip
    assert set(records[0]) == names
    # The two players' adversarial terms trade off; the others fall.
    for name in names - {"loss_adversarial", "loss_code_discriminator"}:
        assert _falls(records, name), (name, records[0][name], records[-1][name])
    assert all(torch.isfinite(torch.tensor(r[n])) for r in records for n in names)


def test_generation_stage_every_loss_term_falls_and_labels_stay_inside_the_brain():
    torch.manual_seed(0)
    generator, discriminator = ModalityUNet(MODALITIES, 5, FEATURES), ModalityDiscriminator(MODALITIES, 4, 2)
    segmenters = LesionSegmenters(MODALITIES, 5, "per_modality", FEATURES)
    code_discriminator = CodeDiscriminator(FEATURES[-1], 8)
    epochs = 30
    bank = LabelBank(seed=0)
    trainer = MultimodalGenerationTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=[_batch(0), _batch(1)],
        epoch_length=1,
        networks={
            "generator": generator,
            "discriminator": discriminator,
            "segmenters": segmenters,
            "code_discriminator": code_discriminator,
        },  # fmt: skip
        optimizers={
            "discriminator": _adam(discriminator, code_discriminator),
            "generator": _adam(generator, segmenters),
        },  # fmt: skip
        enlarge_pixels=2,
        label_bank=bank,
    )
    records = _records(trainer, epochs)
    weights = set(MultimodalGenerationTrainer.WEIGHTS)
    assert {f"loss_{w}" for w in weights} | {"loss_discriminator", "drawn_label_share"} == set(records[0])
    for name in weights - {"adversarial", "category", "code_adversarial"}:
        assert _falls(records, f"loss_{name}"), (
            name,
            records[0][f"loss_{name}"],
            records[-1][f"loss_{name}"],
        )
    assert _falls(records, "loss_discriminator")
    assert all(r["loss_code_adversarial"] > 0 for r in records)  # the fused code is judged against real codes
    assert records[-1]["drawn_label_share"] > 0.5  # labels of other slices were fused
    # The fused label: lesion from the drawn label, normal brain in the map's brain area, nothing outside.
    brain = torch.zeros(1, 1, SIZE, SIZE)
    brain[..., 2:14, 2:14] = 1
    drawn = bank.draw(_batch()["label"][:1], brain)
    assert label_inside_brain(drawn, brain, LESION_LABELS).all()
    onehot = fused_label(drawn, brain)
    assert (
        float(onehot[:, 0][brain[:, 0] > 0].sum()) == 0
        and float(onehot[:, 1:][:, :, brain[0, 0] == 0].sum()) == 0
    )


def test_random_lesion_label_moves_only_the_lesion_as_sampled():
    import numpy as np

    from medsynth.synthetic.noise import random_lesion_label

    label = np.ones((32, 32), np.int64)  # normal brain everywhere ...
    label[10:14, 8:12], label[12, 10] = 2, 4  # ... an edema patch around one tumour voxel
    identity = np.random.default_rng(0)
    moved, params = random_lesion_label(label, identity, scale_range=(1.0, 1.0), max_rotation_deg=0.0,
                                        max_translation=0.0, flip_probability=0.0)  # fmt: skip
    assert params == {"scale": 1.0, "rotation_deg": 0.0, "translation_px": [0.0, 0.0], "flip": False}
    np.testing.assert_array_equal(moved, np.where(label > 1, label, 0))  # normal brain is not carried
    doubled = {
        "scale_range": (2.0, 2.0),
        "max_rotation_deg": 0.0,
        "max_translation": 0.0,
        "flip_probability": 0.0,
    }
    grown, params = random_lesion_label(label, np.random.default_rng(1), **doubled)
    assert int((grown > 0).sum()) == pytest.approx(4 * int((label > 1).sum()), rel=0.3)
    assert set(np.unique(grown)) <= {0, 2, 4}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Untrained tiny stage-1 and stage-2 networks saved as the bundle saves them."""
    from cohort_helpers import write_tiny_cohort

    from medsynth.constants import CLINICAL_SEQUENCES
    from medsynth.data.manifest import read_manifest

    root = tmp_path_factory.mktemp("noise")
    manifest = read_manifest(write_tiny_cohort(root / "cohort", num_patients=4))
    torch.manual_seed(0)
    nets = {
        "vae": StructureVAE(FEATURES, 3),
        "mask_generator": MaskGenerator(FEATURES),
        "generator": ModalityUNet(len(CLINICAL_SEQUENCES), 5, FEATURES),
        "segmenters": LesionSegmenters(len(CLINICAL_SEQUENCES), 5, "per_modality", FEATURES),
    }
    # An untrained MASK generator's brain area is noise; one that says "brain everywhere" lets labels fit.
    torch.nn.init.constant_(nets["mask_generator"].decoder.head[0].bias, 10.0)
    (root / "models").mkdir()
    torch.save({k: nets[k].state_dict() for k in ("vae", "mask_generator")}, root / "models" / "structure.pt")
    torch.save(
        {k: nets[k].state_dict() for k in ("generator", "segmenters")}, root / "models" / "generation.pt"
    )
    return root, manifest


def _builder(root, manifest, out, **kwargs):
    from medsynth.constants import CLINICAL_SEQUENCES
    from medsynth.synthetic.noise import NoiseCohortBuilder

    return NoiseCohortBuilder(
        manifest,
        StructureVAE(FEATURES, 3),
        MaskGenerator(FEATURES),
        ModalityUNet(len(CLINICAL_SEQUENCES), 5, FEATURES),
        LesionSegmenters(len(CLINICAL_SEQUENCES), 5, "per_modality", FEATURES),
        structure_path=str(root / "models" / "structure.pt"),
        generation_path=str(root / "models" / "generation.pt"),
        output_dir=str(out),
        sequences=CLINICAL_SEQUENCES,
        image_size=SIZE,
        progress=False,
        **kwargs,
    )


def test_cases_from_noise_come_out_as_a_cohort_with_provenance_and_resume(tiny_models, tmp_path):
    import json

    import nibabel as nib
    import numpy as np

    from medsynth.data.manifest import read_manifest

    root, manifest = tiny_models
    out = tmp_path / "synthetic"
    # Filters opened (untrained networks): every candidate whose label fits is accepted.
    summary = _builder(root, manifest, out, num_cases=3, structure_filter_mae=1.01, dice_threshold=0.0).run()
    assert summary["accepted"] == 3 and summary["structure_filter_pass_rate"] == 1.0
    cohort = read_manifest(out / "manifest.csv")
    assert len(cohort) == 3 and set(cohort["split"]) == {"train"}
    train_patients = set(manifest.loc[manifest["split"] == "train", "patient_id"])
    assert set(cohort["source_patient"]) <= train_patients  # labels come from training patients only
    for _, row in cohort.iterrows():
        label = np.asarray(nib.load(row["label"]).dataobj)[..., 0]
        brain = np.asarray(nib.load(row["brain_mask"]).dataobj)[..., 0]
        assert np.isin(label, [2, 3, 4]).any() and not (np.isin(label, [2, 3, 4]) & (brain == 0)).any()
        assert np.asarray(nib.load(row["t1w"]).dataobj).shape == (SIZE, SIZE, 1)
        provenance = json.loads((Path(row["label"]).parent / "provenance.json").read_text())
        assert (
            provenance["source_split"] == "train"
            and provenance["label_source"]["patient_id"] == row["source_patient"]
        )
        assert set(provenance["checkpoints"]) == {"structure.pt", "generation.pt"}
    assert (out / "contact_sheet.png").is_file()
    # The cohort (no atlas: generated anatomy has none) mixes into the segmentation's training data.
    from medsynth.data.dataset import make_slice_dataset
    from medsynth.data.mixing import training_mixture

    real = make_slice_dataset(manifest, "train", image_size=SIZE, cache="none", progress=False)
    mixture = training_mixture(real, synthetic_dir=str(out), multiple=1.0, image_size=SIZE,
                               cache_dir=str(tmp_path / "cache"), slice_selection="all")  # fmt: skip
    sources = {mixture["dataset"][i]["source"] for i in mixture["sampler"]}
    assert sources == {"real", "synthetic"} and mixture["dataset"].extra_size == 3
    # A rerun redoes nothing and gives the same cohort; asking for more continues from there.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    again = _builder(root, manifest, out, num_cases=3, structure_filter_mae=1.01, dice_threshold=0.0).run()
    assert again == summary and {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == before
    # The filters refuse: a structure threshold of 0 refuses every map, a Dice of 1.01 every case.
    refused = _builder(root, manifest, tmp_path / "none", num_cases=1, max_candidates=4,
                       structure_filter_mae=0.0).run()  # fmt: skip
    assert refused["accepted"] == 0 and refused["rejected"]["structure_filter"] == 4
    strict = _builder(root, manifest, tmp_path / "strict", num_cases=1, max_candidates=4,
                      structure_filter_mae=1.01, dice_threshold=1.01).run()  # fmt: skip
    assert (
        strict["accepted"] == 0
        and strict["rejected"]["dice_filter"] + strict["rejected"]["label_outside_brain"] == 4
    )
    assert strict["dice_filter_pass_rate"] in (0.0, None)


TINY_SFM = {
    "phantom_patients": 3,
    "phantom_shape": [40, 40, 6],
    "image_size": 32,
    "num_epochs": 1,
    "batch_size": 2,
    "structure_features": [4, 8, 8, 8],
    "mask_features": [4, 8, 8, 8],
    "code_channels": 3,
    "code_d_features": 8,
    "d_base_filters": 4,
    "d_num_layers": 2,
    "num_samples": 4,
    "generator_features": [4, 8, 8, 8],
    "segmenter_features": [4, 8, 8, 8],
}


@pytest.mark.usefixtures("from_repository_root")
@pytest.mark.filterwarnings("ignore:parsing config_file")
def test_the_bundle_trains_both_stages_and_synthesises_a_cohort_from_noise(tmp_path, tiny_phantom_cache):
    import json

    from monai.bundle import run

    from medsynth.data.manifest import read_manifest

    configs = Path("bundles/sfm_gan/configs")
    common = {"output_dir": str(tmp_path / "sfm"), "cache_dir": tiny_phantom_cache, **TINY_SFM}
    run(config_file=str(configs / "train_structure.json"), meta_file=str(configs / "metadata.json"), **common)
    out = tmp_path / "sfm"
    assert (out / "models" / "structure.pt").is_file()
    history = json.loads((out / "samples_structure" / "structure_filter.json").read_text())
    assert [h["epoch"] for h in history] == [1] and 0.0 <= history[0]["pass_rate"] <= 1.0
    assert (out / "samples_structure" / "epoch_0001_structures.png").is_file()
    run(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"), **common)
    assert (out / "models" / "generation.pt").is_file()
    assert (
        sorted(p.name for p in (out / "samples_generation").glob("*.png"))[0] == "epoch_0001_generation_0.png"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["generation", "structure"]
    # Filters opened so that the untrained tiny models yield cases: the path is what is checked here.
    run(
        config_file=[str(configs / "train.json"), str(configs / "synthesize.json")],
        meta_file=str(configs / "metadata.json"),
        num_cases=2,
        max_candidates=200,
        structure_filter_mae=1.01,
        dice_threshold=0.0,
        **common,
    )
    summary = json.loads((out / "synthetic" / "noise_summary.json").read_text())
    assert summary["structure_filter_pass_rate"] == 1.0  # every map passes a threshold above any MAE
    assert summary["accepted"] + sum(summary["rejected"].values()) == summary["candidates"] > 0
    # The cohort itself (labels inside the brain, provenance, resuming) is checked on the builder above.
    listed = read_manifest(out / "synthetic" / "manifest.csv") if summary["accepted"] else []
    assert len(listed) == summary["accepted"]
    # The study runner makes the same kind of cohort through the bundle's synthesize workflow.
    from medsynth.studies.runner import StudySpec, make_synthetic_cohort

    opened = {"max_candidates": 5, "structure_filter_mae": 1.01, "dice_threshold": 0.0}
    settings = {"bundle": "bundles/sfm_gan", "workflow": "synthesize", "output_dir": str(out), "cases": 1,
                "overrides": {**TINY_SFM, **opened}}  # fmt: skip
    spec = StudySpec(name="qu", arms=[{"name": "real"}], seeds=[0], cache_dir=tiny_phantom_cache,
                     out_dir=str(tmp_path / "study"), synthesis={"sfm_gan": settings})  # fmt: skip
    cohort_dir = Path(make_synthetic_cohort(spec, "sfm_gan", seed=3))
    made = json.loads((cohort_dir / "noise_summary.json").read_text())
    assert made["seed"] == 3 and made["candidates"] >= 1


def test_chosen_labels_and_only_closed_outlines_reach_the_cohort(tiny_models, tmp_path, monkeypatch):
    """Maps whose outline is closed pass Algorithm 3 and reach the cohort with their contour closed;
    open ones are refused; the lesions come from the chosen label file."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from medsynth.data.manifest import read_manifest
    from medsynth.utils.io import save_nifti

    root, manifest = tiny_models
    chosen = np.ones((32, 32), np.uint8)
    chosen[12:18, 12:18] = 3  # a cavity, which the tiny cohort's labels never have
    label_file = save_nifti(chosen, np.eye(4), tmp_path / "my_label.nii.gz")
    builder = _builder(root, manifest, tmp_path / "out", num_cases=2, max_candidates=8, dice_threshold=0.0,
                       label_paths=[str(label_file)])  # fmt: skip
    ring = torch.zeros(1, 1, SIZE, SIZE)
    ring[..., 2:14, 2:14] = 1
    ring[..., 4:12, 4:12] = 0  # a closed outline two pixels thick
    opened = ring.clone()
    opened[..., 2:4, 6:10] = 0  # cut through the top
    calls = iter([ring if i % 2 == 0 else opened for i in range(8)])
    monkeypatch.setattr(builder.vae, "sample", lambda *args, **kwargs: next(calls))
    disc = torch.zeros(1, 1, SIZE, SIZE)
    disc[..., 1:15, 1:15] = 1  # the ring's filled area (the blur before the fill adds a pixel around)
    monkeypatch.setattr(builder.mask_generator, "forward", lambda maps: disc * 10 - 5)
    summary = builder.run()
    assert summary["accepted"] == 2 and summary["rejected"]["structure_filter"] == 1  # candidates 0, 1, 2
    for _, row in read_manifest(tmp_path / "out" / "manifest.csv").iterrows():
        structure = np.asarray(nib.load(Path(row["label"]).parent / "structure.nii.gz").dataobj)[..., 0] > 0
        assert ndimage.binary_fill_holes(structure).sum() > structure.sum()  # the contour encloses the inside
        label = np.asarray(nib.load(row["label"]).dataobj)[..., 0]
        assert set(np.unique(label)) <= {0, 1, 3} and (label == 3).any()  # the chosen cavity
        assert row["source_patient"] == "my_label"
