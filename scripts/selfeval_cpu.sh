#!/usr/bin/env bash
# The self-evaluator trained on CPU, end to end, each stage timed (wall s, peak RSS) into $RUN/times.tsv.
# Every stage resumes: rerun the script after an interrupt and finished stages are skipped (the cache
# resumes per prompt). Stages: data (relabel the shared H200 samples), cache (state entering block L-4),
# derive (state entering block L-1), probe (the probe curve), cv-* (out-of-fold top-k training), final
# (train on all prompts, export the adapter).
#
#   bash scripts/selfeval_cpu.sh [STAGE ...]     (default: all, in order)
#
# RUN (default runs/selfeval-cpu) holds the data and the reports; CACHE (default
# ~/.cache/sgl-adaptive/activations/h200-k4) the activations (about 2.5 GB, not for git).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/selfeval-cpu}
CACHE=${CACHE:-$HOME/.cache/sgl-adaptive/activations/h200-k4}
SHARED=${SHARED:-../shared/data}
FOLDS=${FOLDS:-5}
EPOCHS=${EPOCHS:-2}
CLI=(.venv/bin/sgl-adaptive finetune)
export OMP_WAIT_POLICY=PASSIVE  # torch's spinning threads slow a shared CPU ~3x
mkdir -p "$RUN"

timed() {  # timed NAME CMD...: run CMD, append NAME, wall seconds and peak RSS (MiB) to times.tsv
    local name=$1; shift
    local log="$RUN/$name.log"
    echo "== $name: $*" >&2
    /usr/bin/time -f "%e %M" -o "$RUN/.time" "$@" 2> >(tee "$log" >&2)
    read -r wall rss < "$RUN/.time"
    printf '%s\t%s\t%s\n' "$name" "$wall" "$((rss / 1024))" >> "$RUN/times.tsv"
}

stage_data() {
    [[ -f $RUN/data/train.jsonl ]] && return
    mkdir -p "$RUN/data"
    zcat "$SHARED/selfeval-gsm8k-h200/samples.jsonl.gz" > "$RUN/data/samples.jsonl"
    timed data "${CLI[@]}" data --prompts "$SHARED/gsm8k-train.jsonl" --shuffle --limit 342 -k 8 \
        --max-new-tokens 512 --out "$RUN/data"
}
stage_cache() { timed cache "${CLI[@]}" cache --data "$RUN/data" --out "$CACHE" --k 4; }
stage_derive() { timed derive "${CLI[@]}" cache --data "$RUN/data" --out "$CACHE" --derive 1; }
stage_probe() {
    [[ -f $RUN/probe/probe-curve.json ]] && return
    timed probe "${CLI[@]}" probe --cache "$CACHE" --out "$RUN/probe" --layers 4,8,12,14,16,18,20
}
cv() {  # cv NAME FLAGS...: out-of-fold top-k training
    local name=$1; shift
    [[ -f $RUN/cv/$name.json ]] && return
    timed "cv-$name" "${CLI[@]}" top --cache "$CACHE" --out "$RUN/cv" --name "$name" --cv "$FOLDS" \
        --epochs "$EPOCHS" "$@"
}
stage_cv() {  # the hard label first: the session-6 fit check ranked better with it
    cv k1-hard --k 1 --hard-labels
    cv k1-soft --k 1 --soft-labels
}
stage_final() {  # FINAL_FLAGS: the setting the cross-validation chose
    [[ -f $RUN/adapter/adapter_model.safetensors ]] && return
    # shellcheck disable=SC2086
    timed final "${CLI[@]}" top --cache "$CACHE" --out "$RUN/adapter" --cv 0 --epochs "$EPOCHS" ${FINAL_FLAGS:---k 1 --hard-labels}
}

stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(data cache derive probe cv final)
for s in "${stages[@]}"; do "stage_$s"; done
