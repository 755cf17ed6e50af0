"""Generator parts, the SAMR / CG-SAMR generators, PatchGAN discriminators and the lesion U-Net."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medsynth.constants import BRATS_SEQUENCES, CLINICAL_SEQUENCES, NUM_LABELS, ROI_LABELS
from medsynth.networks import (
    CGSAMRGenerator,
    ConfidenceGuidedDecoder,
    DualEncoder,
    LabelWiseMultiScaleDiscriminator,
    MultiScalePatchDiscriminator,
    PatchGANDiscriminator,
    ResidualBlock,
    ResidualTrunk,
    SAMRGenerator,
    StretchOutDecoder,
    SynthesisInferenceNetwork,
    make_lesion_unet,
    roi_masks,
)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def one_hot_mask(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_LABELS, (batch, 1, size, size), generator=generator)
    return F.one_hot(labels[:, 0], NUM_LABELS).permute(0, 3, 1, 2).float()


def inputs(
    num_sequences: int, batch: int = 2, size: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    atlas = torch.rand(batch, 3 * num_sequences, size, size, generator=generator) * 2 - 1
    return one_hot_mask(batch, size, seed), atlas


# ---------------------------------------------------------------------------------------------
# Parameter counts (published / authors' implementation, 5 mask + 15 atlas channels, 5 outputs)


def test_parameter_counts_match_the_authors_networks():
    assert count(CGSAMRGenerator(num_sequences=5, mask_channels=5, atlas_channels=15)) == 3_213_447
    assert count(SAMRGenerator(num_sequences=5, mask_channels=5, atlas_channels=15)) == 4_672_037
    assert count(LabelWiseMultiScaleDiscriminator(in_channels=5 + 5 + 15)) == 16_734_342


def test_parameter_counts_of_the_ablated_networks():
    # Counted here and documented in bundles/cg_samr/docs/README.md, "Ablations".
    assert count(CGSAMRGenerator(5, stretch_out=False)) == 2_844_943
    assert count(CGSAMRGenerator(5, use_atlas=False)) == 825_511
    assert count(SAMRGenerator(5, stretch_out=False)) == 3_119_525
    assert count(LabelWiseMultiScaleDiscriminator(25, label_wise=False)) == 16_734_342 // 3


def test_parameter_count_breakdown():
    samr = SAMRGenerator()
    assert count(samr.encoder.mask_encoder) == 27_296 and count(samr.encoder.atlas_encoder) == 35_136
    assert count(ResidualBlock(128)) == 295_680
    assert [count(branch) for branch in samr.decoder.branches] == [389_697] * 5
    cgsamr = CGSAMRGenerator()
    # One synthesis and one confidence module shared by the five branches (authors' code).
    assert count(cgsamr.decoder.synthesis) + count(cgsamr.decoder.confidence) == 18_370
    assert [count(branch) for branch in cgsamr.decoder.branches] == [94_305] * 5
    assert count(PatchGANDiscriminator(25)) == 2_789_057


def test_generators_are_composed_of_named_reusable_parts():
    samr, cgsamr = SAMRGenerator(), CGSAMRGenerator()
    for generator in (samr, cgsamr):
        assert isinstance(generator.encoder, DualEncoder) and isinstance(generator.trunk, ResidualTrunk)
        assert count(generator.encoder) == 27_296 + 35_136 and count(generator.trunk) == 9 * 295_680
    assert isinstance(samr.decoder, StretchOutDecoder) and isinstance(cgsamr.decoder, ConfidenceGuidedDecoder)
    # The parts stand alone with the generators' counts, so a new method can reuse them as they are.
    assert count(StretchOutDecoder(128, num_outputs=5)) == count(samr.decoder) == 5 * 389_697
    assert count(ConfidenceGuidedDecoder(128, num_outputs=5, guidance_width=16)) == count(cgsamr.decoder)
    assert count(cgsamr) == count(cgsamr.encoder) + count(cgsamr.trunk) + count(cgsamr.decoder)
    latent = torch.rand(1, 128, 8, 8)
    guided = ConfidenceGuidedDecoder(128, num_outputs=3, guidance_width=16)(latent)
    assert {key: tuple(value.shape) for key, value in guided.items()} == {
        "images": (1, 3, 32, 32),
        "intermediate": (1, 3, 16, 16),
        "confidence": (1, 3, 16, 16),
    }
    assert StretchOutDecoder(128, num_outputs=2, branch_residual_block=False)(latent).shape == (1, 2, 32, 32)
    # The multi-scale PatchGAN without the label-wise wrapper: pix2pixHD's discriminator.
    multi_scale = MultiScalePatchDiscriminator(7, num_scales=2)
    assert count(multi_scale) == 2 * count(PatchGANDiscriminator(7))
    outputs = multi_scale(torch.rand(1, 7, 32, 32))
    assert len(outputs) == 2 and outputs[1][-1].shape[-1] < outputs[0][-1].shape[-1]


@pytest.mark.parametrize("generator_class", [SAMRGenerator, CGSAMRGenerator])
def test_checkpoints_of_the_flat_networks_of_0_1_still_load(generator_class):
    torch.manual_seed(0)
    generator = generator_class(num_sequences=3, base_width=4, num_res_blocks=1)
    discriminator = LabelWiseMultiScaleDiscriminator(5 + 4 * 3, base_filters=8, num_layers=2)
    renames = {
        "encoder.mask_encoder.": "mask_encoder.",
        "encoder.atlas_encoder.": "atlas_encoder.",
        "trunk.": "res_blocks.",
        "decoder.branches.": "branches.",
        "decoder.synthesis.": "synthesis.",
        "decoder.confidence.": "confidence.",
    }

    def old_name(key):
        for new, old in renames.items():
            if key.startswith(new):
                return old + key[len(new) :]
        raise AssertionError(key)

    flat_generator = {old_name(k): v for k, v in generator.state_dict().items()}
    flat_discriminator = {}
    for key, value in discriminator.state_dict().items():
        _, roi, _, scale, rest = key.split(".", 4)
        flat_discriminator[f"discriminators.{roi}_s{scale}.{rest}"] = value
    fresh_generator = generator_class(num_sequences=3, base_width=4, num_res_blocks=1)
    fresh_discriminator = LabelWiseMultiScaleDiscriminator(5 + 4 * 3, base_filters=8, num_layers=2)
    fresh_generator.load_state_dict(flat_generator)  # strict: every name must map
    fresh_discriminator.load_state_dict(flat_discriminator)
    for original, loaded in ((generator, fresh_generator), (discriminator, fresh_discriminator)):
        for (name, a), b in zip(original.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    wrapped = SynthesisInferenceNetwork(generator_class(num_sequences=3, base_width=4, num_res_blocks=1))
    wrapped.load_state_dict({f"generator.{k}": v for k, v in flat_generator.items()})


def test_atlas_channels_default_to_three_slices_per_sequence():
    generator = CGSAMRGenerator(num_sequences=len(BRATS_SEQUENCES))
    assert generator.atlas_channels == 12
    assert generator.encoder.atlas_encoder[1].conv.in_channels == 12


# ---------------------------------------------------------------------------------------------
# Generators


@pytest.mark.parametrize("sequences", [CLINICAL_SEQUENCES, BRATS_SEQUENCES])
def test_cgsamr_outputs_shapes_and_ranges(sequences):
    torch.manual_seed(0)
    generator = CGSAMRGenerator(num_sequences=len(sequences), num_res_blocks=2)
    mask, atlas = inputs(len(sequences), batch=2, size=32)
    out = generator(mask, atlas)
    n = len(sequences)
    assert set(out) == {"images", "intermediate", "confidence"}
    assert out["images"].shape == (2, n, 32, 32)
    assert out["intermediate"].shape == (2, n, 16, 16)
    assert out["confidence"].shape == (2, n, 16, 16)
    assert out["images"].abs().max() <= 1 and out["intermediate"].abs().max() <= 1
    assert out["confidence"].min() > 0 and out["confidence"].max() < 1


def test_cgsamr_feeds_confidence_masked_intermediate_to_the_last_upsampling():
    torch.manual_seed(0)
    generator = CGSAMRGenerator(num_res_blocks=1).eval()
    captured = {}
    branch = generator.decoder.branches[3]
    branch.to_full_scale.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    features = {}
    branch.to_half_scale.register_forward_hook(lambda module, args, output: features.update(f=output))
    out = generator(*inputs(5, batch=1, size=32))
    guided = out["intermediate"][:, 3:4] * out["confidence"][:, 3:4]
    assert captured["x"].shape == (1, 65, 16, 16)
    torch.testing.assert_close(captured["x"][:, :64], features["f"])
    torch.testing.assert_close(captured["x"][:, 64:], guided)


@pytest.mark.parametrize("generator_class", [SAMRGenerator, CGSAMRGenerator])
def test_output_channels_follow_sequence_order(generator_class):
    torch.manual_seed(0)
    generator = generator_class(num_res_blocks=1).eval()
    # Make branch k's output head a constant tanh(0.1 * (k + 1)).
    for k, branch in enumerate(generator.decoder.branches):
        head = branch[-1] if generator_class is SAMRGenerator else branch.to_full_scale[-1]
        conv = head[1].conv
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.constant_(conv.bias, 0.1 * (k + 1))
    images = generator(*inputs(5, batch=1, size=16))["images"]
    expected = torch.tanh(0.1 * torch.arange(1, 6, dtype=torch.float32))
    torch.testing.assert_close(images.mean(dim=(0, 2, 3)), expected)
    torch.testing.assert_close(images.amax(dim=(0, 2, 3)), images.amin(dim=(0, 2, 3)))


def test_samr_shapes_with_instance_norm_and_other_widths():
    torch.manual_seed(0)
    generator = SAMRGenerator(
        num_sequences=4, base_width=8, num_downsampling=3, num_res_blocks=1, norm="instance"
    )
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in generator.modules())
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in generator.modules())
    out = generator(*inputs(4, batch=1, size=40))
    assert set(out) == {"images"} and out["images"].shape == (1, 4, 40, 40)


@pytest.mark.parametrize("steps,size", [(1, 18), (3, 24)])
def test_cgsamr_other_downsampling_depths(steps, size):
    generator = CGSAMRGenerator(num_sequences=2, base_width=4, num_downsampling=steps, num_res_blocks=1)
    out = generator(*inputs(2, batch=2, size=size))
    assert out["images"].shape == (2, 2, size, size)
    assert out["confidence"].shape == (2, 2, size // 2, size // 2)


def test_generator_rejects_bad_inputs():
    generator = CGSAMRGenerator(num_res_blocks=0)
    mask, atlas = inputs(5, batch=1, size=32)
    with pytest.raises(ValueError, match="divisible by 4"):
        generator(mask[..., :30, :30], atlas[..., :30, :30])
    with pytest.raises(ValueError, match="15 atlas channels"):
        generator(mask, atlas[:, :12])
    with pytest.raises(ValueError, match="differ"):
        generator(mask, atlas[:, :, :16, :16])
    with pytest.raises(ValueError, match="unknown norm"):
        SAMRGenerator(norm="group")
    with pytest.raises(ValueError, match="num_downsampling >= 1"):
        CGSAMRGenerator(num_downsampling=0)


@pytest.mark.parametrize("generator_class", [SAMRGenerator, CGSAMRGenerator])
def test_inference_network_scripts_and_traces(generator_class):
    torch.manual_seed(0)
    generator = generator_class(num_sequences=4, base_width=8, num_res_blocks=1)
    network = SynthesisInferenceNetwork(generator, mask_channels=NUM_LABELS).eval()
    mask, atlas = inputs(4, batch=2, size=32)
    x = torch.cat([mask, atlas], dim=1)
    with torch.no_grad():
        eager = network(x)
        torch.testing.assert_close(eager, generator(mask, atlas)["images"])
        scripted = torch.jit.script(network)
        torch.testing.assert_close(scripted(x), eager)
        traced = torch.jit.trace(network, x)
        torch.testing.assert_close(traced(x), eager)
        other = torch.cat(inputs(4, batch=1, size=32, seed=1), dim=1)
        torch.testing.assert_close(traced(other), network(other))
    assert eager.shape == (2, 4, 32, 32)


# ---------------------------------------------------------------------------------------------
# Discriminators


def test_roi_masks_partition_the_image():
    mask = one_hot_mask(2, 16)
    rois = roi_masks(mask)
    assert list(rois) == list(ROI_LABELS)
    torch.testing.assert_close(sum(rois.values()), torch.ones(2, 1, 16, 16))
    labels = mask.argmax(dim=1, keepdim=True)
    torch.testing.assert_close(rois["lesion"], (labels >= 2).float())
    with pytest.raises(ValueError, match="one-hot"):
        roi_masks(mask[:, :4])


def test_label_wise_discriminator_structure_and_inputs():
    torch.manual_seed(0)
    n = 4
    discriminator = LabelWiseMultiScaleDiscriminator(in_channels=NUM_LABELS + 4 * n, base_filters=8).eval()
    assert list(discriminator.discriminators) == ["background", "normal_brain", "lesion"]
    assert all(isinstance(d, MultiScalePatchDiscriminator) for d in discriminator.discriminators.values())
    seen = {}
    for roi, multi_scale in discriminator.discriminators.items():
        for scale, module in enumerate(multi_scale.discriminators):
            key = f"{roi}_s{scale}"
            module.register_forward_pre_hook(lambda m, args, key=key: seen.update({key: args[0]}))
    mask, atlas = inputs(n, batch=2, size=32)
    images = torch.rand(2, n, 32, 32) * 2 - 1
    originals = [t.clone() for t in (mask, images, atlas)]
    outputs = discriminator(mask, images, atlas)

    for original, tensor in zip(originals, (mask, images, atlas), strict=True):
        assert torch.equal(original, tensor)  # the batch is never modified in place
    x = torch.cat([mask, images, atlas], dim=1)
    pool = torch.nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
    for roi, labels in ROI_LABELS.items():
        roi_mask = mask[:, list(labels)].sum(dim=1, keepdim=True)
        torch.testing.assert_close(seen[f"{roi}_s0"], x * roi_mask)
        torch.testing.assert_close(seen[f"{roi}_s1"], pool(x * roi_mask))
    assert len(outputs) == 6 and all(len(features) == 5 for features in outputs)
    # 32 -> 17 -> 9 -> 5 -> 6 -> 7 (4x4 convs, padding 2), half scale 16 -> 9 -> 5 -> 3 -> 4 -> 5
    assert [f.shape[1:] for f in outputs[0]] == [(8, 17, 17), (16, 9, 9), (32, 5, 5), (64, 6, 6), (1, 7, 7)]
    assert outputs[1][-1].shape == (2, 1, 5, 5)


def test_each_discriminator_sees_only_its_region():
    torch.manual_seed(0)
    discriminator = LabelWiseMultiScaleDiscriminator(in_channels=NUM_LABELS + 2 + 6, base_filters=8).eval()
    mask = torch.zeros(1, NUM_LABELS, 32, 32)
    mask[:, 0] = 1
    mask[:, 0, 8:24, 8:24] = 0
    mask[:, 1, 8:24, 8:24] = 1
    mask[:, 1, 12:20, 12:20] = 0
    mask[:, 4, 12:20, 12:20] = 1  # tumour inside normal brain inside background
    atlas = torch.rand(1, 6, 32, 32)
    images = torch.rand(1, 2, 32, 32)
    changed = images.clone()
    changed[..., 12:20, 12:20] = -1  # edit the lesion only
    with torch.no_grad():
        before = discriminator(mask, images, atlas)
        after = discriminator(mask, changed, atlas)
    keys = [f"{roi}_s{scale}" for roi in ROI_LABELS for scale in (0, 1)]
    predictions = {key: (b[-1], a[-1]) for key, b, a in zip(keys, before, after, strict=True)}
    for key in ("background_s0", "background_s1", "normal_brain_s0", "normal_brain_s1"):
        torch.testing.assert_close(predictions[key][0], predictions[key][1])
    for key in ("lesion_s0", "lesion_s1"):
        assert not torch.allclose(predictions[key][0], predictions[key][1])


def test_discriminator_checks_channels_and_caps_filters():
    discriminator = LabelWiseMultiScaleDiscriminator(in_channels=25, base_filters=8)
    mask, atlas = inputs(5, batch=1, size=32)
    with pytest.raises(ValueError, match="expects 25"):
        discriminator(mask, torch.zeros(1, 4, 32, 32), atlas)
    capped = PatchGANDiscriminator(3, base_filters=16, num_layers=3, max_filters=32)
    widths = [block.conv.out_channels for block in capped]
    assert widths == [16, 32, 32, 32, 1]


# ---------------------------------------------------------------------------------------------
# Lesion U-Net


def test_lesion_unet_predicts_five_classes_from_the_sequences():
    torch.manual_seed(0)
    unet = make_lesion_unet(num_sequences=len(BRATS_SEQUENCES), channels=(8, 16, 32), strides=(2, 2))
    logits = unet(torch.rand(2, 4, 32, 32))
    assert logits.shape == (2, NUM_LABELS, 32, 32)
    with pytest.raises(ValueError):
        make_lesion_unet(num_sequences=0)
