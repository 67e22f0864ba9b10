#!/usr/bin/env bash
# The device side of the three 15-minute GPU stages (train, data, bench): see scripts/gpu/README.md.
#
#   bash scripts/gpu/device.sh STEP [STEP ...]      (in a device call; the call runs in the repo root)
#
# Every invocation first moves the carried model chunks (.carry/m*) to $CHUNKS, keeps a carried adapter
# (.carry/adapter/adapter.tgz), unpacks a carried JIT cache (.carry/jit/*.tar.xz, once per machine)
# and lays the package out in $PKG from the working tree (programs/ and bench/ become
# sgl_adaptive.programs / .bench, as pip would install them). Then it runs the
# steps in order and stops at the first that fails. Everything it prints also goes to $OUT/log.txt, each
# step adds a line to $OUT/timeline.tsv, and every result file is written into $OUT as soon as it exists:
# a call cut at its time limit still returns what was done.
#
# Steps
#   setup         install the SGLang carry (.carry/g1) and .carry/w (wheels, prompts, seed samples); record
#                 the device in device.txt; start the stage clock (STAGE_S seconds for all later steps);
#                 start building the flashinfer norm JIT in the background (WARM_JIT=1)
#   chunk         nothing more (for the calls that only bring a model chunk)
#   model         assemble and check the GGUF, convert it once to $BASE (bf16 Hugging Face folder)
#   train-prep    relabel the seed samples into $WORK/data (no sampling), then the attention check
#   train-fit     finetune train (LoRA r 8, bf16) -> adapter.tgz, train-report.json; finetune eval -> eval.json
#   serve         start SGLang on $SERVE_MODEL (default $BASE); server-start.tsv says where the start went
#   data          more on-policy samples from the server, resuming the seed samples -> samples.jsonl.gz
#   bench-serve   merge the adapter ($ADAPTER) into $BASE, serve the merged model
#   bench         sweep, then live, on the GSM8K dev split -> summary.md, bench.tgz, distinct-scores.json
#   bench-nofp32  restart the server without --enable-fp32-lm-head; a small sweep; distinct scores again
#   jit-save      pack the JIT caches (flashinfer, triton) into $OUT/jit-cache.tar.xz for the next session
#   stop          stop the server
#   flags         print the server flags this SGLang would get (no server started)
#   clock         print the time the stage and this call have left
#
# Environment (defaults are the device's; the CPU tests override them):
#   OUT (/tmp/gpu-out)  WORK (/tmp/work)  BASE (/tmp/qwen05b)  DATA (/tmp/data: prompts, seed samples)
#   CHUNKS (/tmp/model-chunks)  PY (python3)  PKG (/tmp/sgla)  SITE (/tmp/site)  PYTHONPATH (default $PKG:$SITE; set it, even empty, to keep it)
#   DEVICE (cuda)  SERVER (sglang | inprocess: `sgl-adaptive serve`, for CPU tests)  PORT (30000)
#   STAGE_S (650: the stage's deadline, counted from setup)  CALL_S (570: this call's deadline)
#   SEED_SAMPLES (data/selfeval-gsm8k-h200/samples.jsonl.gz in the repo, else $DATA/seed-samples.jsonl.gz)
#   PROMPTS ($DATA/gsm8k-train.jsonl)  K (8)  MAX_NEW (512)  REWARD (verifier)  WORKERS (96)
#   DATA_ADD (4000 prompts at most; the clock decides)  DATA_S (480)  DATA_FLAGS  RELABEL_FLAGS
#   BATCH (64)  TRAIN_S (330)  EVAL_S (200)  TRAIN_FLAGS (--hard-labels)  EVAL_FLAGS  ATTN_CHECK_S (120)
#   ADAPTER (sgl_adaptive/adapters/qwen2.5-coder-0.5b-selfeval, or .carry/adapter/adapter.tgz when carried)
#   BENCH_LIMIT (300)  LIVE_LIMIT (50)  BENCH_N (16)  PARALLEL (64)  LIVE_PARALLEL (32)  SWEEP_S (240)  LIVE_S (240)
#   SWEEP_METHODS  LIVE_METHODS  THRESHOLDS (0.9,0.98)  PRUNE_AT (64,128)  KEEP (4)  DISTINCT_LIMIT (40)
#   FP32_HEAD (1)  CUDA_GRAPH_MAX_BS (0: --disable-cuda-graph)  SKIP_WARMUP (1)  SERVER_FLAGS (extra)  WAIT (300)
set -uo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
HERE=$ROOT/scripts/gpu

