"""The CG-SAMR ablations of CG-SAMR Table V and SAMR Table 2 Exp. 4 (override files in
``bundles/cg_samr/configs/ablations``): each switch really changes the model or the loss, and an
ablated model trains and synthesises through the bundle's own workflows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bundle_helpers import TINY_DATA, TINY_NETWORKS, TINY_TRAINING
from monai.bundle import ConfigParser, run

pytestmark = [
    pytest.mark.filterwarnings("ignore:parsing config_file"),
    pytest.mark.usefixtures("from_repository_root"),
]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "cg_samr" / "configs"
ABLATIONS = ("no_stretch_out", "no_labelwise_d", "no_atlas", "no_lsc", "no_lcm")
TINY = {**TINY_DATA, **TINY_NETWORKS["cg_samr"], **TINY_TRAINING}


def _parser(ablation: str | None, cache_dir: str, out: Path) -> ConfigParser:
    parser = ConfigParser()
    files = [str(CONFIGS / "train.json")] + (
        [str(CONFIGS / "ablations" / f"{ablation}.json")] if ablation else []
    )
    parser.read_config(files)
    parser.update({**TINY, "cache_dir": cache_dir, "output_dir": str(out)})
    return parser


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _step_record(parser: ConfigParser) -> dict[str, float]:
    trainer = parser.get_parsed_content("train#trainer")
    batch = trainer.prepare_batch(next(iter(trainer.data_loader)), trainer.state.device or "cpu")
    return trainer.train_step(batch)


def test_every_ablation_switch_changes_the_model_or_the_loss(tmp_path, tiny_phantom_cache):
    base = _parser(None, tiny_phantom_cache, tmp_path / "base")
    generator, discriminator = base.get_parsed_content("generator"), base.get_parsed_content("discriminator")
    base_record = _step_record(base)
    assert {"loss_sc", "loss_cm"} <= set(base_record)
    num_sequences = base.get_parsed_content("num_sequences")

    ablated = {name: _parser(name, tiny_phantom_cache, tmp_path / name) for name in ABLATIONS}
    for name, parser in ablated.items():
        assert parser.get_parsed_content("output_dir") == str(tmp_path / name)  # the command line wins
        assert parser["output_dir"] == str(tmp_path / name)

    no_stretch = ablated["no_stretch_out"].get_parsed_content("generator")
    assert len(no_stretch.decoder.branches) == 1 and len(generator.decoder.branches) == num_sequences
    assert _count(no_stretch) < _count(generator)

    no_atlas = ablated["no_atlas"]
    assert no_atlas.get_parsed_content("generator").encoder.atlas_encoder is None
    assert _count(no_atlas.get_parsed_content("generator")) < _count(generator)
    assert (
        no_atlas.get_parsed_content("discriminator").discriminators["background"].in_channels
        == 5 + num_sequences
    )

    plain_d = ablated["no_labelwise_d"].get_parsed_content("discriminator")
    assert list(plain_d.discriminators) == ["image"] and 3 * _count(plain_d) == _count(discriminator)

    for name in ("no_lsc", "no_lcm"):  # the same networks, another loss
        assert _count(ablated[name].get_parsed_content("generator")) == _count(generator)
    no_lsc, no_lcm = _step_record(ablated["no_lsc"]), _step_record(ablated["no_lcm"])
    assert "loss_sc" not in no_lsc and "loss_cm" in no_lsc and "loss_u" in no_lsc  # the U-Net still trains
    assert "loss_cm" not in no_lcm and "loss_sc" in no_lcm
    for name in ("no_stretch_out", "no_labelwise_d", "no_atlas"):
        assert {"loss_sc", "loss_cm"} <= set(_step_record(ablated[name]))


def test_an_ablated_model_trains_and_synthesises_through_the_bundle_workflows(tmp_path, tiny_phantom_cache):
    ablation = str(CONFIGS / "ablations" / "no_atlas.json")
    out = tmp_path / "no_atlas"
    common = {"output_dir": str(out), "cache_dir": tiny_phantom_cache}
    run(config_file=[str(CONFIGS / "train.json"), ablation], **common, **TINY)
    assert (out / "models" / "model.pt").is_file()
    inference = {
        k: TINY[k]
        for k in ("phantom_patients", "phantom_shape", "image_size", "base_width", "num_res_blocks")
    }
    run(config_file=[str(CONFIGS / "inference.json"), ablation], **common, **inference, splits="test")
    written = sorted((out / "inference").glob("*/t1w.nii.gz"))
    assert written, "the ablated model synthesised nothing"
    # Without the ablation file the weights do not fit the network: the architecture is the ablation's.
    with pytest.raises(Exception) as raised:
        run(config_file=str(CONFIGS / "inference.json"), **common, **inference, splits="test")
    messages, error = [], raised.value
    while error is not None:  # MONAI wraps the loading error ("Failed to evaluate ...")
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("hold a CG-SAMR generator built with other settings" in message for message in messages)
