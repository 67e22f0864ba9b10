"""The reward model as the bench uses it: ``rm-best-of-n`` (the paper's main baseline) scores with
``sgl_adaptive.reward_model.RewardModel``, whose reads are counted in FLOPs, and general prompts are judged
by a reward model, as a win against their reference output or as the raw reward (``make_judge``).
"""

from __future__ import annotations

from typing import Any

from sgl_adaptive.reward_model import RewardModel, RewardScores

__all__ = ["RewardModel", "RewardScores", "make_judge", "preference"]


def preference(reward: float, reference_reward: float) -> float:
    """Pairwise preference of a response over the reference output: 1 win, 0.5 tie, 0 loss."""
    if reward > reference_reward:
        return 1.0
    return 0.5 if reward == reference_reward else 0.0


def make_judge(rm: RewardModel) -> Any:
    """A ``datasets.Judge``: the reward, or the win against the item's reference output when it has one."""
    cache: dict[str, float] = {}

    def judge(item: Any, responses: list[str]) -> list[float]:
        rewards = rm.score(item.prompt, responses).scores
        if item.reference is None:
            return rewards
        if item.qid not in cache:
            cache[item.qid] = rm.score(item.prompt, [item.reference]).scores[0]
        return [preference(r, cache[item.qid]) for r in rewards]

    return judge
