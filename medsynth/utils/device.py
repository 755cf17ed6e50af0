"""What the machine can do: native bfloat16 arithmetic, and where a figure was measured."""

from __future__ import annotations

import functools
import platform

import torch

__all__ = ["cpu_bf16_flags", "cpu_model", "native_bf16"]

# CPU instruction-set flags (Linux /proc/cpuinfo names) that compute in bfloat16 natively.
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:
        return ""


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``, else ``platform.processor()``)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_bf16_flags() -> list[str]:
    """The bfloat16 instruction sets this CPU has (``avx512_bf16``, ``amx_bf16``), or ``[]``."""
    flags = set()
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [flag for flag in _BF16_FLAGS if flag in flags]


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively, so that bf16 autocast pays: CUDA GPUs that
    support it (Ampere and newer), CPUs with AVX512-BF16 or AMX. The bundles' default for ``amp``."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(cpu_bf16_flags())
    return False
