"""Greedy decoding: the baseline, one sample at temperature 0 and no self-evaluation."""

from __future__ import annotations

import sglang as sgl

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.programs.common import ProgramOutcome, ProgramRun, Sample, generate, open_prompt, outcome


@sgl.function
def greedy(s, prompt: str, config: MethodConfig) -> ProgramOutcome:
    with ProgramRun(config) as run:
        open_prompt(run, s, prompt)
        s += sgl.assistant_begin()
        sample = Sample(s, index=0, temperature=0.0, round=0)
        run.meter.start_round(1)
        generate(run, [sample], config.max_new_tokens)
        return outcome(run, [sample])
