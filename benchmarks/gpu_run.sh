#!/usr/bin/env bash
# One call on a GPU machine (see benchmarks/gpu_run.py): install what the machine's image lacks from
# the wheels carried in .whl/, install the project, run the prepared benchmarks.
#
#   bash benchmarks/gpu_run.sh --prepare     # HERE, once: wheels into .whl/, the BraTS cases into .gpu_carry/
#   OUT=... bash benchmarks/gpu_run.sh       # THERE (device tool: carry [".whl", ".gpu_carry"])
#   bash benchmarks/gpu_run.sh --dry-run     # anywhere: tiny sizes on the CPU, no install
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    # Packages the GPU image does not have (its list: .library/device/KINDS.md), without their
    # dependencies, which the image provides.
    python3 -m pip download --quiet --no-deps -d .whl \
        "monai==1.6.1" "pytorch-ignite==0.5.5" "nibabel==5.4.2" "fire==0.7.1" "termcolor==3.3.0"
    python3 benchmarks/gpu_prepare_data.py --source ../shared/data/brats2018_dev --out .gpu_carry/brats2018_dev
    du -sh .whl .gpu_carry
    exit 0
fi

if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    exec python3 benchmarks/gpu_run.py --dry-run "$@"
fi

if ! command -v nvidia-smi > /dev/null || ! nvidia-smi > /dev/null 2>&1; then
    echo "no GPU here (nvidia-smi finds none): nothing to measure; use --dry-run on a CPU" >&2
    exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
python3 -m pip install --quiet --no-deps --no-index --no-build-isolation .whl/*.whl
python3 -m pip install --quiet --no-deps --no-build-isolation -e .
echo "install: $(($(date +%s) - start)) s (the image's own CUDA torch: $(python3 -c 'import torch; print(torch.__version__)'))"
export PYTHONUNBUFFERED=1
python3 benchmarks/gpu_run.py "$@"
