"""The linear datamodeling score (LDS), as pure functions of tensors.

For ``M`` random subsets of the training set (``keep [M, N]`` bool), a method's scores
``[N, Q]`` predict each subset's query outputs as the sum of the kept examples' scores; the LDS
of a query is the Spearman rank correlation, over the subsets, of the predicted with the actual
outputs of models retrained on those subsets; a method's LDS is the mean over queries, with a
bootstrap 95% interval over queries.

:func:`fit_datamodel` is the empirical ceiling of every such score: the additive model of the
outputs fitted on retrainings of *other* subsets (a linear datamodel), scored on the same
evaluation subsets. No method that predicts by summing per-example scores can be expected to
do much better where the fitted model, given many more retrainings than there are examples,
does not.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_subsets(n: int, m: int, drop_fraction: float, seed: int) -> Tensor:
    """``[m, n]`` bool: each row keeps all but ``round(drop_fraction * n)`` examples (at least
    one dropped, at least one kept), drawn uniformly with a seeded generator."""
    if not 0.0 < drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in (0, 1), got {drop_fraction}")
    k = min(n - 1, max(1, round(drop_fraction * n)))
    g = torch.Generator().manual_seed(int(seed))
    keep = torch.ones(m, n, dtype=torch.bool)
    for r in range(m):
        keep[r, torch.randperm(n, generator=g)[:k]] = False
    return keep


def predictions(scores: Tensor, keep: Tensor) -> Tensor:
    """``[M, Q]``: per subset, the sum of the kept examples' scores (``scores [N, Q]``)."""
    return keep.to(torch.float64) @ scores.to(torch.float64)


def _ranks(x: Tensor) -> Tensor:
    """Ranks along dim 0 (ties: the mean rank), float64."""
    out = torch.empty_like(x, dtype=torch.float64)
    for j in range(x.shape[1]):
        col = x[:, j].to(torch.float64)
        order = torch.argsort(col, stable=True)
        r = torch.empty_like(col)
        r[order] = torch.arange(len(col), dtype=torch.float64)
        vals, inverse = torch.unique(col, return_inverse=True)
        if len(vals) < len(col):  # average tied ranks
            sums = torch.zeros(len(vals), dtype=torch.float64).index_add_(0, inverse, r)
            counts = torch.zeros(len(vals), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
            r = (sums / counts)[inverse]
        out[:, j] = r
    return out


def spearman_per_column(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of ``a[:, j]`` with ``b[:, j]`` for every column ``j`` (``[M, Q]``);
    NaN where either column is constant."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    den = ra.norm(dim=0) * rb.norm(dim=0)
    return torch.where(den > 0, (ra * rb).sum(0) / den, torch.full_like(den, float("nan")))


def bootstrap_mean_ci(x: Tensor, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``x`` (NaNs dropped)."""
    x = x[~torch.isnan(x)].to(torch.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, len(x), (n_boot, len(x)), generator=g)
    means = x[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def lds(scores: Tensor, keep: Tensor, actual: Tensor, seed: int = 0) -> dict:
    """``{"mean", "ci95", "per_query", "n_subsets", "n_queries"}`` for one method."""
    per_q = spearman_per_column(predictions(scores, keep), actual)
    lo, hi = bootstrap_mean_ci(per_q, seed=seed)
    ok = per_q[~torch.isnan(per_q)]
    return {"mean": float(ok.mean()) if len(ok) else float("nan"), "ci95": [lo, hi],
            "per_query": per_q.tolist(), "n_subsets": int(keep.shape[0]), "n_queries": int(actual.shape[1])}


def fit_datamodel(keep: Tensor, actual: Tensor, ridge: float = 1e-2) -> Tensor:
    """``[N, Q]`` scores of a linear datamodel: per query, the ridge regression of the retrained
    outputs on the keep indicators.

    Args:
        keep: ``[M, N]`` bool, the fitting subsets (not the ones the scores are evaluated on).
        actual: ``[M, Q]`` outputs of the models retrained on them.
        ridge: the ridge penalty relative to the indicators' mean variance (examples never
            left out get a score of 0).

    Returns:
        Scores in the units of :func:`predictions`: ``keep @ scores`` predicts the outputs up to
        a constant per query, which Spearman's correlation ignores. When every subset leaves
        the same number out (:func:`random_subsets`), the scores themselves are determined only
        up to a constant per query; the ridge picks the smallest.
    """
    if keep.dim() != 2 or actual.dim() != 2 or keep.shape[0] != actual.shape[0]:
        raise ValueError(f"keep [M, N] and actual [M, Q] with the same M, got {tuple(keep.shape)} and {tuple(actual.shape)}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    X = keep.to(torch.float64)
    Xc = X - X.mean(0)
    yc = actual.to(torch.float64) - actual.to(torch.float64).mean(0)
    scale = float(Xc.pow(2).mean(0).mean()) * X.shape[0]
    A = Xc.T @ Xc + max(ridge * scale, torch.finfo(torch.float64).tiny) * torch.eye(X.shape[1], dtype=torch.float64)
    return torch.linalg.solve(A, Xc.T @ yc)
