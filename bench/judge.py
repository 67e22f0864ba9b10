"""Zero-shot LLM-as-a-judge over given responses (the sweep's ``judge-best-of-n``): a program that asks the
policy the judge's question after each response.

The judge itself (its question, ``judge_config``, and the ``judge`` scorer of the programs) lives in
``sgl_adaptive.scorers``; its score is P("Yes") / (P("Yes") + P("No")).
"""

from __future__ import annotations

from typing import Any

import sglang as sgl

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.errors import ProgramError, UserError
from sgl_adaptive.programs.common import EVAL_VAR, ProgramRun, ask_selfeval, open_prompt, raise_fork_error
from sgl_adaptive.scorers import DEFAULT_JUDGE_PROMPT, judge_config
from sgl_adaptive.selfeval import score_from_meta_info

__all__ = ["DEFAULT_JUDGE_PROMPT", "judge_config", "judge_responses", "judge_texts"]


@sgl.function
def judge_responses(s, prompt: str, responses: list[str], config: MethodConfig) -> list[tuple[float, int]]:
    """Judge each response in its own branch: (score, prompt tokens of the judge request). The question is
    ``config.evaluation()``: the judge's with ``scorer="judge"`` or a ``selfeval`` set to ``judge_config``."""
    cfg = config.evaluation()
    with ProgramRun(config) as run:
        open_prompt(run, s, prompt)
        group = run.fork(s, len(responses))
        for branch, response in zip(group, responses, strict=True):
            branch += sgl.assistant(response)
            ask_selfeval(branch, cfg)
        out = []
        for i, branch in enumerate(group):
            meta = branch.get_meta_info(EVAL_VAR)
            if meta is None:
                raise_fork_error(branch, f"judging response {i}")
            out.append((score_from_meta_info(meta, cfg).score, int(meta.get("prompt_tokens", 0))))
        return out


def judge_texts(
    backend: Any, prompt: str, responses: list[str], config: MethodConfig
) -> list[tuple[float, int]]:
    """Run ``judge_responses``; errors are raised as in ``run_program``."""
    state = judge_responses.run(prompt=prompt, responses=responses, config=config, backend=backend)
    error = state.error()
    if error is not None:
        if isinstance(error, UserError):
            raise error
        raise ProgramError(f"judge failed: {type(error).__name__}: {error}") from error
    return state.ret_value
