#!/usr/bin/env bash
# The self-evaluator trained on CPU, end to end, each stage timed (wall s, peak RSS) into $RUN/times.tsv.
# Every stage resumes: rerun the script after an interrupt and finished stages are skipped (the cache
# resumes per prompt). Stages: data (relabel the shared H200 samples), cache (state entering block L-4),
# derive (state entering block L-1), probe (the probe curve), cv-* (out-of-fold top-k training), final
# (train on all prompts, export the adapter), greedy (GSM8K dev greedy answers before and after), card
# (the model card and the default decision); curve (the learning curve), k2 (two blocks).
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
stage_curve() {  # the learning curve: each fold trains on the first N of its training prompts
    for n in 50 100 200; do cv "k1-hard-p$n" --k 1 --hard-labels --train-prompts "$n"; done
}
stage_k2() {  # two blocks cost ~7x one per step here, so k 2 is compared with k 1 at 100 training prompts
    [[ -n $(find "$CACHE/prompts" -name '*.k2.safetensors' -print -quit) ]] ||
        timed derive2 "${CLI[@]}" cache --data "$RUN/data" --out "$CACHE" --derive 2
    cv k2-hard-p100 --k 2 --hard-labels --train-prompts 100
}
stage_final() {  # FINAL_FLAGS: the setting the cross-validation chose (best out-of-fold Best-of-8 of the trained)
    [[ -f $RUN/adapter/adapter_model.safetensors ]] && return
    # shellcheck disable=SC2086
    timed final "${CLI[@]}" top --cache "$CACHE" --out "$RUN/adapter" --cv 0 ${FINAL_FLAGS:---k 1 --hard-labels --lr 1e-3 --epochs 3}
}

greedy() {  # greedy NAME [--model M]: greedy answers on the first DEV_QUESTIONS GSM8K dev questions (resumes)
    local name=$1; shift
    timed "$name" .venv/bin/sgl-adaptive bench --dataset gsm8k-dev --methods greedy --limit "${DEV_QUESTIONS:-37}" --parallel 8 \
        --max-new-tokens 512 --out "$RUN/$name" "$@"
}
stage_greedy() {  # before and after: the base, the merged adapter, and the base again (the control)
    local base
    base=$(.venv/bin/python -c 'from sgl_adaptive.model_store import ensure_default_model; print(ensure_default_model())')
    greedy dev-greedy-base --model "$base"
    greedy dev-greedy-trained --model "$("${CLI[@]}" merge --adapter "$RUN/adapter")"
    greedy dev-greedy-base-rerun --model "$base"
}
stage_card() {
    "${CLI[@]}" card --adapter "$RUN/adapter" --report "$RUN/cv/${FINAL_NAME:-k1-hard-lr1e-3-e3}.json" \
        --greedy-base "$RUN/dev-greedy-base" --greedy-trained "$RUN/dev-greedy-trained" \
        --greedy-control "$RUN/dev-greedy-base-rerun" --times "$RUN/times.tsv" \
        --command "bash scripts/selfeval_cpu.sh" \
        --command "sgl-adaptive finetune top --cache CACHE --out ADAPTER --cv 0 ${FINAL_FLAGS:---k 1 --hard-labels --lr 1e-3 --epochs 3}"
}

stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(data cache derive probe cv curve final greedy card k2)
for s in "${stages[@]}"; do "stage_$s"; done