OUT=${OUT:-/tmp/gpu-out}; WORK=${WORK:-/tmp/work}; BASE=${BASE:-/tmp/qwen05b}; DATA=${DATA:-/tmp/data}
PY=${PY:-python3}; PKG=${PKG:-/tmp/sgla}; SITE=${SITE:-/tmp/site}; CHUNKS=${CHUNKS:-/tmp/model-chunks}
DEVICE=${DEVICE:-cuda}; SERVER=${SERVER:-sglang}; PORT=${PORT:-30000}; ENDPOINT=http://127.0.0.1:$PORT
STAGE_S=${STAGE_S:-650}; CALL_S=${CALL_S:-570}
PROMPTS=${PROMPTS:-$DATA/gsm8k-train.jsonl}
K=${K:-8}; MAX_NEW=${MAX_NEW:-512}; REWARD=${REWARD:-verifier}; WORKERS=${WORKERS:-96}
DATA_ADD=${DATA_ADD:-4000}; DATA_S=${DATA_S:-480}
BATCH=${BATCH:-64}; TRAIN_S=${TRAIN_S:-330}; EVAL_S=${EVAL_S:-200}; ATTN_CHECK_S=${ATTN_CHECK_S:-120}
BENCH_LIMIT=${BENCH_LIMIT:-300}; LIVE_LIMIT=${LIVE_LIMIT:-50}; BENCH_N=${BENCH_N:-16}
PARALLEL=${PARALLEL:-64}; LIVE_PARALLEL=${LIVE_PARALLEL:-32}; SWEEP_S=${SWEEP_S:-240}; LIVE_S=${LIVE_S:-240}
SWEEP_METHODS=${SWEEP_METHODS:-greedy,best-of-n,majority,oracle,adaptive,prune,adaptive-prune}
LIVE_METHODS=${LIVE_METHODS:-greedy,best-of-n,majority,oracle,adaptive,prune,adaptive-prune}
THRESHOLDS=${THRESHOLDS:-0.9,0.98}; PRUNE_AT=${PRUNE_AT:-64,128}; KEEP=${KEEP:-4}; DISTINCT_LIMIT=${DISTINCT_LIMIT:-40}
FP32_HEAD=${FP32_HEAD:-1}; CUDA_GRAPH_MAX_BS=${CUDA_GRAPH_MAX_BS:-0}; SKIP_WARMUP=${SKIP_WARMUP:-1}; WAIT=${WAIT:-300}
ADAPTER=${ADAPTER:-sgl_adaptive/adapters/qwen2.5-coder-0.5b-selfeval}
export PYTHONPATH=${PYTHONPATH-$PKG:$SITE}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SGLA=("$PY" -m sgl_adaptive.cli)
STATE=${STATE:-/tmp/gpu-stage}          # the stage clock and the server's pid/model/log (outlive a call)
DEADLINE_FILE=$STATE/deadline; SERVER_PID=$STATE/server.pid; SERVER_MODEL=$STATE/server.model
SERVER_LOG=$STATE/server.log
CALL_END=$(( $(date +%s) + CALL_S ))
mkdir -p "$OUT" "$WORK" "$STATE"

exec > >(tee -a "$OUT/log.txt") 2>&1
TEE_PID=$!
finish() { local rc=$?; exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null; exit "$rc"; }
trap finish EXIT

