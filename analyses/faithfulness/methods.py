"""Training-example scores ``[N_train, Q]`` of the methods the harness compares.

* ``explaind_tl``: the train axis of :func:`explaind_tl.explain` (each example's exact share of
  ``q(w_T) - q(w_0)``, seen clock), float64;
* ``tracin``: ``Σ_s -lr_s <∇q(w_s), ∇ℓ_i(w_s)>`` over the steps whose batch held example ``i``
  (Pruthi et al. 2020, every step, no optimizer preconditioning);
* ``grad_dot``: ``-<∇q(w_T), ∇ℓ_i(w_T)>`` at the final parameters;
* ``metagradient``: ``∂q(w_T) / ∂ε_i`` through every recorded step (:func:`explaind_tl.metagradient`,
  reverse mode through the optimizer), float64.

A score predicts how much keeping the example adds to the query's output, so every method's
prediction for a subset is the sum of its kept examples' scores.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

METHODS = ("explaind_tl", "tracin", "grad_dot", "metagradient")


def explaind_scores(traj: Any, queries: dict, metric: Any, position: Any = None, progress: bool = False) -> Tensor:
    from explaind_tl import explain

    attr = explain(traj, queries, metric=metric, position=position, by=("train", "query"), dtype=torch.float64,
                   progress=progress)
    ids = [t for t in attr.coords["train"] if isinstance(t, int)]
    return attr.sel(train=ids).values.to(torch.float64)  # [N, Q]


def metagradient_scores(traj: Any, queries: dict, metric: Any, position: Any = None, progress: bool = False) -> Tensor:
    from explaind_tl import metagradient

    return metagradient(traj, queries, metric=metric, position=position, progress=progress).values  # [N, Q]


def _functions(traj: Any, metric: Any, position: Any):
    from explaind_tl.metrics import resolve_metric
    from explaind_tl.model.functional import QueryFunction
    from explaind_tl.model.training_loss import LossFunction

    fn, _ = resolve_metric(metric, position)
    model = traj.model(0)
    qf = QueryFunction(model, list(traj.param_names), fn, dtype=torch.float64, device="cpu")
    lf = LossFunction(model, traj.loss_fn, torch.float64, "cpu")
    return qf, lf


def _dots(qf: Any, lf: Any, params: dict, queries: dict, batch: dict, budget: int = 1 << 25) -> Tensor:
    """``[Q, B]``: ``<∇q_j(w), ∇ℓ_i(w)>``, from per-example gradients in chunks of at most
    ``budget`` numbers (measured on the induction model: 7x faster than one forward-mode pass
    per query)."""
    p = {k: v.to(torch.float64) for k, v in params.items()}
    g = qf.per_query_grad(p, queries, resolve_outputs=False)  # [Q, 1, *shape]
    n_params = sum(v[0, 0].numel() for v in g.values())
    n = len(next(iter(batch.values())))
    step = max(1, budget // n_params)
    out = []
    for i in range(0, n, step):
        pe = lf.per_example_grad(p, {k: v[i: i + step] for k, v in batch.items()})  # [b, *shape]
        out.append(sum(g[k][:, 0].flatten(1).to(torch.float64) @ pe[k].flatten(1).to(torch.float64).T for k in g))
    return torch.cat(out, dim=1)


def tracin_scores(traj: Any, queries: dict, metric: Any, position: Any = None) -> Tensor:
    qf, lf = _functions(traj, metric, position)
    out = torch.zeros(traj.num_train, len(next(iter(queries.values()))), dtype=torch.float64)
    for seg in traj.segments(0, traj.num_steps):
        for rec in seg:
            ids = rec.batch_ids
            d = _dots(qf, lf, rec.params, queries, traj.batch(ids))  # [Q, B]
            out.index_add_(0, ids, -rec.lr * d.T)
    return out


def grad_dot_scores(traj: Any, queries: dict, metric: Any, position: Any = None, chunk: int = 512) -> Tensor:
    qf, lf = _functions(traj, metric, position)
    w = traj.params_at(traj.num_steps)
    ids = torch.arange(traj.num_train)
    return torch.cat([-_dots(qf, lf, w, queries, traj.batch(ids[i: i + chunk])).T
                      for i in range(0, traj.num_train, chunk)])


def scores(method: str, traj: Any, queries: dict, metric: Any, position: Any = None) -> Tensor:
    if method == "explaind_tl":
        return explaind_scores(traj, queries, metric, position)
    if method == "tracin":
        return tracin_scores(traj, queries, metric, position)
    if method == "grad_dot":
        return grad_dot_scores(traj, queries, metric, position)
    if method == "metagradient":
        return metagradient_scores(traj, queries, metric, position)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
