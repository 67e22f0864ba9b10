"""Best-of-N by self-evaluation: fork N samples, score each when finished, return the argmax."""

from __future__ import annotations

import sglang as sgl

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.programs.common import (
    ProgramOutcome,
    ProgramRun,
    draw,
    generate,
    open_prompt,
    outcome,
    self_evaluate,
)
from sgl_adaptive.schedules import Annealing


@sgl.function
def best_of_n(s, prompt: str, config: MethodConfig) -> ProgramOutcome:
    with ProgramRun(config) as run:
        open_prompt(run, s, prompt)
        anneal = Annealing(config.temperature, config.anneal if config.anneal_best_of_n else "none")
        samples = draw(run, s, [anneal(k) for k in range(config.n)], round_index=0, first_index=0)
        generate(run, samples, config.max_new_tokens)
        self_evaluate(run, samples)
        return outcome(run, samples)