log() { echo "[$(date -u +%T)] $*"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# Seconds a step may take: WANT, lowered to what this call and the stage have left after RESERVE seconds.
cap() {
  local want=$1 reserve=${2:-0} now left d
  now=$(date +%s); left=$(( CALL_END - now ))
  if [ -f "$DEADLINE_FILE" ]; then d=$(( $(cat "$DEADLINE_FILE") - now )); (( d < left )) && left=$d; fi
  left=$(( left - reserve ))
  (( left < want )) && want=$left
  (( want < 5 )) && want=5
  echo "$want"
}

# ---- on every invocation -----------------------------------------------------------------------------------
collect_chunks() {
  mkdir -p "$CHUNKS"
  local d
  for d in .carry/m[0-9]*; do [ -d "$d" ] && find "$d" -type f -exec mv -f {} "$CHUNKS"/ \; ; done
  # an adapter carried in an earlier call of this stage (bench-serve reads it from $STATE)
  [ -f .carry/adapter/adapter.tgz ] && cp .carry/adapter/adapter.tgz "$STATE/adapter.tgz" && log "carried adapter.tgz kept"
  local have; have=$(find "$CHUNKS" -type f -name 'chunk*' | wc -l)
  [ "$have" -gt 0 ] && log "model chunks present: $have"
  return 0
}

restore_jit() {
  local a
  for a in .carry/jit/*.tar.xz; do
    [ -f "$a" ] || continue
    [ -e "$STATE/jit-restored" ] && return 0
    tar -C "$HOME" -xJf "$a" && touch "$STATE/jit-restored" && log "JIT cache restored from $a ($(du -h "$a" | cut -f1))"
  done
  return 0
}

make_layout() {  # the package as pip would lay it out, from this call's working tree
  [ "${PKG_LAYOUT:-1}" = 1 ] || return 0
  rm -rf "$PKG.new" && mkdir -p "$PKG.new" || return 1
  cp -r sgl_adaptive "$PKG.new/" && cp -r programs "$PKG.new/sgl_adaptive/programs" \
    && cp -r bench "$PKG.new/sgl_adaptive/bench" || return 1
  find "$PKG.new" -name __pycache__ -prune -exec rm -rf {} +
  rm -rf "$PKG" && mv "$PKG.new" "$PKG"
}

seed_samples() {  # the largest seed: the repo's committed samples, else the carried shared ones
  local s
  for s in "${SEED_SAMPLES:-}" data/selfeval-gsm8k-h200/samples.jsonl.gz "$DATA/seed-samples.jsonl.gz"; do
    [ -n "$s" ] && [ -f "$s" ] && { echo "$s"; return 0; }
  done
  log "no seed samples (data/selfeval-gsm8k-h200/samples.jsonl.gz, or carry .carry/w)" >&2
  return 1
}

# ---- the server ----------------------------------------------------------------------------------------------
healthy() { "$PY" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1] + '/health', timeout=3)" "$ENDPOINT" 2>/dev/null; }

sglang_src() {
  local p
  for p in ${SGLANG_SRC:-} ${PYTHONPATH//:/ }; do
    [ -d "$p/srt" ] && { echo "$p"; return; }
    [ -d "$p/sglang/srt" ] && { echo "$p/sglang"; return; }
  done
  "$PY" -c "import importlib.util as u, os; s = u.find_spec('sglang'); print(os.path.dirname(s.origin) if s else '')" 2>/dev/null
}

# Does the installed SGLang know FLAG? (a dashed option string in server_args.py, or a field of that name)
has_flag() {
  local src=$1 f=${2#--} u
  u=${f//-/_}
  [ -n "$src" ] || return 1
  grep -rqsE -e "[\"']--${f}[\"']" -e "^[[:space:]]+${u}[[:space:]]*:" "$src/srt/server_args.py" "$src/srt/arg_groups" 2>/dev/null
}

server_flags() {  # required flags (the recipe's), then the wanted ones this SGLang knows
  local src want=() f
  FLAGS=(--attention-backend triton --sampling-backend pytorch --grammar-backend none
         --mem-fraction-static 0.6 --context-length 4096 --log-level info)
  src=$(sglang_src)
  [ "$FP32_HEAD" = 1 ] && want+=(--enable-fp32-lm-head)
  [ "$SKIP_WARMUP" = 1 ] && want+=(--skip-server-warmup)
  want+=(--sampling-defaults)   # value added below: openai (no generation_config.json defaults)
  if [ "$CUDA_GRAPH_MAX_BS" = 0 ]; then want+=(--disable-cuda-graph --disable-piecewise-cuda-graph); fi
  for f in "${want[@]}"; do
    if has_flag "$src" "$f"; then
      FLAGS+=("$f"); [ "$f" = --sampling-defaults ] && FLAGS+=(openai)
    else
      log "this SGLang has no $f: left out"
    fi
  done
  [ "$CUDA_GRAPH_MAX_BS" != 0 ] && FLAGS+=(--cuda-graph-max-bs "$CUDA_GRAPH_MAX_BS")
  # shellcheck disable=SC2206
  [ -n "${SERVER_FLAGS:-}" ] && FLAGS+=($SERVER_FLAGS)
  return 0
}

stop_server() {
  [ -f "$SERVER_PID" ] || return 0
  local pid; pid=$(cat "$SERVER_PID")
  kill -TERM -- "-$pid" 2>/dev/null
  for _ in $(seq 1 30); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null
  rm -f "$SERVER_PID" "$SERVER_MODEL"
  log "server stopped (process group $pid)"
}

server_cmd() {  # MODEL -> CMD: the server's command line (FLAGS from server_flags)
  if [ "$SERVER" = inprocess ]; then
    # (FP32_HEAD means nothing to the in-process backend; in the command it tells the two servers apart)
    CMD=(env "FP32_HEAD=$FP32_HEAD" "${SGLA[@]}" serve --model "$1" --port "$PORT" --device "$DEVICE")
  else
    # token log-probabilities of the model itself, not of the tempered sampling distribution (the
    # confidence / self-certainty scorers read them; the in-process backend returns the same)
    CMD=(env SGLANG_RETURN_ORIGINAL_LOGPROB=1 "$PY" -m sglang.launch_server --model-path "$1" --host 127.0.0.1
      --port "$PORT" "${FLAGS[@]}")
  fi
}

launch() {  # MODEL: start the server in its own session (it outlives the call); stamp each log line
  local model=$1 cmd
  server_cmd "$model"; cmd=("${CMD[@]}")
  log "launch: ${cmd[*]}"
  echo "$model" > "$SERVER_MODEL"; echo "${cmd[*]}" > "$STATE/server.cmd"
  LAUNCHED=$EPOCHREALTIME
  # shellcheck disable=SC2016
  setsid bash -c 'echo $$ > "$1"; shift; "$@" < /dev/null 2>&1 | while IFS= read -r l; do printf "%s %s\n" "$EPOCHREALTIME" "$l"; done' \
    stamp "$SERVER_PID" "${cmd[@]}" > "$SERVER_LOG" 2>&1 &
  for _ in 1 2 3 4 5 6 7 8 9 10; do [ -s "$SERVER_PID" ] && break; sleep 0.2; done
}

start_server() {  # MODEL: serve it (reusing a healthy server of the same model); where the start went
  local model=$1 wait t_ok="" pid retried=0 bad
  server_flags
  server_cmd "$model"
  if healthy && [ "$(cat "$STATE/server.cmd" 2>/dev/null)" = "${CMD[*]}" ]; then log "server already healthy: ${CMD[*]}"; return 0; fi
  stop_server
  launch "$model"
  wait=$(cap "$WAIT" 30)
  while :; do
    if healthy; then t_ok=$EPOCHREALTIME; break; fi
    pid=$(cat "$SERVER_PID" 2>/dev/null)
    if [ -n "$pid" ] && ! kill -0 -- "-$pid" 2>/dev/null; then
      bad=$(grep -oE "unrecognized arguments: .*" "$SERVER_LOG" | head -1 | sed 's/unrecognized arguments: //')
      if [ -n "$bad" ] && [ $retried = 0 ]; then  # an optional flag this version lacks: drop it, once
        log "server refused: $bad; relaunching without"
        local keep=() f
        for f in "${FLAGS[@]}"; do [[ " $bad " == *" $f "* ]] || keep+=("$f"); done
        FLAGS=("${keep[@]}"); retried=1; launch "$model"; continue
      fi
      log "server exited"; tail -40 "$SERVER_LOG"; break
    fi
    (( $(awk -v a="$LAUNCHED" -v b="$EPOCHREALTIME" 'BEGIN { print int(b - a) }') >= wait )) && { log "server not healthy after $wait s"; break; }
    sleep 1
  done
  cp "$SERVER_LOG" "$OUT/server.log" 2>/dev/null
  [ -f "$STATE/jit-warm.log" ] && { log "background JIT warm-up:"; cat "$STATE/jit-warm.log"; }
  "$PY" "$HERE/tools.py" server-timeline "$SERVER_LOG" "$LAUNCHED" "${t_ok:-never}" "$OUT/server-start.tsv"
  [ -f "$model/generation_config.json" ] && cp "$model/generation_config.json" "$OUT/generation_config.json"
  [ -n "$t_ok" ] || return 1
  log "server healthy at $ENDPOINT after $(since "$LAUNCHED") s (model $model)"
  # JIT builds skipped at start happen in the first request: time it, so the start is counted whole.
  local first; first=$("$PY" "$HERE/tools.py" first-request "$ENDPOINT" --timeout "$(cap 300 30)")
  printf 'first /generate after healthy\t%s\t\nready (healthy + first request)\t%s\t\n' "$first" \
    "$(awk -v a="$t_ok" -v b="$LAUNCHED" -v f="$first" 'BEGIN { if (f + 0 == f) printf "%.1f", a - b + f; else print "?" }')" \
    >> "$OUT/server-start.tsv"
  log "first request after healthy: $first s"
}

require_server() {  # MODEL
  if healthy && [ "$(cat "$SERVER_MODEL" 2>/dev/null)" = "$1" ]; then return 0; fi
  log "no healthy server with $1: run the serve step first"; return 1
}

# ---- steps ---------------------------------------------------------------------------------------------------
step_setup() {
  echo $(( $(date +%s) + STAGE_S )) > "$DEADLINE_FILE"
  if [ -f .carry/g1/tools/install-on-device.sh ]; then
    SITE=$SITE bash .carry/g1/tools/install-on-device.sh || return 1
  elif [ "$SERVER" = sglang ]; then
    log "carry .carry/g1 in this call (scripts/gpu/prepare.sh)"; return 1
  fi
  local whl=() f
  for f in .carry/w/*.whl; do [ -f "$f" ] && whl+=("$f"); done
  if [ ${#whl[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whl[@]}" || return 1
  fi
  mkdir -p "$DATA"
  for f in .carry/w/data/*; do
    [ -f "$f" ] || continue
    case $f in
      */gsm8k-train.jsonl.gz) gzip -dc "$f" > "$DATA/gsm8k-train.jsonl" ;;
      *) cp "$f" "$DATA/" ;;
    esac
  done
  {
    echo "date: $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" - <<'PY' 2>&1
import importlib.metadata as m
for d in ("torch", "transformers", "peft", "accelerate", "sglang", "flashinfer-python", "math-verify"):
    try:
        print(d, m.version(d))
    except m.PackageNotFoundError:
        print(d, "-")
try:
    import torch
    print("cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
except Exception as exc:
    print("torch probe failed:", exc)
PY
  } > "$OUT/device.txt"
  cat "$OUT/device.txt"
  "$PY" -c "import sgl_adaptive.programs, sgl_adaptive.finetune.train, math_verify" || return 1
  warm_jit
}

