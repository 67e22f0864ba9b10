#!/usr/bin/env bash
# The GPU pipeline of issue 5, one stage per device call (each < 10 minutes). Run from the repo root on
# the device after device-setup.sh and the recipe's serve-model.sh. Everything lives in /tmp/work; what
# comes home is copied to $OUT. Environment (defaults for the lent H100):
#   ENDPOINT (http://127.0.0.1:30000)  BASE (/tmp/qwen05b)  DATA_ROOT (/tmp/data)  WORK (/tmp/work)
#   TRAIN_LIMIT (2000 prompts)  K (4 samples)  MAX_NEW (512)  WORKERS (64)  STEPS (-1)  EPOCHS (1)
#   BENCH_LIMIT (300 dev questions)  BENCH_N (16)  LIVE_LIMIT (100)  PARALLEL (32)  PRUNE_AT (64,128)  KEEP (4)  DEVICE (cuda)
#   SGLA (python -m sgl_adaptive.cli)
set -euo pipefail
STAGE=${1:?stage: data | train | serve-trained | bench-sweep | bench-live | report}
ENDPOINT=${ENDPOINT:-http://127.0.0.1:30000}; BASE=${BASE:-/tmp/qwen05b}; DATA_ROOT=${DATA_ROOT:-/tmp/data}
WORK=${WORK:-/tmp/work}; OUT=${OUT:-$WORK/out}; DEVICE=${DEVICE:-cuda}
TRAIN_LIMIT=${TRAIN_LIMIT:-2000}; K=${K:-4}; MAX_NEW=${MAX_NEW:-512}; WORKERS=${WORKERS:-64}
STEPS=${STEPS:--1}; EPOCHS=${EPOCHS:-1}; BENCH_LIMIT=${BENCH_LIMIT:-300}; BENCH_N=${BENCH_N:-16}
LIVE_LIMIT=${LIVE_LIMIT:-100}; PARALLEL=${PARALLEL:-32}; PRUNE_AT=${PRUNE_AT:-64,128}; KEEP=${KEEP:-4}
export PYTHONPATH=${PYTHONPATH:-/tmp/sgla:/tmp/site} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
read -r -a SGLA <<< "${SGLA:-python3 -m sgl_adaptive.cli}"
mkdir -p "$WORK" "$OUT"
log() { echo "[$(date +%T)] $*"; }

case "$STAGE" in
data)  # on-policy samples from the served base model on our GSM8K *train* split, verifier labels
  log "finetune data: $TRAIN_LIMIT prompts x $K samples via $ENDPOINT"
  "${SGLA[@]}" finetune data --endpoint "$ENDPOINT" --tokenizer "$BASE" \
    --prompts "$DATA_ROOT/gsm8k-train.jsonl" --limit "$TRAIN_LIMIT" --samples-per-prompt "$K" \
    --reward verifier --max-new-tokens "$MAX_NEW" --workers "$WORKERS" --out "$WORK/data" --json \
    | tee "$OUT/data-manifest.json"
  ;;
train)  # LoRA on the one answer token, merged export + adapter; eval before/after on held-out prompts
  log "finetune train (LoRA) on $WORK/data"
  "${SGLA[@]}" finetune train --model "$BASE" --data "$WORK/data" --out "$WORK/trained" --lora \
    --lora-r 8 --lora-alpha 16 --epochs "$EPOCHS" --max-steps "$STEPS" --batch-size 32 --device "$DEVICE" --json | tee "$OUT/train-report.json"
  log "finetune eval"
  "${SGLA[@]}" finetune eval --model "$WORK/trained" --base "$BASE" --data "$WORK/data" --device "$DEVICE" \
    --drift-samples 256 --out "$OUT/eval.json"
  tar -C "$WORK/trained" -czf "$OUT/adapter.tgz" adapter
  ls -la "$OUT"
  ;;
serve-trained)  # swap the server's model for the merged checkpoint
  pkill -f sglang.launch_server || true; sleep 5
  MODEL_DIR="$WORK/trained" bash /tmp/sgl-tools/serve-model.sh
  ;;
bench-sweep)  # one scored pool of N per dev question; every threshold / pruning config offline
  "${SGLA[@]}" bench --endpoint "$ENDPOINT" --dataset gsm8k-dev --data-root "$DATA_ROOT" --limit "$BENCH_LIMIT" \
    --n "$BENCH_N" --max-new-tokens "$MAX_NEW" --mode sweep --parallel "$PARALLEL" \
    --methods greedy,best-of-n,judge-best-of-n,majority,oracle,adaptive,prune,adaptive-prune --out "$WORK/bench"
  ;;
bench-live)  # the programs themselves: real tokens, batches and wall time
  "${SGLA[@]}" bench --endpoint "$ENDPOINT" --dataset gsm8k-dev --data-root "$DATA_ROOT" --limit "$LIVE_LIMIT" \
    --n "$BENCH_N" --max-new-tokens "$MAX_NEW" --mode live --parallel "$PARALLEL" \
    --threshold 0.9,0.98 --prune-at "$PRUNE_AT" --keep "$KEEP" \
    --methods greedy,best-of-n,majority,oracle,adaptive,prune,adaptive-prune --out "$WORK/bench"
  ;;
report)
  "${SGLA[@]}" bench report "$WORK/bench" > "$OUT/bench-report.txt" || true
  cp "$WORK/bench"/summary.md "$WORK/bench"/*.png "$OUT/" 2>/dev/null || true
  gzip -c "$WORK/bench/results.jsonl" > "$OUT/results.jsonl.gz"
  ls -la "$OUT"
  ;;
*) echo "unknown stage $STAGE"; exit 2 ;;
esac
