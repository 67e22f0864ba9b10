"""``sgl-adaptive finetune data|train|eval``."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Build self-evaluation data, train the self-evaluator, evaluate it.", no_args_is_help=True
)
