"""sgl-adaptive: adaptive Best-of-N with capability-aware self-evaluation, as SGLang programs.

from sgl_adaptive import LocalBackend, SGLangEndpoint, read_prompt, run
backend = LocalBackend.from_pretrained("path/to/model")      # or SGLangEndpoint("http://127.0.0.1:30000")
result = run("What is 17 * 23?", backend, method="adaptive", n=8, threshold=0.9)  # or read_prompt("q.txt")
print(result.answer, result.summary())

Importing the package is cheap: the backends (torch, transformers, sglang) load on first use.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from sgl_adaptive.config import METHODS, MethodConfig
from sgl_adaptive.costs import Costs
from sgl_adaptive.errors import UserError
from sgl_adaptive.result import Candidate, Result
from sgl_adaptive.runner import load_backend, read_prompt, run
from sgl_adaptive.selfeval import DEFAULT_EVAL_PROMPT, SelfEvalConfig

if TYPE_CHECKING:
    from sgl_adaptive.backends.endpoint import SGLangEndpoint
    from sgl_adaptive.backends.local import LocalBackend

try:
    __version__ = version("sgl-adaptive")
    """The installed distribution's version: pyproject.toml's ``version`` is its only source."""
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_EVAL_PROMPT",
    "METHODS",
    "Candidate",
    "Costs",
    "LocalBackend",
    "MethodConfig",
    "Result",
    "SGLangEndpoint",
    "SelfEvalConfig",
    "UserError",
    "load_backend",
    "read_prompt",
    "run",
]


def __getattr__(name: str) -> Any:
    """Backends import torch/sglang: load them on first use."""
    if name == "LocalBackend":
        from sgl_adaptive.backends.local import LocalBackend

        return LocalBackend
    if name == "SGLangEndpoint":
        from sgl_adaptive.backends.endpoint import SGLangEndpoint

        return SGLangEndpoint
    raise AttributeError(name)
