"""Zero-shot LLM-as-a-judge: the policy model asked whether its answer is correct (the paper's Table 1
baseline), as a ``SelfEvalConfig`` for the programs, and a program that judges given responses (sweep).

The judge answers "Yes"/"No", the same words as the self-evaluation, so the backends' exact answer
logprobs serve it unchanged; the score is P("Yes") / (P("Yes") + P("No")).
"""

from __future__ import annotations

from typing import Any

import sglang as sgl

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.errors import ProgramError, UserError
from sgl_adaptive.programs.common import EVAL_VAR, ProgramRun, ask_selfeval, open_prompt, raise_fork_error
from sgl_adaptive.selfeval import SelfEvalConfig, score_from_meta_info

DEFAULT_JUDGE_PROMPT = 'Is the answer above correct? ("Yes." or "No.")'


def judge_config(prompt: str = DEFAULT_JUDGE_PROMPT) -> SelfEvalConfig:
    return SelfEvalConfig(prompt=prompt, keep_word="Yes", retry_word="No")


@sgl.function
def judge_responses(s, prompt: str, responses: list[str], config: MethodConfig) -> list[tuple[float, int]]:
    """Judge each response in its own branch: (score, prompt tokens of the judge request)."""
    cfg = config.selfeval
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
