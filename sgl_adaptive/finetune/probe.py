"""A logistic-regression probe over cached hidden states, and its out-of-fold scores grouped by prompt.

The probe minimises mean binary cross-entropy (hard 0/1 or soft targets in [0, 1]) + ``l2 / 2 * |w|^2`` on
features standardised with the training part's mean and standard deviation (the bias is not penalised),
by L-BFGS with a strong-Wolfe line search in float32. ``Probe.direction`` and ``Probe.bias`` undo the
standardisation: ``sigmoid(x @ direction + bias)`` on raw features is the prediction, so the probe can be
folded into a model's output-head rows (e.g. the "No" row minus the "Yes" row).

``oof_probe_scores`` gives every example a score from a probe that never saw its prompt; each outer
fold's ``l2`` is chosen by an inner grouped cross-validation on that fold's training prompts only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sgl_adaptive.finetune.evaluate import prompt_aurocs
from sgl_adaptive.finetune.folds import fold_indices
from sgl_adaptive.finetune.metrics import auroc

DEFAULT_L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Penalties tried by default (on standardised features, with the mean loss)."""
MIN_WITHIN_PROMPTS = 10
"""Below this many prompts with both labels, the inner choice falls back to the pooled AUROC."""


@dataclass(frozen=True)
class Probe:
    """A fitted probe: weights in the standardised space and the standardisation that goes with them."""

    weight: np.ndarray
    """[d] weights on standardised features."""
    offset: float
    """The bias on standardised features."""
    mean: np.ndarray
    scale: np.ndarray
    l2: float
    iterations: int
    grad_max: float
    """Largest absolute gradient entry of the objective at the solution (convergence check)."""

    @property
    def direction(self) -> np.ndarray:
        """[d] weights on raw (unstandardised) features."""
        return self.weight / self.scale

    @property
    def bias(self) -> float:
        """The bias on raw features."""
        return float(self.offset - self.direction.astype(np.float64) @ self.mean.astype(np.float64))

    def logits(self, X: Any) -> np.ndarray:
        """Log-odds of each row of ``X`` (raw features)."""
        z = (_as_tensor(X) - _t(self.mean)) / _t(self.scale)
        return (z @ _t(self.weight) + self.offset).numpy().astype(np.float64)

    def predict(self, X: Any) -> np.ndarray:
        """P(target = 1) of each row of ``X`` (raw features)."""
        return 1.0 / (1.0 + np.exp(-self.logits(X)))


def _t(a: np.ndarray) -> Any:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _as_tensor(X: Any) -> Any:
    """[n, d] float32 CPU tensor of a numpy array (any float dtype, bf16 included) or a torch tensor."""
    if isinstance(X, torch.Tensor):
        t = X.detach().to("cpu", torch.float32)
    else:
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(X).astype(np.float32, copy=False)))
    if t.ndim != 2:
        raise ValueError(f"features must be [n, d] (got shape {tuple(t.shape)})")
    return t


def _targets(y: Any, n: int) -> np.ndarray:
    y = np.asarray(y.float().numpy() if hasattr(y, "float") else y, dtype=np.float64).reshape(-1)
    if len(y) != n:
        raise ValueError(f"{n} feature rows but {len(y)} targets")
    if not np.all((y >= 0) & (y <= 1)):
        raise ValueError("targets must lie in [0, 1]")
    return y


@contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _objective(z: Any, target: Any, w: Any, b: Any, l2: float) -> Any:
    """Mean binary cross-entropy of ``sigmoid(z @ w + b)`` against ``target``, plus ``l2 / 2 * |w|^2``."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target)
    return loss + 0.5 * l2 * (w @ w)


def _fit_path(
    X: Any, y: Any, l2s: Sequence[float], *, max_iter: int = 500, tol: float = 1e-5
) -> dict[float, Probe]:
    """Probes for each penalty on the same training rows, fitted from the largest penalty down, each
    warm-started from the previous solution.

    Hidden states are strongly correlated, which makes plain L-BFGS crawl at small penalties. So the
    standardised features are rotated onto the eigenvectors of their covariance (eigenvalues lam), and
    L-BFGS runs on v with w = V (c * v), c = (lam / 4 + l2)^-1/2: the inverse square root of an upper
    bound of the objective's Hessian, which makes the problem well conditioned. The objective and its
    solution are unchanged."""
    x = _as_tensor(X)
    n, d = x.shape
    target = torch.from_numpy(_targets(y, n).astype(np.float32))
    if n == 0:
        raise ValueError("no training rows")
    if any(not math.isfinite(l2) or l2 < 0 for l2 in l2s):
        raise ValueError(f"penalties must be finite and >= 0 (got {list(l2s)})")
    mean = x.double().mean(0)
    std = x.double().std(0, unbiased=False)
    scale = torch.where(std > 1e-12, std, torch.ones_like(std))
    z = ((x - mean.float()) / scale.float()).contiguous()
    with _one_thread():  # multi-threaded eigh of a [d, d] matrix crawls on a shared CPU
        lam, rot = torch.linalg.eigh((z.T @ z).double() / n)
    lam = lam.clamp(min=0)
    rot32 = rot.float()
    rotated = (z @ rot32).contiguous()
    floor = 1e-6 * float(lam.max()) + 1e-12
    p0 = float(target.mean().clamp(1e-6, 1 - 1e-6))
    u = torch.zeros(d, dtype=torch.float64)  # the weights in the rotated basis
    b = math.log(p0 / (1 - p0))
    out: dict[float, Probe] = {}
    for l2 in sorted(set(l2s), reverse=True):
        c = (lam / 4 + l2 + floor).rsqrt()
        params = torch.cat([(u / c).float(), torch.tensor([b])]).requires_grad_(True)
        c32 = c.float()
        opt = torch.optim.LBFGS(
            [params],
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=tol,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure(params: Any = params, c32: Any = c32, l2: float = l2) -> Any:
            params.grad = None
            loss = _objective(rotated, target, c32 * params[:d], params[d], l2)
            loss.backward()
            return loss

        opt.step(closure)
        iterations = int(opt.state[params].get("n_iter", 0))
        params = params.detach()
        u, b = c * params[:d].double(), float(params[d])
        w = (rot32 @ u.float()).requires_grad_(True)
        bias = torch.tensor(b, requires_grad=True)
        _objective(z, target, w, bias, l2).backward()
        grad_max = max(float(w.grad.abs().max()), float(bias.grad.abs()))
        out[l2] = Probe(
            weight=w.detach().numpy().copy(),
            offset=b,
            mean=mean.float().numpy(),
            scale=scale.float().numpy(),
            l2=l2,
            iterations=iterations,
            grad_max=grad_max,
        )
    return out


def fit_probe(X: Any, y: Any, l2: float, *, max_iter: int = 500, tol: float = 1e-5) -> Probe:
    """Fit a probe of targets ``y`` (0/1 or soft in [0, 1]) on features ``X`` [n, d] with penalty ``l2``;
    L-BFGS runs until the largest gradient entry is below ``tol`` (or ``max_iter`` iterations)."""
    return _fit_path(X, y, [l2], max_iter=max_iter, tol=tol)[l2]


def selection_auroc(
    scores: Sequence[float],
    labels: Sequence[bool],
    prompt_ids: Sequence[str],
    min_prompts: int = MIN_WITHIN_PROMPTS,
) -> float:
    """The mean within-prompt AUROC (what selection needs), or the pooled AUROC when fewer than
    ``min_prompts`` prompts have both labels."""
    groups = prompt_groups(prompt_ids)
    within = prompt_aurocs(scores, labels, groups)
    if len(within) >= min_prompts:
        return float(np.mean(within))
    return auroc(scores, labels)


def prompt_groups(prompt_ids: Sequence[str]) -> list[np.ndarray]:
    """Row indices of each prompt, prompts in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompt_ids):
        groups.setdefault(p, []).append(i)
    return [np.array(g) for g in groups.values()]


def _labels(y: np.ndarray, labels: Any) -> np.ndarray:
    return y >= 0.5 if labels is None else np.asarray(labels, dtype=bool).reshape(-1)


def choose_l2(
    X: Any,
    y: Any,
    prompt_ids: Sequence[str],
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    *,
    folds: int = 5,
    seed: int = 0,
    labels: Any = None,
    min_prompts: int = MIN_WITHIN_PROMPTS,
) -> tuple[float, dict[float, float]]:
    """The penalty of ``l2_grid`` whose grouped out-of-fold scores on these rows rank best
    (``selection_auroc`` against ``labels``, default ``y >= 0.5``; ties to the larger penalty), and
    every penalty's figure. Only the rows given are read: pass a training part only. With a single
    prompt there is nothing to cross-validate: the middle of the grid, and nan figures."""
    x = _as_tensor(X)
    y = _targets(y, x.shape[0])
    kept = _labels(y, labels)
    ids = list(prompt_ids)
    folds = min(folds, len(set(ids)))
    if folds < 2:  # one training prompt: nothing to choose on, the middle of the grid
        middle = sorted(l2_grid)[len(l2_grid) // 2]
        return middle, dict.fromkeys(l2_grid, math.nan)
    inner = {l2: np.full(len(ids), np.nan) for l2 in l2_grid}
    for train, test in fold_indices(ids, folds, seed):
        for l2, probe in _fit_path(x[train], y[train], l2_grid).items():
            inner[l2][test] = probe.predict(x[test])
    figures = {l2: selection_auroc(inner[l2], kept, ids, min_prompts) for l2 in l2_grid}
    best = max(sorted(l2_grid, reverse=True), key=lambda l2: _finite(figures[l2]))
    return best, figures


def _finite(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def oof_probe_scores(
    X: Any,
    y: Any,
    prompt_ids: Sequence[str],
    folds: int = 5,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    seed: int = 0,
    *,
    labels: Any = None,
    inner_folds: int | None = None,
    min_prompts: int = MIN_WITHIN_PROMPTS,
) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold probe scores (P(target = 1)) of every row, folds grouped by prompt (``split_folds``),
    and the penalty chosen for each outer fold by ``choose_l2`` on that fold's training rows only
    (``inner_folds`` folds, default ``folds``, seeded ``seed + 1``). With soft targets, pass the hard
    ``labels`` the choice is measured against (e.g. ``label == "No"``)."""
    x = _as_tensor(X)
    y = _targets(y, x.shape[0])
    kept = _labels(y, labels)
    ids = list(prompt_ids)
    if len(ids) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {len(ids)} prompt ids")
    scores = np.full(len(ids), np.nan)
    chosen: list[float] = []
    for train, test in fold_indices(ids, folds, seed):
        l2, _ = choose_l2(
            x[train],
            y[train],
            [ids[i] for i in train],
            l2_grid,
            folds=inner_folds or folds,
            seed=seed + 1,
            labels=kept[train],
            min_prompts=min_prompts,
        )
        chosen.append(l2)
        scores[test] = fit_probe(x[train], y[train], l2).predict(x[test])
    return scores, chosen
