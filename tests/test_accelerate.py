"""optimize_for_inference: equivalence with eager, graph rewrites, fallback, one-tensor contract."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from medsynth.inference.accelerate import (
    DEFAULT_TOLERANCE,
    InferenceModule,
    StridedSubPixelConv2d,
    auto_backend,
    fold_batch_norm,
    optimize_for_inference,
    rewrite_narrow_convolutions,
)
from medsynth.networks import CGSAMRGenerator, SAMRGenerator, SynthesisInferenceNetwork

SIZE = 32
NUM_SEQUENCES = 5
IN_CHANNELS = 5 + 3 * NUM_SEQUENCES


def _inputs(batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (batch, SIZE, SIZE), generator=generator)
    mask = nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).float()
    atlas = torch.rand((batch, 3 * NUM_SEQUENCES, SIZE, SIZE), generator=generator) * 2 - 1
    return torch.cat([mask, atlas], dim=1)


def _tiny_network(generator_class: type[nn.Module], seed: int = 0) -> SynthesisInferenceNetwork:
    """A tiny generator with He-initialised convolutions (outputs spread over [-1, 1]) and trained BN
    statistics."""
    torch.manual_seed(seed)
    network = SynthesisInferenceNetwork(generator_class(base_width=4, num_res_blocks=2))
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.normal_(module.bias, std=0.1)
        elif isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    network.train()
    with torch.no_grad():
        for step in range(3):
            network(_inputs(4, seed=100 + step))
    return network.eval()


@pytest.fixture(scope="module", params=[CGSAMRGenerator, SAMRGenerator], ids=["cgsamr", "samr"])
def network(request) -> SynthesisInferenceNetwork:
    return _tiny_network(request.param)


@pytest.mark.parametrize("backend", ["eager", "jit"])
def test_optimized_matches_eager(network, backend):
    example, other = _inputs(3, seed=1), _inputs(5, seed=2)
    with torch.no_grad():
        expected = network(other)
    assert expected.std() > 0.2  # realistic output range, so the tolerance check means something
    optimized = optimize_for_inference(network, example, "cpu", backend=backend)
    assert optimized.backend == backend
    num_batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    # The 7x7 output heads (one per sequence) and, at base width 4, the encoders' first 7x7 convs.
    num_narrow = sum(
        type(m) is nn.Conv2d and m.out_channels <= 4 and m.kernel_size == (7, 7) for m in network.modules()
    )
    assert num_narrow == NUM_SEQUENCES + 2
    assert optimized.rewrites == {"folded_batch_norms": num_batch_norms, "narrow_convolutions": num_narrow}
    assert optimized.max_abs_diff <= 1e-5
    output = optimized(other)  # another batch size than the example
    assert isinstance(output, torch.Tensor) and output.dtype == torch.float32
    assert output.shape == (5, NUM_SEQUENCES, SIZE, SIZE)
    assert torch.allclose(output, expected, atol=1e-5, rtol=0)


def test_bf16_within_its_tolerance(network):
    example = _inputs(2, seed=3)
    optimized = optimize_for_inference(network, example, "cpu", precision="bf16", backend="eager")
    assert optimized.precision == "bf16" and optimized.backend == "eager"
    with torch.no_grad():
        expected = network(example)
    difference = (optimized(example) - expected).abs().max().item()
    assert 0 < difference <= DEFAULT_TOLERANCE["bf16"]  # really bf16, not silently fp32


def test_original_network_untouched(network):
    state = {k: v.clone() for k, v in network.state_dict().items()}
    optimized = optimize_for_inference(network, _inputs(2, seed=4), "cpu")
    assert any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in optimized.modules())
    for key, value in network.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert list(optimized.state_dict()) == ["module." + key for key in optimized.module.state_dict()]
    optimized.train()  # only the flag: the folded network keeps running in inference mode
    assert optimized.training and not optimized.module.training
    assert not network.training


def test_fold_batch_norm_conv_and_transposed():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.Sequential(nn.BatchNorm2d(6), nn.ReLU()),  # nested, as MONAI's Convolution(conv, ADN(N, A))
        nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # follows a ReLU: must stay
    )
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8) * 3 + 1)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)))
    assert fold_batch_norm(model) == 2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 1
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("out_channels", "kernel", "padding", "factor", "size"),
    [(1, 7, 0, 4, (38, 38)), (2, 5, 2, 4, (13, 22)), (1, 7, 3, 2, (9, 17)), (3, 5, 0, 3, (20, 11))],
)
def test_strided_sub_pixel_conv_equals_conv(out_channels, kernel, padding, factor, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, out_channels, kernel, padding=padding)
    x = torch.randn(2, 6, *size)
    rewritten = StridedSubPixelConv2d(conv, factor)
    with torch.no_grad():
        expected = conv(x)
        output = rewritten(x)
        output_cl = rewritten(x.contiguous(memory_format=torch.channels_last))
    assert output.shape == expected.shape
    assert torch.allclose(output, expected, atol=1e-5)
    assert torch.allclose(output_cl, expected, atol=1e-5)


def test_rewrite_narrow_convolutions_selects_heads_only():
    model = nn.Sequential(
        nn.Conv2d(4, 1, 7), nn.Conv2d(1, 16, 7), nn.Conv2d(16, 1, 3), nn.Conv2d(1, 1, 7, stride=2)
    )
    assert rewrite_narrow_convolutions(model) == 1
    assert isinstance(model[0], StridedSubPixelConv2d)
    assert [type(m) for m in model[1:]] == [nn.Conv2d] * 3
    with pytest.raises(ValueError, match="stride 1"):
        StridedSubPixelConv2d(nn.Conv2d(1, 1, 7, stride=2))


def test_fixed_batch_runs_chunks_and_pads(network):
    # The chunking a compiled runner relies on, checked with the eager runner (compiling is slow).
    optimized = optimize_for_inference(network, _inputs(3, seed=11), "cpu", backend="eager")
    optimized.fixed_batch = 3
    seen_batches = []
    optimized.module.register_forward_pre_hook(lambda module, args: seen_batches.append(args[0].shape[0]))
    x = _inputs(7, seed=12)
    with torch.no_grad():
        expected = network(x)
    output = optimized(x)
    assert seen_batches == [3, 3, 3]  # 3 + 3 + (1 padded to 3)
    assert output.shape == expected.shape
    assert torch.allclose(output, expected, atol=1e-5)


class _Untraceable(nn.Module):
    """Wraps a network; fails under torch.jit tracing, as a network with an untraceable operation would."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("this operation cannot be traced")
        return self.network(x)


