#!/usr/bin/env bash
# On this (CPU) machine, before a GPU session's device calls: pack what the lent H100 needs.
#   .carry/g1          SGLang 0.5.17 + server deps + the recipe's device tools   (../shared/gpu/prepare-carry.sh)
#   .carry/m1..mK      the offline 0.5B GGUF in chunks                            (../shared/gpu/prepare-model-carry.sh)
#   .carry/w           wheels the device image lacks (math-verify and its deps) + the GSM8K train file
# All under .carry/, which the recipe adds to .git/info/exclude. Then follow scripts/gpu/README.md.
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel)
SHARED=${SHARED:-$ROOT/../shared}
cd "$ROOT"
bash "$SHARED/gpu/prepare-carry.sh"
bash "$SHARED/gpu/prepare-model-carry.sh"
mkdir -p .carry/w/data
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
PIP_PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps "${PIP_PLATFORM[@]}" -d .carry/w \
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
cp "$SHARED/data/gsm8k-train.jsonl" .carry/w/data/
du -sh .carry/*