step_chunk() { return 0; }

warm_jit() {  # build the flashinfer norm JIT in the background while the chunks travel (setsid: outlives the call)
  [ "$SERVER" = sglang ] && [ "${WARM_JIT:-1}" = 1 ] && command -v nvidia-smi > /dev/null || return 0
  setsid "$PY" "$HERE/tools.py" warm-jit < /dev/null > "$STATE/jit-warm.log" 2>&1 &
  log "flashinfer norm JIT warming in the background (log $STATE/jit-warm.log)"
}

step_model() {
  if [ -f "$BASE/config.json" ]; then log "model ready at $BASE"; return 0; fi
  local have want sha
  have=$(find "$CHUNKS" -type f -name 'chunk*' | wc -l)
  want=$(find "$CHUNKS" -type f -name 'chunk*' | head -1 | sed -E 's/.*-of-0*([0-9]+)$/\1/')
  [ -n "$want" ] && [ "$have" = "$want" ] || { log "missing model chunks ($have of ${want:-?})"; return 1; }
  local gguf=${GGUF:-/tmp/model.gguf}
  find "$CHUNKS" -type f -name 'chunk*' | sort | xargs cat > "$gguf"
  sha=$(sha256sum "$gguf" | cut -d' ' -f1)
  [ "$sha" = "$(cat "$CHUNKS/MODEL.sha256")" ] || { log "sha256 mismatch $sha"; return 1; }
  rm -rf "$BASE.tmp"
  timeout "$(cap 120)" "$PY" - "$BASE.tmp" "$gguf" <<'PY' || return 1
import os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
where, name = os.path.split(sys.argv[2])
tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1]); print("converted to", sys.argv[1])
PY
  mv "$BASE.tmp" "$BASE" && rm -f "$gguf"
}

