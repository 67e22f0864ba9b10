"""The SGLang programs, one per method, all returning a ``ProgramOutcome``.

Installed as ``sgl_adaptive.programs`` (the repository keeps them in the top-level ``programs/``).
"""

from sgl_adaptive.programs.adaptive_pruning import adaptive_pruning
from sgl_adaptive.programs.adaptive_sampling import adaptive_sampling
from sgl_adaptive.programs.best_of_n import best_of_n
from sgl_adaptive.programs.common import ProgramOutcome
from sgl_adaptive.programs.early_pruning import early_pruning
from sgl_adaptive.programs.greedy import greedy
from sgl_adaptive.programs.pool import sample_pool

PROGRAMS = {
    "greedy": greedy,
    "best-of-n": best_of_n,
    "adaptive": adaptive_sampling,
    "prune": early_pruning,
    "adaptive-prune": adaptive_pruning,
}

__all__ = [
    "PROGRAMS",
    "ProgramOutcome",
    "adaptive_pruning",
    "adaptive_sampling",
    "best_of_n",
    "early_pruning",
    "greedy",
    "sample_pool",
]
