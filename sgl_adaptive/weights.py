"""Refuse broken weights: one check, used wherever a model is trained, exported or loaded.

A training run that diverged can leave NaN or inf in every adapted tensor while the code around it
goes on (the first GPU run exported 336 NaN LoRA tensors and evaluated them with exit code 0). Every
path that writes or loads a checkpoint calls ``check_finite`` and stops with a one-line error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sgl_adaptive.errors import UserError


class NonFiniteWeightsError(UserError):
    """A model, adapter or state dict holds NaN or inf values."""


def non_finite_tensors(tensors: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an inf."""
    import torch

    bad = []
    for name, tensor in tensors:
        if tensor is None or not torch.is_floating_point(tensor):
            continue
        if not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


def check_finite(weights: Any, source: str) -> None:
    """Raise ``NonFiniteWeightsError`` when ``weights`` (a module or a state dict) has NaN/inf values.

    ``source`` names the checkpoint in the message (a path, or "the trained model")."""
    if isinstance(weights, Mapping):
        items: Iterable[tuple[str, Any]] = weights.items()
    else:
        items = ((name, p.detach()) for name, p in weights.named_parameters())
    bad = non_finite_tensors(items)
    if bad:
        raise NonFiniteWeightsError(
            f"{source} has non-finite (NaN/inf) weights in {len(bad)} tensor(s), e.g. {bad[0]}: "
            "the training run that produced it diverged; retrain (lower --lr) instead of using it"
        )
