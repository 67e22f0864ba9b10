#!/usr/bin/env bash
# Device call 1 (carry .carry/g1 and .carry/w): install SGLang (recipe), the extra wheels and this
# package into /tmp, and keep the GSM8K file and our scripts in /tmp (carried paths vanish next call).
set -euo pipefail
ROOT=$(pwd)
bash .carry/g1/tools/install-on-device.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/w/*.whl
mkdir -p /tmp/data /tmp/work && cp .carry/w/data/*.jsonl /tmp/data/
# Our package, laid out as installed (programs/ and bench/ become sgl_adaptive.programs / .bench).
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/sgla "$ROOT"
mkdir -p /tmp/sgl-adaptive-scripts && cp scripts/gpu/*.sh /tmp/sgl-adaptive-scripts/
export PYTHONPATH=/tmp/sgla:/tmp/site
python3 -c "import sglang, sgl_adaptive.programs, sgl_adaptive.finetune.train, math_verify; print('sglang', sglang.__version__, 'ok')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
