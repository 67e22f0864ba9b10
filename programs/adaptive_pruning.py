"""Adaptive sampling with early pruning in every round (not in the paper).

Rounds grow as in adaptive sampling (1, 1, 2, 4, 8 ...); within a round of b samples, the partial
responses are scored after ``prune_at`` tokens and only the top ceil(b * keep / n) are finished.
Stops once the best complete sample reaches the threshold.
"""

from __future__ import annotations

import math

import sglang as sgl

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.programs.common import (
    ProgramOutcome,
    ProgramRun,
    Sample,
    best_score,
    draw,
    open_prompt,
    outcome,
)
from sgl_adaptive.programs.early_pruning import prune_and_finish
from sgl_adaptive.schedules import Annealing, ThresholdStop, batch_sizes


def round_keep(size: int, keep: int, n: int) -> int:
    """Samples finished in a round of ``size``: the overall keep fraction, at least one."""
    return max(1, math.ceil(size * keep / n))


@sgl.function
def adaptive_pruning(s, prompt: str, config: MethodConfig) -> ProgramOutcome:
    with ProgramRun(config) as run:
        open_prompt(run, s, prompt)
        anneal = Annealing(config.temperature, config.anneal)
        stop = ThresholdStop(config.threshold)
        samples: list[Sample] = []
        for round_index, size in enumerate(batch_sizes(config.n)):
            k = len(samples)
            batch = draw(run, s, [anneal(k + i) for i in range(size)], round_index, first_index=k)
            prune_and_finish(run, batch, round_keep(size, config.keep, config.n))
            samples += batch
            if stop.should_stop(best_score(samples)):
                break
        return outcome(run, samples)
