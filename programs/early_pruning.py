"""Early pruning: start N samples, score them after ``prune_at`` tokens, finish only the best ``keep``
(or, with ``prune_by="random"``, ``keep`` random ones: the paper's ablation)."""

from __future__ import annotations

import sglang as sgl

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.programs.common import (
    ProgramOutcome,
    ProgramRun,
    Sample,
    draw,
    generate,
    keep_top,
    open_prompt,
    outcome,
    score_samples,
)


def prune_and_finish(run: ProgramRun, samples: list[Sample], keep: int) -> None:
    """Generate the first ``prune_at`` tokens, score the partial responses, continue the top ``keep``
    to the token budget and score them again. Samples that finish before the pruning point are
    complete: their first score is final. Random pruning (``prune_by="random"``) scores only those."""
    config = run.config
    budget, prune_at = config.max_new_tokens, min(config.prune_at, config.max_new_tokens)
    generate(run, samples, prune_at)
    score_samples(run, samples if config.prune_by == "score" else [smp for smp in samples if smp.done])
    survivors = [smp for smp in keep_top(samples, keep, config) if not smp.done]
    if survivors:
        generate(run, survivors, budget - prune_at)
        score_samples(run, survivors)


@sgl.function
def early_pruning(s, prompt: str, config: MethodConfig) -> ProgramOutcome:
    with ProgramRun(config) as run:
        open_prompt(run, s, prompt)
        samples = draw(run, s, [config.temperature] * config.n, round_index=0, first_index=0)
        prune_and_finish(run, samples, config.keep)
        return outcome(run, samples)
