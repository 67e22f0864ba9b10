"""``sgl-adaptive bench``."""

from __future__ import annotations

import typer

app = typer.Typer(help="Benchmark methods: quality against compute.", no_args_is_help=True)