relabel_only() {  # SAMPLES_FILE DIR: train/heldout.jsonl from existing samples, nothing sampled
  local seed=$1 dir=$2 n
  n=$(gzip -dcf "$seed" | grep -c .)
  "$PY" "$HERE/tools.py" seed-check "$seed" "$PROMPTS" || return 1
  mkdir -p "$dir" && rm -f "$dir"/{manifest.json,train.jsonl,heldout.jsonl}
  gzip -dcf "$seed" > "$dir/samples.jsonl"
  # shellcheck disable=SC2086
  timeout "$(cap 240 60)" "${SGLA[@]}" finetune data --model "$BASE" --prompts "$PROMPTS" --shuffle --seed 0 \
    -k "$K" --max-new-tokens "$MAX_NEW" --reward "$REWARD" --limit "$n" --out "$dir" --json ${RELABEL_FLAGS:-} \
    > "$OUT/data-manifest.json" || return 1
  "$PY" - "$OUT/data-manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1])); c = m["counts"]
print(f"relabelled {c['prompts']} prompts ({c['heldout_prompts']} held out): {c['examples']}; sampled now: {m['last_run']['sampled']}")
sys.exit(1 if m["last_run"]["sampled"] else 0)
PY
}

step_train_prep() {
  local seed; seed=$(seed_samples) || return 1
  log "relabel $seed"
  relabel_only "$seed" "$WORK/data" || return 1
  log "attention check (GPU NaN of issue 13)"
  timeout "$(cap "$ATTN_CHECK_S" 20)" "$PY" -m sgl_adaptive.finetune.attention_check --model "$BASE" \
    --data "$WORK/data" --device "$DEVICE" --out "$OUT/attention-check.json" \
    || log "attention check failed or timed out (exit $?): continuing"
  return 0
}

