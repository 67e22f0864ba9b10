"""Command-line options shared by several commands (``run``, ``batch``, ``serve``, ``bench``), and the one
``MethodConfig`` builder of the commands whose parameters carry its field names (``run``, ``batch``)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.rules import SELECTORS
from sgl_adaptive.scorers import SCORERS

DeviceOption = Annotated[
    str | None,
    typer.Option(help="In-process backend device: cpu, cuda or cuda:N (default: cuda when available)."),
]
DtypeOption = Annotated[
    str,
    typer.Option(
        help="In-process model dtype: auto (bf16 on GPUs and bf16-capable CPUs, else float32), float32, "
        "bfloat16 or float16."
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option(help="HF model dir, GGUF file or hub name (default: the embedded 0.5B model)."),
]
EndpointOption = Annotated[str | None, typer.Option(help="URL of a running SGLang server.")]
SeedOption = Annotated[int, typer.Option(help="Seed of the in-process backend.")]

# MethodConfig knobs whose help is the same for every command (the parameter name is the field name)
MaxNewTokensOption = Annotated[int, typer.Option(help="Token budget per sample.")]
TopPOption = Annotated[float, typer.Option(help="Nucleus sampling mass.")]
ScorerOption = Annotated[
    str, typer.Option(help=f"What scores a sample: {', '.join(SCORERS)}.", metavar="NAME")
]
ConfidenceWindowOption = Annotated[
    int, typer.Option(help="confidence: tokens per sliding window of the lowest mean confidence.")
]
JudgePromptOption = Annotated[
    str, typer.Option(help="judge: the question asked after the response (P(Yes) is the score).")
]
RewardModelOption = Annotated[
    str | None,
    typer.Option(help="rm: the reward model (HF sequence-classification folder or hub name).", metavar="DIR"),
]
SelectorOption = Annotated[
    str, typer.Option(help=f"Which sample answers: {', '.join(SELECTORS)}.", metavar="NAME")
]
VoteTemperatureOption = Annotated[
    float, typer.Option(help="weighted-majority: softmax temperature of the scores.")
]

StopSequenceOption = Annotated[
    list[str] | None,
    typer.Option(
        "--stop-sequence",
        help="End each sample at this text, cut with what follows, before it is scored (repeat: up to 4). "
        "Not --stop, which names the adaptive stopping rule.",
        metavar="TEXT",
        show_default=False,
    ),
]

_FIELDS = frozenset(f.name for f in dataclasses.fields(MethodConfig))


def method_config(ctx: typer.Context) -> MethodConfig:
    """The ``MethodConfig`` of a command: every command parameter named after one of its fields (``n``,
    ``threshold``, ``scorer`` ...); the fields a command has no option for keep their defaults."""
    return MethodConfig(**{name: value for name, value in ctx.params.items() if name in _FIELDS})
