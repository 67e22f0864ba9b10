"""The trained self-evaluator's model card, and the rule that decides whether it becomes the default.

The rule (issue 21): the adapter becomes the library's default model only when its out-of-fold Best-of-8
beats the first sample by more than its interval (the lower end of the paired 95% bootstrap interval of
selected − first is above 0) and generation barely moved (greedy answers on the GSM8K dev split agree
with the base model's on at least 95% of questions). One condition is ours: its Best-of-N must not be
below the untrained model's on the same samples, since the untrained answer token already beats the
first sample on these pools (+0.076 on the shared 342 prompts), and an adapter that selects worse than
no adapter must not replace it."""

from __future__ import annotations

from typing import Any

from sgl_adaptive.finetune.oof import fmt, fmt_ci

MIN_GREEDY_AGREEMENT = 0.95


def becomes_default(
    cv: dict[str, Any], greedy_agreement: float | None, untrained: dict[str, Any] | None = None
) -> tuple[bool, str]:
    """(whether the adapter becomes the default, why), from its cross-validation report and the untrained
    model's report on the same examples."""
    bon = cv["report"]["best_of_n"]
    low, high = bon["selected_minus_first_ci"]
    gain = bon["selected_minus_first"]
    if not low > 0:
        return False, (
            f"out-of-fold Best-of-{bon['pool_size']:.0f} minus first sample is {gain:+.3f} "
            f"[{low:+.3f}, {high:+.3f}]: not above its interval"
        )
    if untrained is not None and bon["selected"] < untrained["report"]["best_of_n"]["selected"]:
        return False, (
            f"out-of-fold Best-of-{bon['pool_size']:.0f} {bon['selected']:.3f} is below the untrained "
            f"model's {untrained['report']['best_of_n']['selected']:.3f} on the same samples"
        )
    if greedy_agreement is None or not greedy_agreement >= MIN_GREEDY_AGREEMENT:
        return (
            False,
            f"greedy answers agree on {greedy_agreement} of dev questions (< {MIN_GREEDY_AGREEMENT})",
        )
    return (
        True,
        f"Best-of-N gain {gain:+.3f} [{low:+.3f}, {high:+.3f}], greedy agreement {greedy_agreement:.3f}",
    )


def figures_table(trained: dict[str, Any], untrained: dict[str, Any]) -> list[str]:
    """Markdown rows of the headline out-of-fold figures, untrained against trained."""
    rows = ["| out of fold | untrained | trained |", "|---|---|---|"]
    t, u = trained["report"], untrained["report"]
    for label, key, ci_key in (
        ("AUROC (all examples)", "auroc", "auroc_ci"),
        ("AUROC within prompts", "within_prompt_auroc", "within_prompt_auroc_ci"),
    ):
        rows.append(
            f"| {label} | {fmt_ci(u['summary'][key], u['summary'][ci_key])} | "
            f"{fmt_ci(t['summary'][key], t['summary'][ci_key])} |"
        )
    rows.append(
        f"| Brier (hard label / pairwise target) | {fmt(u['summary']['brier'], 4)} / "
        f"{fmt(u['summary']['brier_soft'], 4)} | {fmt(t['summary']['brier'], 4)} / "
        f"{fmt(t['summary']['brier_soft'], 4)} |"
    )
    tb, ub = t["best_of_n"], u["best_of_n"]
    rows.append(
        f"| Best-of-{tb['pool_size']:.0f} by the score | {fmt(ub['selected'])} | {fmt(tb['selected'])} |"
    )
    rows.append(
        f"| Best-of-N − first sample [95% CI] | {fmt_ci(ub['selected_minus_first'], ub['selected_minus_first_ci'], '+')} | "
        f"{fmt_ci(tb['selected_minus_first'], tb['selected_minus_first_ci'], '+')} |"
    )
    rows.append(
        f"| Best-of-N − majority [95% CI] | {fmt_ci(ub['selected_minus_majority'], ub['selected_minus_majority_ci'], '+')} | "
        f"{fmt_ci(tb['selected_minus_majority'], tb['selected_minus_majority_ci'], '+')} |"
    )
    tv, uv = t.get("weighted_vote") or {}, u.get("weighted_vote") or {}
    if tv:
        rows.append(
            f"| score-weighted vote (weighting chosen per fold) | {fmt(uv.get('reward'))} | {fmt(tv.get('reward'))} |"
        )
        rows.append(
            f"| weighted vote − majority [95% CI] | "
            f"{fmt_ci(uv.get('minus_majority'), uv.get('minus_majority_ci'), '+')} | "
            f"{fmt_ci(tv.get('minus_majority'), tv.get('minus_majority_ci'), '+')} |"
        )
    rows.append(
        f"| first sample / majority / oracle | {fmt(tb['first_sample'])} / {fmt(tb['majority'])} / "
        f"{fmt(tb['oracle'])} | (same samples) |"
    )
    return rows


