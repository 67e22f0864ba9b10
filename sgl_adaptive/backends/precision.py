"""Which dtype the in-process model runs in, and exact (fp32) logits for the answer tokens.

A bf16 model is about 2.5× faster than fp32 when decoding a batch on a CPU with native bf16
instructions (AVX512-BF16 or AMX), but its logits come out rounded to bf16: at magnitudes of
16–32 they move in steps of 0.125, so the self-evaluation score P(No)/(P(Yes)+P(No)) takes few
distinct values (the same effect the shared notes measured on a bf16 SGLang server). ``ExactHead``
keeps the speed and the resolution: it captures the output head's input and recomputes, in fp32,
only the logits of the few token ids a request asks about.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

_FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config fields of models whose logits are not just ``head(hidden)`` (the exact path is then off)."""


@cache
def cpu_has_fast_bf16() -> bool:
    """True on Linux CPUs with native bf16 dot products (AVX512-BF16 or AMX-BF16)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return any(flag in flags for flag in _FAST_BF16_FLAGS)


def default_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU, and on a CPU with native bf16; fp32 on other CPUs (emulated bf16 is slower)."""
    if device != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``/``"auto"`` → None (the device default); ``"bfloat16"``, ``"float32"`` … → the torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r} (auto, float32, bfloat16 or float16)")
    return value


class ExactHead:
    """fp32 logits of chosen token ids for a half-precision causal LM.

    A forward hook keeps the output head's input (the final hidden states, already sliced by
    ``logits_to_keep``) of the model's latest forward pass; ``logits`` recomputes chosen rows of
    the head from it in fp32. Disabled (``enabled`` False) for fp32 models, heads that are not a
    plain linear layer, and models that scale or cap their logits.
    """

    def __init__(self, model: Any) -> None:
        head = model.get_output_embeddings()
        config = getattr(model.config, "text_config", None) or model.config
        self.enabled = (
            isinstance(head, torch.nn.Linear)
            and head.weight.dtype != torch.float32
            and not any(getattr(config, name, None) not in (None, 1, 1.0) for name in _SCALED_LOGITS)
        )
        self.hidden: torch.Tensor | None = None
        self._hook = None
        if self.enabled:
            self._head = head
            self._hook = head.register_forward_hook(self._capture)

    def __enter__(self) -> ExactHead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hook (the model is then as before)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook, self.hidden = None, None

    def _capture(self, module: Any, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        self.hidden = inputs[0].detach()

    def last_hidden(self) -> torch.Tensor | None:
        """The last position's hidden state of every row of the latest forward, ``[batch, hidden]``."""
        return None if not self.enabled or self.hidden is None else self.hidden[:, -1]

    def all_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the whole vocabulary for hidden states ``[..., hidden]`` → ``[..., vocab]``."""
        out = hidden.float() @ self._head.weight.float().T
        return out if self._head.bias is None else out + self._head.bias.float()

    def logits(self, hidden: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        """fp32 logits of ``ids`` for hidden states ``[..., hidden]`` → ``[..., len(ids)]``."""
        index = torch.as_tensor(list(ids), device=self._head.weight.device)
        out = hidden.float() @ self._head.weight[index].float().T
        if self._head.bias is not None:
            out = out + self._head.bias[index].float()
        return out
