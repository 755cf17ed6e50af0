"""Faster inference of the one-tensor-in, one-tensor-out synthesis networks (CPU and CUDA).

:func:`optimize_for_inference` turns a network such as
:class:`~medsynth.networks.SynthesisInferenceNetwork` into an equivalent inference-only module:

1. **Graph rewrites in eager PyTorch** (exact up to float rounding), on a deep copy of the network:

   * :func:`fold_batch_norm`: every eval-mode ``BatchNorm2d`` that directly follows a convolution
     (also across MONAI's nested ``Convolution`` / ``ADN`` sequentials) is folded into the
     convolution's weight and bias and replaced by ``Identity``;
   * :func:`rewrite_narrow_convolutions`: convolutions with very few output channels and a large
     kernel (the 7x7, 32 -> 1 output heads, ~17 % of the naive CPU time of the generators) become a
     :class:`StridedSubPixelConv2d`: one stride-``r`` convolution with ``r * r`` times the output
     channels followed by ``pixel_shuffle``. It computes exactly the same sums, but oneDNN runs the
     16-channel strided convolution ~5x faster than the 1-channel one;
   * channels-last memory format for weights and activations (oneDNN / cuDNN's native layout).

2. **A backend** on top of the rewritten module: ``"eager"`` (nothing more), ``"jit"``
   (``torch.jit.trace`` + ``torch.jit.freeze``, which also folds constants) or ``"compile"``
   (``torch.compile`` with inductor and weight freezing: fuses the element-wise operations, the
   reflection paddings and the concatenations into generated C++/Triton kernels; its first call
   compiles: 10-30 s on 2 CPU cores for the default-size generators, once per micro-batch size and
   image size, see "Batching" below).
   ``"auto"`` is ``"compile"`` on CPU, where it was measured fastest (``benchmarks/README.md``; the
   jit path was no faster than eager there), and ``"eager"`` on other devices (not measured yet).

3. **Precision**: ``"fp32"`` (default) or ``"bf16"`` (``torch.autocast`` with bfloat16; outputs are
   returned as float32). bf16 is roughly twice as fast on GPUs and on CPUs with AVX512-BF16/AMX, but
   its error is far above the fp32 tolerance, so it is never chosen implicitly.

Every optimized network is checked against the plain eager network on ``example``: the largest
absolute output difference must not exceed ``tolerance`` (:data:`DEFAULT_TOLERANCE`: 1e-3 for fp32,
1e-1 for bf16, on the [-1, 1] image scale; bf16's largest pixel error is ~0.04 and its mean error
~5e-3 on the default-size generators). When a step fails (an exception, or the check) a warning is
logged and the next simpler variant is used: backend -> eager rewrites -> the plain
float32 network in eval mode. Nothing falls back silently.

Batching: the returned module accepts any batch size; pass all slices of a volume in one call. A
compiled module is specialized on one batch size, the *micro-batch*, and runs every call in chunks
of it (padding the last). On CPU the micro-batch is chosen so that one layer's output of a chunk
fits in :data:`CPU_MICRO_BATCH_BYTES` (a few slices at 256 x 256): the activations then stay in the
cache from one layer to the next, which made the compiled CG-SAMR 10-15 % faster than one 15-slice
batch (``benchmarks/README.md``). On GPUs the whole example batch is used.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = [
    "BACKENDS",
    "CPU_MICRO_BATCH_BYTES",
    "DEFAULT_TOLERANCE",
    "PRECISIONS",
    "InferenceModule",
    "StridedSubPixelConv2d",
    "auto_backend",
    "fold_batch_norm",
    "max_abs_difference",
    "micro_batch_size",
    "optimize_for_inference",
    "rewrite_narrow_convolutions",
]

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "eager", "jit", "compile")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
# Largest accepted |optimized - eager| on the [-1, 1] output scale.
DEFAULT_TOLERANCE: dict[str, float] = {"fp32": 1e-3, "bf16": 1e-1}
# Largest output of one layer for one compiled chunk on CPU: ~ the share of a shared L3 cache a
# 2-core slice of a server CPU gets (two 256 x 256 slices of CG-SAMR's 32-channel decoder features).
CPU_MICRO_BATCH_BYTES = 24 * 2**20

_CONVOLUTIONS = (nn.Conv2d, nn.ConvTranspose2d)


def _is_plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` (or subclass, e.g. MONAI's ``Convolution``) that chains its children unchanged."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _first_leaf(module: nn.Module) -> tuple[nn.Module, str, nn.Module] | None:
    """The module that first sees the input of ``module`` when it is a plain sequential: (parent, name,
    leaf)."""
    parent = module
    while _is_plain_sequential(parent) and len(parent) > 0:
        name, child = next(iter(parent.named_children()))
        if not _is_plain_sequential(child):
            return parent, name, child
        parent = child
    return None


def fold_batch_norm(module: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that directly consumes a convolution's output into it.

    Works in place on ``module`` (call it on a copy), which must be in eval mode. A batch norm is
    folded when it is the next module after a ``Conv2d`` / ``ConvTranspose2d`` in a plain
    sequential chain, including the first module of a nested sequential (MONAI's
    ``Convolution(conv, ADN(N, ...))``); it is replaced by ``nn.Identity``.

    Returns:
        The number of folded batch norms.
    """
    if module.training:
        raise ValueError("fold_batch_norm needs a module in eval mode (it uses the running statistics)")
    folded = 0
    for parent in list(module.modules()):
        if not _is_plain_sequential(parent):
            continue
        names = [name for name, _ in parent.named_children()]
        for current, following in itertools.pairwise(names):
            conv = getattr(parent, current)
            if not isinstance(conv, _CONVOLUTIONS):
                continue
            successor = getattr(parent, following)
            if isinstance(successor, nn.BatchNorm2d):
                holder, bn_name, bn = parent, following, successor
            else:
                found = _first_leaf(successor)
                if found is None or not isinstance(found[2], nn.BatchNorm2d):
                    continue
                holder, bn_name, bn = found
            if bn.running_mean is None or bn.running_var is None:
                continue  # batch statistics at inference: nothing constant to fold
            fused = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
            setattr(parent, current, fused)
            setattr(holder, bn_name, nn.Identity())
            folded += 1
    return folded


