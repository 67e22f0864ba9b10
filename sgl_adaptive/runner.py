"""Run a method on a prompt with any backend: the Python API behind ``sgl-adaptive run``."""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.errors import ProgramError, UserError
from sgl_adaptive.result import Result

# The interpreter reports an exception in a fork's thread only as a warning with a traceback;
# the programs check every fork themselves and raise the error, so the warning is noise.
warnings.filterwarnings("ignore", message=r"Error in stream_executor", category=UserWarning)


def run(
    prompt: str,
    backend: Any,
    method: str = "adaptive",
    config: MethodConfig | None = None,
    **overrides: Any,
) -> Result:
    """Answer ``prompt`` with ``method`` on ``backend`` (a ``LocalBackend``, an ``SGLangEndpoint`` or
    any SGLang frontend backend). ``overrides`` replace fields of ``config`` (e.g. ``n=8``)."""
    from sgl_adaptive.programs import PROGRAMS

    config = dataclasses.replace(config or MethodConfig(), **overrides)
    config.check_for(method)
    return run_program(PROGRAMS[method], prompt, backend, config, name=method)


def run_program(
    program: Any, prompt: str, backend: Any, config: MethodConfig, name: str, **program_args: Any
) -> Result:
    """Run any of our ``@sgl.function`` programs (e.g. ``sample_pool``) and build its ``Result``:
    errors of the program or of any fork are raised, wall time and FLOPs are added."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("the prompt is empty")
    if config.seed is not None and hasattr(backend, "reseed"):
        backend.reseed(config.seed)
    start = time.perf_counter()
    state = program.run(prompt=prompt, config=config, backend=backend, **program_args)
    wall = time.perf_counter() - start
    error = state.error()
    if error is not None:
        if isinstance(error, UserError):
            raise error
        raise ProgramError(f"{name} failed: {type(error).__name__}: {error}") from error
    outcome = state.ret_value
    costs = outcome.meter.totals(getattr(backend, "model_shape", None), wall_s=wall)
    return Result(name, outcome.candidates, outcome.best, costs, config.to_dict())


def load_backend(
    model: str | None = None,
    endpoint: str | None = None,
    *,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    console: Any = None,
    **kwargs: Any,
) -> Any:
    """An SGLang server backend for ``endpoint``, else an in-process backend for ``model`` (a directory,
    a GGUF file, a hub name, or None for the embedded default model) on ``device`` in ``dtype``."""
    if model and endpoint:
        raise UserError("give either --model or --endpoint, not both")
    if endpoint:
        from sgl_adaptive.backends.endpoint import SGLangEndpoint

        return SGLangEndpoint(endpoint, **kwargs)
    from sgl_adaptive.backends.local import LocalBackend
    from sgl_adaptive.backends.precision import parse_dtype
    from sgl_adaptive.model_store import resolve_model

    try:
        torch_dtype = parse_dtype(dtype)  # before a possibly long model download
    except ValueError as exc:
        raise UserError(str(exc)) from None
    path = resolve_model(model, console=console)
    return LocalBackend.from_pretrained(path, device=device, dtype=torch_dtype, seed=seed, **kwargs)
