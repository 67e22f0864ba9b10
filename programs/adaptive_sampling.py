"""Adaptive sampling: sequential batches of growing size, stopping once a sample scores high enough.

Round r draws ``batch_sizes(n)[r]`` samples (1, 1, 2, 4, 8 for n = 16) at annealed temperatures
T(k) for the k-th sample overall, scores them, and stops as soon as the stop rule says so (by default
the best score reaches the threshold), or when the budget is spent. The samples are scored (by the
configured scorer) only when the selector or the stop rule reads scores (``majority`` with ``beta``/``esc``
does not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sglang as sgl

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.programs.common import (
    ProgramOutcome,
    ProgramRun,
    Sample,
    draw,
    generate,
    open_prompt,
    outcome,
    sample_views,
    score_samples,
)
from sgl_adaptive.schedules import Annealing, batch_sizes

FinishRound = Callable[[list[Sample], int], None]
"""Generates and scores one round's batch; gets the batch and the round's size."""


def sample_in_rounds(run: ProgramRun, s: Any, finish: FinishRound) -> list[Sample]:
    """The adaptive loop: draw each round at the annealed temperatures of the samples drawn so far,
    let ``finish`` generate and score it, stop once the stop rule holds on the complete samples."""
    config = run.config
    anneal = Annealing(config.temperature, config.anneal)
    stop = config.stop_rule()
    samples: list[Sample] = []
    for round_index, size in enumerate(batch_sizes(config.n)):
        k = len(samples)
        batch = draw(run, s, [anneal(k + i) for i in range(size)], round_index, first_index=k)
        finish(batch, size)
        samples += batch
        scores, answers = sample_views(samples)
        if stop.should_stop([smp.index for smp in samples if smp.done], scores, answers):
            break
    return samples


@sgl.function
def adaptive_sampling(s, prompt: str, config: MethodConfig) -> ProgramOutcome:
    with ProgramRun(config) as run:
        open_prompt(run, s, prompt)

        scored = config.selector_rule().needs_scores or config.stop_rule().needs_scores

        def finish(batch: list[Sample], size: int) -> None:
            generate(run, batch, config.max_new_tokens)
            if scored:
                score_samples(run, batch)

        return outcome(run, sample_in_rounds(run, s, finish))