def model_card(
    *,
    training: dict[str, Any],
    trained: dict[str, Any],
    untrained: dict[str, Any],
    decision: tuple[bool, str],
    drift: dict[str, Any] | None,
    greedy: dict[str, Any] | None,
    times: list[tuple[str, float, int | None]],
    # (stage, wall seconds, peak RSS in MiB or None), as scripts/selfeval_cpu.sh writes times.tsv
    commands: list[str],
) -> str:
    """The adapter's README: what was trained on what, how, the out-of-fold figures, drift, greedy
    accuracy before and after, stage times, and whether it is the default (and why)."""
    s = training["settings"]
    lines = [
        "# Self-evaluation adapter for Qwen2.5-Coder-0.5B-Instruct (CPU-trained)",
        "",
        f"- **Base model:** the embedded default (Q4_K_M GGUF converted to bf16), weights sha256 "
        f"`{training['base_sha256']}`.",
        f"- **Data:** `../shared/data/selfeval-gsm8k-h200` ({training['prompts']} GSM8K-train prompts × 8 "
        f"on-policy samples from a real SGLang server, verifier rewards, tie margin 0.5; every response in "
        f"full and cut at 16/32/64/128/256 tokens); examples sha256 `{training['data_sha256']}`.",
        f"- **What is trained:** LoRA r {s['lora_r']} (α {s['lora_alpha']}) on the attention and MLP "
        f"projections of the top {s['k']} block(s), and the output head's rows of the answer tokens "
        f"{'(trained)' if s['head_rows'] else '(not trained)'}; from the activation cache "
        "(`finetune cache`, `finetune top`).",
        f"- **Target:** {'the pairwise P(win or tie) (the paper’s)' if s['soft_labels'] else 'the hard label (no other sample beats it)'}; "
        f"drift term {s['kl_weight']} × KL(base ‖ model) at {s['drift_positions']} response positions per "
        "full response.",
        f"- **Optimisation:** AdamW lr {s['lr']}, cosine with {s['warmup_ratio']:.0%} warm-up, "
        f"{s['epochs']} epochs, {s['prompts_per_step']} prompts (packed trees) per step, "
        f"{training['run']['steps']} steps, seed {s['seed']}.",
        "",
        "## Out-of-fold figures (5-fold cross-validation grouped by prompt, the same recipe per fold)",
        "",
        "Intervals: 95% bootstrap over prompts, paired where two choices are compared.",
        "",
        *figures_table(trained, untrained),
        "",
    ]
    if drift:
        lines += [
            f"**Drift** ({drift.get('where', '')}): KL(base ‖ model) {drift['kl_per_token']:.5f} nats per "
            f"token over {drift['tokens']} response tokens, greedy next-token agreement "
            f"{drift['greedy_agreement']:.3f}.",
            "",
        ]
    if greedy:
        lines += [
            f"**GSM8K dev split, greedy** ({greedy['questions']} questions): accuracy "
            f"{greedy['base_accuracy']:.3f} before, {greedy['accuracy']:.3f} after; the final answers agree "
            f"on {greedy['agreement']:.3f} of questions and the responses are identical on "
            f"{greedy['same_response']:.3f}."
            + (
                f" A second greedy run of the base agrees with the first on {greedy['control']['agreement']:.3f} "
                f"of final answers ({greedy['control']['same_response']:.3f} identical responses): batched bf16 "
                "decoding is not deterministic, so this is the ceiling of the agreement."
                if greedy.get("control")
                else ""
            ),
            "",
        ]
    default, why = decision
    lines += [
        f"**Default model:** {'yes' if default else 'no'}: {why}.",
        "",
        "## Time and memory (2 cores, AMD EPYC with AVX512-BF16, bf16)",
        "",
        "| stage | wall | peak RSS |",
        "|---|---|---|",
        *[
            f"| {name} | {wall / 60:.1f} min | {'—' if rss is None else f'{rss / 1024:.1f} GiB'} |"
            for name, wall, rss in times
        ],
        "",
        "## Commands",
        "",
        *[f"    {c}" for c in commands],
        "",
    ]
    return "\n".join(lines)
