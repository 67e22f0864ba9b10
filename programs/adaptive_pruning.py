"""Adaptive sampling with early pruning in every round (not in the paper).

Rounds grow as in adaptive sampling (1, 1, 2, 4, 8 ...); within a round of b samples, the partial
responses are scored after ``prune_at`` tokens and only the top ceil(b * keep / n) are finished.
Stops once the stop rule holds on the complete samples (by default: the best reaches the threshold).
"""

from __future__ import annotations

import sglang as sgl

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.programs.adaptive_sampling import sample_in_rounds
from sgl_adaptive.programs.common import ProgramOutcome, ProgramRun, Sample, open_prompt, outcome
from sgl_adaptive.programs.early_pruning import prune_and_finish
from sgl_adaptive.rules import round_keep

__all__ = ["adaptive_pruning", "round_keep"]


@sgl.function
def adaptive_pruning(s, prompt: str, config: MethodConfig) -> ProgramOutcome:
    with ProgramRun(config) as run:
        open_prompt(run, s, prompt)

        def finish(batch: list[Sample], size: int) -> None:
            prune_and_finish(run, batch, round_keep(size, config.keep, config.n))

        return outcome(run, sample_in_rounds(run, s, finish))