step_train_fit() {
  [ -f "$WORK/data/train.jsonl" ] || { log "no $WORK/data/train.jsonl: run train-prep first"; return 1; }
  rm -rf "$WORK/trained"
  local rc
  log "finetune train (LoRA r 8, alpha 16, batch $BATCH, $DEVICE)"
  # shellcheck disable=SC2086
  timeout "$(cap "$TRAIN_S" 90)" "${SGLA[@]}" finetune train --model "$BASE" --data "$WORK/data" --out "$WORK/trained" \
    --lora --lora-r 8 --lora-alpha 16 --batch-size "$BATCH" --device "$DEVICE" --json ${TRAIN_FLAGS---hard-labels} \
    > "$OUT/train-report.json"
  rc=$?
  [ -d "$WORK/trained/adapter" ] && tar -C "$WORK/trained" -czf "$OUT/adapter.tgz" adapter \
    && log "adapter.tgz: $(du -h "$OUT/adapter.tgz" | cut -f1)"
  [ "$rc" = 0 ] || { log "finetune train failed (exit $rc)"; return "$rc"; }
  log "finetune eval"
  # shellcheck disable=SC2086
  timeout "$(cap "$EVAL_S" 5)" "${SGLA[@]}" finetune eval --model "$WORK/trained" --base "$BASE" --data "$WORK/data" \
    --device "$DEVICE" --json --out "$OUT/eval.json" ${EVAL_FLAGS:-} > /dev/null
}

step_serve() { start_server "${SERVE_MODEL:-$BASE}" && jit_save; }

