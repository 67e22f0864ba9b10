#!/usr/bin/env bash
# After a stage, on this machine: put what its device calls returned where it belongs.
#
#   bash scripts/gpu/land.sh STAGE DIR [DIR ...]     STAGE: train | data | bench; DIR: each call's files_at
#                                                    folder, in call order (a later DIR's file wins)
# data   samples.jsonl.gz + manifest.json -> data/selfeval-gsm8k-h200/ (the manifest's device paths replaced
#        by the names the data folder uses), after checking that the old samples are a prefix of the new
# train  adapter.tgz, train-report.json, eval.json, attention-check.json, data-manifest.json -> runs/gpu-train/
#        (the adapter unpacked in runs/gpu-train/adapter; shipping it, with its model card, is a separate commit)
# bench  bench.tgz -> runs/gpu-bench/ (then: sgl-adaptive bench report runs/gpu-bench/bench), distinct-scores*.json
# all    every call's log.txt, timeline.tsv, server-start.tsv, server.log, device.txt -> runs/gpu-STAGE/calls/N/;
#        jit-cache.tar.xz -> .carry/jit/ (prepare.sh makes the next session's setup call carry it)
set -euo pipefail
STAGE=${1:?stage: train | data | bench}; shift
[ $# -gt 0 ] || { echo "give the calls' files_at folders" >&2; exit 2; }
ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"
RUN=runs/gpu-$STAGE
mkdir -p "$RUN/calls"
latest() {  # NAME: the last DIR holding it
  local d f=""
  for d in "${DIRS[@]}"; do [ -f "$d/$1" ] && f="$d/$1"; done
  echo "$f"
}
DIRS=("$@")
n=0
for d in "${DIRS[@]}"; do
  n=$((n + 1)); mkdir -p "$RUN/calls/$n"
  for f in log.txt timeline.tsv server-start.tsv server.log device.txt generation_config.json; do
    [ -f "$d/$f" ] && cp "$d/$f" "$RUN/calls/$n/"
  done
done
jit=$(latest jit-cache.tar.xz)
if [ -n "$jit" ]; then mkdir -p .carry/jit && cp "$jit" .carry/jit/jit-cache.tar.xz && echo "JIT cache -> .carry/jit/"; fi

case $STAGE in
data)
  samples=$(latest samples.jsonl.gz); manifest=$(latest manifest.json)
  [ -n "$samples" ] && [ -n "$manifest" ] || { echo "no samples.jsonl.gz + manifest.json returned" >&2; exit 1; }
  dest=data/selfeval-gsm8k-h200
  old=$dest/samples.jsonl.gz
  [ -f "$old" ] || old=../shared/data/selfeval-gsm8k-h200/samples.jsonl.gz
  ref=$dest/manifest.json
  [ -f "$ref" ] || ref=../shared/data/selfeval-gsm8k-h200/manifest.json
  n_old=$(gzip -dc "$old" | grep -c .); n_new=$(gzip -dc "$samples" | grep -c .)
  cmp -s <(gzip -dc "$old") <(gzip -dc "$samples" | head -n "$n_old") \
    || { echo "the returned samples do not start with the $n_old old ones: not landed" >&2; exit 1; }
  mkdir -p "$dest"
  cp "$samples" "$dest/samples.jsonl.gz"
  python3 scripts/gpu/tools.py sanitize-manifest "$manifest" "$dest/manifest.json" "$ref"
  echo "data: $n_old -> $n_new prompts in $dest (update its README.md, then git add $dest)"
  ;;
train)
  for f in adapter.tgz train-report.json eval.json attention-check.json data-manifest.json; do
    p=$(latest "$f"); [ -n "$p" ] && cp "$p" "$RUN/"
  done
  if [ -f "$RUN/adapter.tgz" ]; then rm -rf "$RUN/adapter" && tar -C "$RUN" -xzf "$RUN/adapter.tgz"; fi
  ls -la "$RUN"
  ;;
bench)
  b=$(latest bench.tgz)
  [ -n "$b" ] || { echo "no bench.tgz returned" >&2; exit 1; }
  rm -rf "$RUN/bench" && tar -C "$RUN" -xzf "$b"
  for f in summary.md distinct-scores.json distinct-scores-nofp32.json; do p=$(latest "$f"); [ -n "$p" ] && cp "$p" "$RUN/"; done
  echo "bench: $RUN/bench (sgl-adaptive bench report $RUN/bench), tables for bench/RESULTS.md in $RUN/summary.md"
  ;;
*) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
