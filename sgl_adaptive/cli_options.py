"""Command-line options shared by several commands (``run``, ``serve``, ``bench``)."""

from __future__ import annotations

from typing import Annotated

import typer

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