step_data() {
  require_server "$BASE" || return 1
  local seed n0 n dir=$WORK/gen limit rc snap
  seed=$(seed_samples) || return 1
  n0=$(gzip -dcf "$seed" | grep -c .)
  if [ ! -f "$dir/samples.jsonl" ]; then
    "$PY" "$HERE/tools.py" seed-check "$seed" "$PROMPTS" || return 1
    mkdir -p "$dir" && gzip -dcf "$seed" > "$dir/samples.jsonl"
  fi
  n=$(grep -c . "$dir/samples.jsonl"); limit=$(( n + DATA_ADD ))
  local args=(finetune data --endpoint "$ENDPOINT" --prompts "$PROMPTS" --shuffle --seed 0 -k "$K"
              --max-new-tokens "$MAX_NEW" --reward "$REWARD" --workers "$WORKERS" --out "$dir" --json)
  # shellcheck disable=SC2206
  [ -n "${DATA_FLAGS:-}" ] && args+=($DATA_FLAGS)
  # Copy the growing samples home every SNAP_S (20) s: a call cut at its limit still returns them.
  ( while sleep "${SNAP_S:-20}"; do
      gzip -c "$dir/samples.jsonl" > "$OUT/.samples.snap" && mv "$OUT/.samples.snap" "$OUT/samples.jsonl.gz"
    done ) < /dev/null > /dev/null 2>&1 &
  snap=$!
  log "finetune data: $n prompts so far, up to $DATA_ADD more ($(cap "$DATA_S" 100) s)"
  timeout "$(cap "$DATA_S" 100)" "${SGLA[@]}" "${args[@]}" --limit "$limit" > "$OUT/.manifest.tmp"
  rc=$?
  [ "$rc" = 0 ] && mv "$OUT/.manifest.tmp" "$OUT/manifest.json"
  rm -f "$OUT/.manifest.tmp"
  kill "$snap" 2>/dev/null; wait "$snap" 2>/dev/null; rm -f "$OUT/.samples.snap"
  n=$(grep -c . "$dir/samples.jsonl")
  gzip -c "$dir/samples.jsonl" > "$OUT/.samples.tmp" && mv "$OUT/.samples.tmp" "$OUT/samples.jsonl.gz"
  log "samples: $n0 -> $n prompts ($(du -h "$OUT/samples.jsonl.gz" | cut -f1) gzip)"
  if [ "$rc" != 0 ]; then  # cut by the clock (124): label what is there (the samples are a prefix)
    if [ "$(cap 150 10)" -ge 30 ]; then
      log "sampling stopped (exit $rc) at $n prompts: relabelling them"
      if timeout "$(cap 150 10)" "${SGLA[@]}" "${args[@]}" --limit "$n" > "$OUT/.manifest.tmp"; then
        mv "$OUT/.manifest.tmp" "$OUT/manifest.json"
      else
        cp "$dir/manifest.json" "$OUT/manifest.json"; log "relabel failed: manifest.json holds the settings only"
      fi
    else
      cp "$dir/manifest.json" "$OUT/manifest.json"; log "no time to relabel: manifest.json holds the settings only"
    fi
  fi
  jit_save
}

step_bench_serve() {
  local adapter=$ADAPTER merged=$WORK/merged
  if [ -f "$STATE/adapter.tgz" ]; then
    rm -rf "$STATE/adapter" && mkdir -p "$STATE/adapter" && tar -C "$STATE/adapter" -xzf "$STATE/adapter.tgz" || return 1
    adapter=$STATE/adapter/adapter
  fi
  [ -f "$adapter/adapter_config.json" ] || { log "no adapter at $adapter (ship one, or carry .carry/adapter/adapter.tgz)"; return 1; }
  if [ ! -f "$merged/config.json" ]; then
    log "merge $adapter into $BASE"
    rm -rf "$merged.tmp"
    timeout "$(cap 120 60)" "$PY" -c "import sys; from pathlib import Path; from sgl_adaptive.model_store import merge_adapter; merge_adapter(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))" \
      "$BASE" "$adapter" "$merged.tmp" || return 1
    mv "$merged.tmp" "$merged"
  fi
  SERVE_MODEL=$merged step_serve
}

bench_home() {  # DIR: the report and everything of DIR, home now (a later cut keeps these)
  local dir=$1
  [ -f "$dir/results.jsonl" ] || return 0
  timeout 60 "${SGLA[@]}" bench report "$dir" > "$dir/report.txt" 2>&1 || true
  cp "$dir/summary.md" "$OUT/summary.md" 2>/dev/null
  tar -C "$(dirname "$dir")" -czf "$OUT/.bench.tmp" "$(basename "$dir")" && mv "$OUT/.bench.tmp" "$OUT/bench.tgz"
}

bench_run() {  # MODE LIMIT SECONDS PARALLEL METHODS DIR [extra args]
  local mode=$1 limit=$2 secs=$3 par=$4 methods=$5 dir=$6; shift 6
  log "bench $mode: up to $limit dev questions, $secs s"
  timeout "$secs" "${SGLA[@]}" bench --endpoint "$ENDPOINT" --dataset gsm8k-dev --data-root "$DATA" \
    --limit "$limit" --n "$BENCH_N" --max-new-tokens "$MAX_NEW" --mode "$mode" --parallel "$par" \
    --methods "$methods" --out "$dir" "$@"
  local rc=$?; [ "$rc" = 0 ] || log "bench $mode stopped (exit $rc)"
  return 0
}

