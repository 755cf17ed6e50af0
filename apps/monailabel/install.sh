#!/usr/bin/env bash
# Build the serving environment: medsynth plus the MONAI Label server, CPU torch and numpy 2 kept.
#   bash apps/monailabel/install.sh [VENV_DIR]      (default: .venv-serve)
# Then: source VENV_DIR/bin/activate && medsynth serve --studies DIR --models RUN ...
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-.venv-serve}"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0          # the CPU build first: nothing may replace it
python -m pip install --quiet -e ".[test]"
python -m pip install --quiet --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
python -m pip install --quiet -r apps/monailabel/requirements.txt
python - <<'PY'
import monailabel, numpy, pydicom, torch
assert torch.__version__.startswith("2.13.0") and numpy.__version__.startswith("2."), (torch.__version__, numpy.__version__)
print(f"serving environment: monailabel {monailabel.__version__}, torch {torch.__version__}, numpy {numpy.__version__}, pydicom {pydicom.__version__}")
PY
