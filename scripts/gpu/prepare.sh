#!/usr/bin/env bash
# On this (CPU) machine, before a GPU session: pack what the device calls carry, check that every call fits
# in 64 MiB beside the working tree, and print the call plan of each stage (scripts/gpu/README.md).
# Everything goes under .carry/ (git-ignored through .git/info/exclude):
#   .carry/g1        SGLang 0.5.17 + server deps + the recipe's device tools   (../shared/gpu/prepare-carry.sh)
#   .carry/w         wheels the device lacks (math-verify and its deps), the GSM8K train prompts (gzip) and,
#                    while the repo has no data/selfeval-gsm8k-h200/, the shared seed samples
#   .carry/m1..mK    the 0.5B GGUF in chunks as large as fit beside the tree   (../shared/gpu/prepare-model-carry.sh)
#   .carry/jit       optional: the JIT cache a previous session brought back (land.sh puts it there)
#   .carry/adapter   optional, bench stage: adapter.tgz of a train stage whose adapter has not shipped yet
# Environment: SHARED (../shared)  FORCE=1 (rebuild g1 and the chunks)  CHUNK_MIB (default: what fits)
#              SKIP_G1=1 / SKIP_MODEL=1 (pack only the rest; for checks on a machine without the wheels)
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"
SHARED=${SHARED:-$ROOT/../shared}
LIMIT_MIB=63   # one call carries at most 64 MiB, working tree included; keep a margin
MODEL_BYTES=491400064

mib() {  # MiB (rounded up) of the given paths; 0 when none exists
  local p total=0 b
  for p in "$@"; do [ -e "$p" ] && { b=$(du -sb "$p" | cut -f1); total=$((total + b)); }; done
  echo $(( (total + 1048575) / 1048576 ))
}
tree_mib() {  # what travels with every call: tracked files and untracked files git does not ignore
  git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
    | awk '{ s += $1 } END { printf "%d", (s + 1048575) / 1048576 }'
}
GIT_COMMON=$(git rev-parse --git-common-dir)
mkdir -p "$GIT_COMMON/info"
grep -qxF '/.carry/' "$GIT_COMMON/info/exclude" 2>/dev/null || echo '/.carry/' >> "$GIT_COMMON/info/exclude"

# 1. SGLang (the recipe)
if [ "${SKIP_G1:-0}" != 1 ] && { [ "${FORCE:-0}" = 1 ] || [ ! -f .carry/g1/tools/install-on-device.sh ]; }; then
  bash "$SHARED/gpu/prepare-carry.sh"
fi
if [ -d .carry/g2 ]; then
  echo "NOTE: the SGLang carry has several groups (.carry/g2 ...): carry each in its own call before setup" >&2
fi

# 2. wheels, prompts, seed samples
mkdir -p .carry/w/data
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
if ! ls .carry/w/math_verify-*.whl > /dev/null 2>&1; then
  python3 -m pip download -q --no-deps "${PLAT[@]}" -d .carry/w \
    math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
fi
[ -f .carry/w/data/gsm8k-train.jsonl.gz ] || gzip -9c "$SHARED/data/gsm8k-train.jsonl" > .carry/w/data/gsm8k-train.jsonl.gz
if [ -f data/selfeval-gsm8k-h200/samples.jsonl.gz ]; then
  rm -f .carry/w/data/seed-samples.jsonl.gz      # the repo's samples travel with the tree
else
  cp "$SHARED/data/selfeval-gsm8k-h200/samples.jsonl.gz" .carry/w/data/seed-samples.jsonl.gz
fi

# 3. where the optional carries ride, and the chunk size that leaves room for them
TREE=$(tree_mib); G1=$(mib .carry/g1); W=$(mib .carry/w); EXTRA=$(mib .carry/jit .carry/adapter)
SETUP_CARRY=(.carry/g1 .carry/w); FIRST_EXTRA=()
for x in .carry/jit .carry/adapter; do [ -d "$x" ] || continue
  if [ $((TREE + G1 + W + $(mib "${SETUP_CARRY[@]:2}" "$x"))) -le $LIMIT_MIB ]; then SETUP_CARRY+=("$x"); else FIRST_EXTRA+=("$x"); fi
done
SIDE=$(mib "${FIRST_EXTRA[@]}")
CHUNK_MIB=${CHUNK_MIB:-$((LIMIT_MIB - TREE - SIDE))}
[ "$CHUNK_MIB" -gt 60 ] && CHUNK_MIB=60
[ "$CHUNK_MIB" -ge 8 ] || { echo "no room for model chunks beside a $TREE MiB tree and $SIDE MiB of extras" >&2; exit 1; }

# 4. model chunks (re-split when the size changed)
if [ "${SKIP_MODEL:-0}" != 1 ]; then
  have=$(stat -c %s .carry/m1/chunk01-of-* 2>/dev/null || echo 0)
  if [ "${FORCE:-0}" = 1 ] || [ "$have" != $((CHUNK_MIB << 20)) ]; then
    CHUNK_MIB=$CHUNK_MIB bash "$SHARED/gpu/prepare-model-carry.sh"
  fi
fi
K=$(find .carry -maxdepth 1 -type d -name "m[0-9]*" 2>/dev/null | wc -l)
[ "$K" -gt 0 ] || K=$(( (MODEL_BYTES + (CHUNK_MIB << 20) - 1) / (CHUNK_MIB << 20) ))

# 5. sizes and the plan
echo
echo "working tree: $TREE MiB; .carry/g1 $G1 MiB, .carry/w $W MiB, extras $EXTRA MiB; model chunks of $CHUNK_MIB MiB: $K"
fail=0
check() { local what=$1; shift; local s; s=$((TREE + $(mib "$@")))
  printf '  %-34s %3d MiB%s\n' "$what" "$s" "$([ "$s" -le 64 ] || echo '   OVER 64 MiB')"; [ "$s" -le 64 ] || fail=1; }
check "call 1 (${SETUP_CARRY[*]})" "${SETUP_CARRY[@]}"
for i in $(seq 1 "$K"); do
  if [ "$i" = 1 ]; then check "call 2 (.carry/m1 ${FIRST_EXTRA[*]})" .carry/m1 "${FIRST_EXTRA[@]}"
  else check "call $((i + 1)) (.carry/m$i)" ".carry/m$i"; fi
done
json() { local out="" x; for x in "$@"; do out+="${out:+, }\"$x\""; done; echo "[$out]"; }
echo
echo "Device calls, back to back (each within 30 s of the last returning; see scripts/gpu/README.md):"
printf '  %-5s %-40s %s\n' "1" "carry=$(json "${SETUP_CARRY[@]}")" "bash scripts/gpu/device.sh setup"
for i in $(seq 1 $((K - 1))); do
  c=(".carry/m$i"); [ "$i" = 1 ] && c+=("${FIRST_EXTRA[@]}")
  printf '  %-5s %-40s %s\n' "$((i + 1))" "carry=$(json "${c[@]}")" "bash scripts/gpu/device.sh chunk"
done
c=(".carry/m$K"); [ "$K" = 1 ] && c+=("${FIRST_EXTRA[@]}")
printf '  %-5s %-40s %s\n' "$((K + 1))" "carry=$(json "${c[@]}")" "train: … model train-prep | data: … model serve | bench: … model bench-serve"
printf '  %-5s %-40s %s\n' "$((K + 2))" "carry=[]" "train: … train-fit | data: … data | bench: … bench"
exit $fail