class StridedSubPixelConv2d(nn.Module):
    """A stride-1 ``Conv2d`` with few output channels, computed as a strided convolution + pixel shuffle.

    Output pixel ``(r * q + a, r * p + b)`` of a ``k x k`` convolution reads the input window that
    starts at ``(r * q + a, r * p + b)``. All ``r * r`` phases ``(a, b)`` are computed together by one
    convolution with stride ``r``, kernel ``k + r - 1`` and ``out_channels * r * r`` outputs, whose
    kernel for phase ``(a, b)`` is the original kernel shifted by ``(a, b)`` (zeros elsewhere);
    ``pixel_shuffle`` interleaves the phases. The sums are the same (the extra taps multiply zeros),
    for ``(1 + (r - 1) / k) ** 2`` times the multiply-adds, but with ``r * r`` times the output
    channels, which vectorizes far better when the original has only one or a few.

    Args:
        conv: the convolution to replace (stride 1, dilation 1, one group, zero padding mode).
        factor: the stride ``r`` of the replacement.
    """

    def __init__(self, conv: nn.Conv2d, factor: int = 4) -> None:
        super().__init__()
        if not self.supports(conv):
            raise ValueError(
                f"cannot rewrite {conv}: needs stride 1, dilation 1, groups 1, numeric zero padding"
            )
        if factor < 2:
            raise ValueError(f"factor must be >= 2, got {factor}")
        weight = conv.weight.detach()
        out_channels, in_channels, kernel_h, kernel_w = weight.shape
        strided = weight.new_zeros(
            out_channels, factor, factor, in_channels, kernel_h + factor - 1, kernel_w + factor - 1
        )
        for phase_h in range(factor):
            for phase_w in range(factor):
                strided[
                    :, phase_h, phase_w, :, phase_h : phase_h + kernel_h, phase_w : phase_w + kernel_w
                ] = weight
        self.weight = nn.Parameter(
            strided.reshape(out_channels * factor * factor, in_channels, *strided.shape[-2:])
        )
        bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(out_channels)
        self.bias = nn.Parameter(bias.repeat_interleave(factor * factor))
        self.factor = factor
        self.kernel_size = (kernel_h, kernel_w)
        padding = conv.padding if isinstance(conv.padding, tuple) else (conv.padding, conv.padding)
        self.padding = (int(padding[0]), int(padding[1]))

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        """Whether ``conv`` is a convolution this class can replace."""
        return (
            type(conv) is nn.Conv2d
            and tuple(conv.stride) == (1, 1)
            and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = self.padding
        height, width = x.shape[-2] + 2 * pad_h, x.shape[-1] + 2 * pad_w
        out_h, out_w = height - self.kernel_size[0] + 1, width - self.kernel_size[1] + 1
        r = self.factor
        # Rows/columns the strided windows need beyond the input; what they hold only reaches
        # output pixels that are cropped, so zeros do.
        extra_h = r * (-(-out_h // r) - 1) + self.weight.shape[-2] - height
        extra_w = r * (-(-out_w // r) - 1) + self.weight.shape[-1] - width
        if pad_h or pad_w or extra_h or extra_w:
            x = F.pad(x, (pad_w, pad_w + extra_w, pad_h, pad_h + extra_h))
        return F.pixel_shuffle(F.conv2d(x, self.weight, self.bias, stride=r), r)[..., :out_h, :out_w]


def rewrite_narrow_convolutions(
    module: nn.Module, max_out_channels: int = 4, min_kernel_size: int = 5, factor: int = 4
) -> int:
    """Replace, in place, every ``Conv2d`` with at most ``max_out_channels`` outputs and a kernel of at
    least ``min_kernel_size`` by a :class:`StridedSubPixelConv2d`.

    Returns:
        The number of replaced convolutions.
    """
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if (
                StridedSubPixelConv2d.supports(child)
                and child.out_channels <= max_out_channels
                and min(child.kernel_size) >= min_kernel_size
            ):
                setattr(parent, name, StridedSubPixelConv2d(child, factor))
                replaced += 1
    return replaced


class _Autocast(nn.Module):
    """Runs the wrapped module under ``torch.autocast`` and returns float32."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            y = self.module(x)
        return y.float()


class InferenceModule(nn.Module):
    """The optimized network: one tensor in, one tensor out, always in inference mode.

    ``forward`` moves the input to :attr:`device` in channels-last format, runs the optimized
    callable under ``torch.inference_mode`` and returns a contiguous float32 tensor on
    :attr:`device`. ``train()`` only toggles the flag: the folded batch norms cannot train.

    Attributes:
        backend: the backend that is actually used (after any fallback).
        precision: ``"fp32"`` or ``"bf16"``.
        device: where it runs.
        max_abs_diff: largest absolute difference to the eager network on the example (``nan`` if unchecked).
        build_seconds: time to build it, the first (compiling) call included.
        rewrites: ``{"folded_batch_norms": n, "narrow_convolutions": m}``.
        fixed_batch: the batch size a compiled runner is specialized on (``None``: any). Larger
            batches run in chunks of it, smaller ones are padded.
    """

    def __init__(
        self,
        module: nn.Module,
        runner: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        backend: str,
        precision: str,
        rewrites: dict[str, int],
        fixed_batch: int | None = None,
    ) -> None:
        super().__init__()
        self.module = module  # keeps the parameters reachable (device look-ups, state_dict)
        # Not registered as a submodule: a traced or compiled runner would list the parameters twice.
        object.__setattr__(self, "_runner", runner)
        self.device = device
        self.backend = backend
        self.precision = precision
        self.rewrites = rewrites
        self.fixed_batch = fixed_batch
        self.max_abs_diff = float("nan")
        self.build_seconds = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = x.to(self.device, dtype=torch.float32)
            if self.backend != "plain":
                x = x.contiguous(memory_format=torch.channels_last)
            if self.fixed_batch is not None and not x.is_inference():
                # A compiled graph guards on the input being an inference tensor or not: one kind of
                # input, one compilation (volume synthesis builds its batches in inference mode).
                x = x.clone()
            if self.fixed_batch is None:
                return self._runner(x).float().contiguous()
            # A compiled runner is specialized on its micro-batch: run chunks of that size,
            # the last one padded by repeating its last slice, instead of compiling again.
            outputs = []
            for start in range(0, x.shape[0], self.fixed_batch):
                chunk = x[start : start + self.fixed_batch]
                size = chunk.shape[0]
                if size < self.fixed_batch:
                    padding = chunk[-1:].expand(self.fixed_batch - size, *chunk.shape[1:])
                    chunk = torch.cat([chunk, padding]).contiguous(memory_format=torch.channels_last)
                outputs.append(self._runner(chunk)[:size].float())
            return torch.cat(outputs).contiguous()

    def train(self, mode: bool = True) -> InferenceModule:
        self.training = mode  # the wrapped network stays in eval mode
        return self

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend}, precision={self.precision}, device={self.device}, "
            f"rewrites={self.rewrites}"
        )


def max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in float32 (on ``a``'s device)."""
    return float((a.detach().float() - b.detach().float().to(a.device)).abs().max())


def _rewritten(network: nn.Module, device: torch.device) -> tuple[nn.Module, dict[str, int]]:
    module = copy.deepcopy(network).eval()
    rewrites = {
        "folded_batch_norms": fold_batch_norm(module),
        "narrow_convolutions": rewrite_narrow_convolutions(module),
    }
    module = module.to(device).to(memory_format=torch.channels_last)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module, rewrites


def _with_precision(module: nn.Module, precision: str, device: torch.device) -> nn.Module:
    return module if precision == "fp32" else _Autocast(module, device.type, torch.bfloat16)


def _largest_layer_output_bytes(network: nn.Module, example: torch.Tensor) -> int:
    """Bytes of the largest tensor one leaf module of ``network`` outputs for one sample of ``example``."""
    largest = 0

    def record(module: nn.Module, args: tuple, output: object) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output[:1].numel() * output.element_size())

    leaves = [m for m in network.modules() if not any(True for _ in m.children())]
    handles = [leaf.register_forward_hook(record) for leaf in leaves]
    try:
        with torch.inference_mode():
            network(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    return largest


def micro_batch_size(network: nn.Module, example: torch.Tensor, device: str | torch.device) -> int:
    """The batch size a compiled module is specialized on (see the module docstring): on CPU, as many
    samples as keep one layer's output within :data:`CPU_MICRO_BATCH_BYTES` (at least one, at most the
    example's batch); elsewhere the example's batch size."""
    if torch.device(device).type != "cpu":
        return example.shape[0]
    per_sample = _largest_layer_output_bytes(network, example)
    return int(min(example.shape[0], max(1, CPU_MICRO_BATCH_BYTES // max(per_sample, 1))))


def _build(
    network: nn.Module,
    example: torch.Tensor,
    device: torch.device,
    backend: str,
    precision: str,
    micro_batch: int | None = None,
) -> InferenceModule:
    """One variant, without checks: ``"plain"`` (no rewrites), ``"eager"``, ``"jit"`` or ``"compile"``
    (specialized on ``micro_batch`` samples, default: the example's batch size)."""
    if backend == "plain":
        module = copy.deepcopy(network).eval().to(device)
        rewrites = {"folded_batch_norms": 0, "narrow_convolutions": 0}
        runner: Callable = _with_precision(module, precision, device)
        return InferenceModule(module, runner, device, backend, precision, rewrites)
    module, rewrites = _rewritten(network, device)
    runner = _with_precision(module, precision, device)
    if backend == "jit":
        traced_input = example[:1].to(device).contiguous(memory_format=torch.channels_last)
        # The trace keeps the batch size dynamic but fixes the height and width (the size checks and
        # paddings are evaluated once, hence the tracer's warnings, silenced here).
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(runner, traced_input, check_trace=False)
        runner = torch.jit.freeze(traced.eval())
    elif backend == "compile":
        if device.type == "cpu":
            import torch._inductor.config as inductor_config

            # Constant-fold the (frozen) weights: conv + bias + activation fusion and oneDNN weight
            # prepacking.
            inductor_config.freezing = True
        runner = torch.compile(runner, dynamic=False)
        fixed_batch = example.shape[0] if micro_batch is None else micro_batch
        return InferenceModule(module, runner, device, backend, precision, rewrites, fixed_batch=fixed_batch)
    elif backend != "eager":
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return InferenceModule(module, runner, device, backend, precision, rewrites)


def auto_backend(device: str | torch.device) -> str:
    """The backend ``"auto"`` stands for: ``"compile"`` on CPU (measured fastest, see
    ``benchmarks/README.md``), ``"eager"`` elsewhere (not measured yet; batch-norm folding and
    channels-last are safe gains with cuDNN)."""
    return "compile" if torch.device(device).type == "cpu" else "eager"


def optimize_for_inference(
    network: nn.Module,
    example: torch.Tensor,
    device: str | torch.device = "cpu",
    *,
    precision: str = "fp32",
    backend: str = "auto",
    tolerance: float | None = None,
    micro_batch: int | None = None,
) -> InferenceModule:
    """Return a faster, equivalent inference module for a one-tensor-in, one-tensor-out network.

    The input network is not modified. The result is built, run once on ``example`` (which
    compiles, for ``"compile"``) and compared with the plain eager network in float32; on any
    failure a warning is logged and the next simpler variant is tried (see the module docstring).

    Args:
        network: e.g. :class:`~medsynth.networks.SynthesisInferenceNetwork`; ``forward(x) -> Tensor``.
        example: a representative input (B, C, H, W), ideally the batch size used later (compile
            specializes on it).
        device: where the optimized network runs (``"cpu"``, ``"cuda"``, ...).
        precision: ``"fp32"`` or ``"bf16"`` (autocast; output still float32).
        backend: ``"auto"`` (:func:`auto_backend`), ``"eager"``, ``"jit"`` or ``"compile"``.
        tolerance: largest accepted absolute difference to the eager float32 output on ``example``;
            ``None`` uses :data:`DEFAULT_TOLERANCE` of the precision.
        micro_batch: the batch size the ``"compile"`` backend specializes on and runs calls in chunks
            of; ``None``: :func:`micro_batch_size` (cache-sized chunks on CPU).

    Returns:
        An :class:`InferenceModule`; its ``backend`` attribute tells which variant is in use.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example must be a tensor, got {type(example).__name__}")
    device = torch.device(device)
    tolerance = DEFAULT_TOLERANCE[precision] if tolerance is None else float(tolerance)
    chosen = auto_backend(device) if backend == "auto" else backend
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")

    reference_network = copy.deepcopy(network).eval().to(device)
    example = example.to(device, dtype=torch.float32)
    with torch.inference_mode():
        reference = reference_network(example)
    if not isinstance(reference, torch.Tensor):
        raise TypeError(f"the network must return one tensor, got {type(reference).__name__}")
    if micro_batch is None and chosen == "compile":  # only a compiled module is specialized on a batch size
        micro_batch = micro_batch_size(reference_network, example, device)
    del reference_network

    # The last resort, the plain float32 network, always passes the check.
    requested = (chosen, precision)
    candidates = [requested] + [c for c in (("eager", precision), ("plain", "fp32")) if c != requested]
    last_error = ""
    for candidate, candidate_precision in candidates:
        start = time.perf_counter()
        try:
            optimized = _build(network, example, device, candidate, candidate_precision, micro_batch)
            output = optimized(example)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as error:  # noqa: BLE001 - any failure of an optimization means: fall back
            last_error = f"{type(error).__name__}: {error}"
            logger.warning(
                "inference optimization %r (%s) failed, falling back: %s",
                candidate,
                candidate_precision,
                last_error,
            )
            continue
        optimized.build_seconds = time.perf_counter() - start
        if output.shape != reference.shape:
            last_error = f"output shape {list(output.shape)} differs from eager {list(reference.shape)}"
            logger.warning(
                "inference optimization %r (%s): %s; falling back", candidate, candidate_precision, last_error
            )
            continue
        optimized.max_abs_diff = max_abs_difference(output, reference)
        # The plain float32 network is the reference itself (up to run-to-run rounding): never rejected.
        if not optimized.max_abs_diff <= tolerance and (candidate, candidate_precision) != ("plain", "fp32"):
            last_error = f"max |optimized - eager| = {optimized.max_abs_diff:.3g} > tolerance {tolerance:g}"
            logger.warning(
                "inference optimization %r (%s): %s; falling back", candidate, candidate_precision, last_error
            )
            continue
        logger.info(
            "inference network: backend %s, %s, on %s, %s, max |diff| %.2e, built in %.1f s",
            candidate,
            candidate_precision,
            device,
            optimized.rewrites,
            optimized.max_abs_diff,
            optimized.build_seconds,
        )
        return optimized
    raise RuntimeError(f"no inference variant of the network works (last error: {last_error})")
