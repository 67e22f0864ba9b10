"""Adaptive sampling with early pruning in every round (not in the paper).

Rounds grow as in adaptive sampling (1, 1, 2, 4, 8 ...); within a round of b samples, the partial
responses are scored after ``prune_at`` tokens and only the top ceil(b * keep / n) are finished.
Stops once the best complete sample reaches the threshold.
"""

from __future__ import annotations

import math

import sglang as sgl

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.programs.adaptive_sampling import sample_in_rounds
from sgl_adaptive.programs.common import ProgramOutcome, ProgramRun, Sample, open_prompt, outcome
from sgl_adaptive.programs.early_pruning import prune_and_finish


def round_keep(size: int, keep: int, n: int) -> int:
    """Samples finished in a round of ``size``: the overall keep fraction, at least one."""
    return max(1, math.ceil(size * keep / n))


@sgl.function
def adaptive_pruning(s, prompt: str, config: MethodConfig) -> ProgramOutcome:
    with ProgramRun(config) as run:
        open_prompt(run, s, prompt)

        def finish(batch: list[Sample], size: int) -> None:
            prune_and_finish(run, batch, round_keep(size, config.keep, config.n))

        return outcome(run, sample_in_rounds(run, s, finish))
