"""Run a bundle workflow under ``torch.distributed.run`` on CPU processes (the multi-GPU config tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_ddp(
    config_files: Sequence[str], overrides: Mapping[str, object], port: int, processes: int = 2
) -> None:
    """``torchrun --nproc_per_node=processes -m monai.bundle run`` from the repository root, one thread
    each; fails the test with the last output when a rank fails."""
    arguments = [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
        f"--master_port={port}", "-m", "monai.bundle", "run", "--config_file", str(list(config_files)),
        *arguments,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