def test_fallback_to_eager_is_logged(network, caplog):
    example = _inputs(2, seed=5)
    with caplog.at_level(logging.WARNING, logger="medsynth.inference.accelerate"):
        optimized = optimize_for_inference(_Untraceable(network), example, "cpu", backend="jit")
    assert optimized.backend == "eager"
    assert any("'jit'" in r.getMessage() and "cannot be traced" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        assert torch.allclose(optimized(example), network(example), atol=1e-5)


def test_fallback_to_plain_when_tolerance_fails(network, caplog):
    example = _inputs(2, seed=6)
    with caplog.at_level(logging.WARNING, logger="medsynth.inference.accelerate"):
        optimized = optimize_for_inference(
            network, example, "cpu", precision="bf16", backend="eager", tolerance=1e-4
        )
    assert (optimized.backend, optimized.precision) == ("plain", "fp32")
    assert sum("tolerance" in r.getMessage() for r in caplog.records) == 1  # eager bf16 rejected, once
    with torch.no_grad():
        assert torch.allclose(optimized(example), network(example), atol=1e-5)


class _DictOutput(nn.Module):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"images": self.network(x)}


def test_contract_errors(network):
    example = _inputs(1, seed=7)
    with pytest.raises(ValueError, match="precision"):
        optimize_for_inference(network, example, "cpu", precision="fp16")
    with pytest.raises(ValueError, match="backend"):
        optimize_for_inference(network, example, "cpu", backend="tensorrt")
    with pytest.raises(TypeError, match="one tensor"):
        optimize_for_inference(_DictOutput(network), example, "cpu")


def test_volume_inferer_with_optimized_network(network):
    from medsynth.inference import SliceStackInferer

    rng = np.random.default_rng(0)
    labels = torch.as_tensor(rng.integers(0, 5, size=(SIZE, SIZE, 4)))
    mask = nn.functional.one_hot(labels, 5).permute(3, 0, 1, 2).float()
    atlas = torch.as_tensor(rng.uniform(-1, 1, size=(NUM_SEQUENCES, SIZE, SIZE, 4)), dtype=torch.float32)
    volume = torch.cat([mask, atlas])[None]  # (1, 5 + N, H, W, D), as the bundles' preprocessing makes it
    optimized = optimize_for_inference(network, _inputs(4, seed=8), "cpu")
    inferer = SliceStackInferer(batch_size=4)
    expected, result = inferer(volume, network), inferer(volume, optimized)
    assert expected.shape == (1, NUM_SEQUENCES, SIZE, SIZE, 4)
    torch.testing.assert_close(result, expected, atol=1e-4 * float(expected.max() - expected.min()), rtol=0)


@pytest.mark.slow
def test_auto_compiles_on_cpu_and_matches_eager(network):
    assert auto_backend("cpu") == "compile" and auto_backend("cuda") == "eager"
    example, larger = _inputs(2, seed=9), _inputs(5, seed=10)
    optimized = optimize_for_inference(network, example, "cpu")
    assert isinstance(optimized, InferenceModule)
    assert (optimized.backend, optimized.fixed_batch) == ("compile", 2)  # tiny slices: the whole example
    single = optimize_for_inference(network, example, "cpu", micro_batch=1)
    assert single.fixed_batch == 1
    with torch.no_grad():
        torch.testing.assert_close(single(larger), network(larger), atol=1e-4, rtol=0)
    with torch.no_grad():
        expected = network(larger)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    output = optimized(larger)  # chunks of 2, the last one padded: no recompilation needed
    with torch.inference_mode():
        optimized(larger.clone())  # an inference tensor, as volume synthesis makes them
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
    assert output.shape == expected.shape
    assert torch.allclose(output, expected, atol=1e-4)


def test_micro_batch_size_keeps_one_layer_output_within_the_budget(monkeypatch):
    import medsynth.inference.accelerate as accelerate

    network = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    example = torch.randn(10, 1, 16, 16)
    largest = 8 * 16 * 16 * 4  # bytes of the first convolution's output for one sample
    monkeypatch.setattr(accelerate, "CPU_MICRO_BATCH_BYTES", 3 * largest + 1)
    assert accelerate.micro_batch_size(network, example, "cpu") == 3
    monkeypatch.setattr(accelerate, "CPU_MICRO_BATCH_BYTES", 1)
    assert accelerate.micro_batch_size(network, example, "cpu") == 1
    monkeypatch.setattr(accelerate, "CPU_MICRO_BATCH_BYTES", 10**12)
    assert accelerate.micro_batch_size(network, example, "cpu") == 10  # never more than the example
    assert accelerate.micro_batch_size(network, example, "cuda") == 10  # GPUs take the whole batch
    assert not any(module._forward_hooks for module in network.modules())  # the probes are removed
    with pytest.raises(ValueError, match="micro_batch"):
        optimize_for_inference(network, example, "cpu", micro_batch=0)
