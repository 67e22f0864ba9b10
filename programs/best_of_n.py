"""Best-of-N by self-evaluation: fork N samples, score each when finished, return the argmax."""

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
    self_evaluate,
)


@sgl.function
def best_of_n(s, prompt: str, config: MethodConfig) -> ProgramOutcome:
    with ProgramRun(config) as run:
        open_prompt(run, s, prompt)
        samples = draw_pool(run, s)
        generate(run, samples, config.max_new_tokens)
        self_evaluate(run, samples)
        return outcome(run, samples)