step_bench() {
  local merged=$WORK/merged dir=$WORK/bench
  require_server "$(cat "$SERVER_MODEL" 2>/dev/null || echo "$merged")" || return 1
  local fp32=no; grep -q -- "--enable-fp32-lm-head" "$STATE/server.cmd" 2>/dev/null && fp32=yes
  [ "$SERVER" = inprocess ] && fp32=inprocess
  bench_run sweep "$BENCH_LIMIT" "$(cap "$SWEEP_S" 150)" "$PARALLEL" "$SWEEP_METHODS" "$dir"
  bench_home "$dir"
  [ -f "$dir/pools.jsonl" ] && "$PY" "$HERE/tools.py" distinct-scores "$dir/pools.jsonl" "$OUT/distinct-scores.json" --fp32-lm-head "$fp32"
  bench_run live "$LIVE_LIMIT" "$(cap "$LIVE_S" 45)" "$LIVE_PARALLEL" "$LIVE_METHODS" "$dir" \
    --threshold "$THRESHOLDS" --prune-at "$PRUNE_AT" --keep "$KEEP"
  bench_home "$dir"
  jit_save
}

step_bench_nofp32() {
  local model; model=$(cat "$SERVER_MODEL" 2>/dev/null) || { log "no server to restart"; return 1; }
  FP32_HEAD=0 start_server "$model" || return 1
  local dir=$WORK/bench-nofp32
  bench_run sweep "$DISTINCT_LIMIT" "$(cap "$SWEEP_S" 20)" "$PARALLEL" best-of-n "$dir"
  [ -f "$dir/pools.jsonl" ] && "$PY" "$HERE/tools.py" distinct-scores "$dir/pools.jsonl" "$OUT/distinct-scores-nofp32.json" --fp32-lm-head no
  return 0
}

jit_save() {  # pack what the JIT compilers cached (reused by the next session through .carry/jit)
  [ "$SERVER" = sglang ] || return 0
  local parts=() p
  for p in .cache/flashinfer .triton/cache .cache/tvm-ffi .cache/sglang .cache/torch_extensions; do [ -d "$HOME/$p" ] && parts+=("$p"); done
  [ ${#parts[@]} -gt 0 ] || return 0
  tar -C "$HOME" -cf - "${parts[@]}" 2>/dev/null | xz -6 -T0 > "$OUT/.jit.tmp" || return 0
  if [ "$(stat -c %s "$OUT/.jit.tmp")" -le $((15 * 1024 * 1024)) ]; then
    mv "$OUT/.jit.tmp" "$OUT/jit-cache.tar.xz"; log "JIT cache: $(du -h "$OUT/jit-cache.tar.xz" | cut -f1) (${parts[*]})"
  else
    rm -f "$OUT/.jit.tmp"; log "JIT cache over 15 MiB: not returned"
  fi
  return 0
}
step_jit_save() { jit_save; }
step_flags() { server_flags; log "server flags: ${FLAGS[*]}"; }
step_clock() {
  local stage="no stage clock (no setup on this machine)"
  [ -f "$DEADLINE_FILE" ] && stage="stage: $(( $(cat "$DEADLINE_FILE") - $(date +%s) )) s left"
  log "$stage; call: $(( CALL_END - $(date +%s) )) s left; a 480-s step keeping 100 s gets $(cap 480 100) s"
}
step_stop() { stop_server; }

# ---- main ----------------------------------------------------------------------------------------------------
[ $# -gt 0 ] || { sed -n '2,20p' "$0"; exit 2; }
for s in "$@"; do
  declare -F "step_${s//-/_}" > /dev/null || { log "unknown step $s"; exit 2; }
done
collect_chunks
restore_jit
make_layout || { log "cannot lay out the package in $PKG"; exit 1; }
for s in "$@"; do
  t0=$EPOCHREALTIME
  log "== $s"
  "step_${s//-/_}"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$s" "$(date -u +%T)" "$(since "$t0")" "$rc" >> "$OUT/timeline.tsv"
  log "== $s: exit $rc after $(since "$t0") s"
  [ "$rc" = 0 ] || exit "$rc"
done
