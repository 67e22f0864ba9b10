"""Best-of-N: fork N samples, score each when finished (by the configured scorer), return the selector's
pick (argmax by default; ``majority`` reads no score, so the samples are not scored)."""

from __future__ import annotations

import sglang as sgl

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.programs.common import (
    ProgramOutcome,
    ProgramRun,
    draw_pool,
    generate,
    open_prompt,
    outcome,
    score_samples,
)


@sgl.function
def best_of_n(s, prompt: str, config: MethodConfig) -> ProgramOutcome:
    with ProgramRun(config) as run:
        open_prompt(run, s, prompt)
        samples = draw_pool(run, s)
        generate(run, samples, config.max_new_tokens)
        if config.selector_rule().needs_scores:
            score_samples(run, samples)
        return outcome(run, samples)
