"""A pool of N samples scored at every token budget: one generation, many offline decisions.

Each sample is generated in segments that end at the budgets (e.g. 16, 32, 64, 128, 256 tokens,
then the token limit) and scored after each segment (by the configured scorer: self-evaluated in a side
branch by default, or from its top-k log-probabilities so far), so every candidate
carries ``scores = [(tokens so far, score), ...]``; with ``free_scorers`` it also carries, at the same
points, the training-free scores (``free_scores``), which cost no request. Sweeps of thresholds and pruning points
(``bench --mode sweep``) and training data with mid-generation prefixes are computed from it.
"""

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
from sgl_adaptive.scorers import Scorer


@sgl.function
def sample_pool(
    s,
    prompt: str,
    config: MethodConfig,
    budgets: tuple[int, ...] = (),
    evaluate: bool = True,
    free_scorers: tuple[str, ...] = (),
) -> ProgramOutcome:
    """``config.n`` samples (annealed when ``config.anneal_best_of_n``), scored at each budget < the
    token limit and at the end (when ``evaluate``), also by each training-free scorer named."""
    extra = [Scorer(name, config.confidence_window, config.scorer_top_k) for name in free_scorers]
    with ProgramRun(config) as run:
        open_prompt(run, s, prompt)
        samples = draw_pool(run, s)
        points = sorted({b for b in budgets if 0 < b < config.max_new_tokens} | {config.max_new_tokens})
        done_tokens = 0
        for point in points:
            active = [smp for smp in samples if not smp.done]
            if not active:
                break
            generate(run, active, point - done_tokens, with_logprobs=bool(extra))
            done_tokens = point
            if evaluate:
                score_samples(run, active)
            for smp in active:
                for scorer in extra:
                    value = scorer.score(smp.top_logprobs)
                    if value is not None:
                        smp.free_scores.setdefault(scorer.kind, []).append((smp.tokens, value))
        return outcome(run, samples)
