"""Counterfactual retraining: the recorded run again, without some training examples.

:func:`retrain` starts from the run's initialisation and repeats every recorded step with the
same optimizer, hyper-parameters, clipping, CPU threads and deterministic mode, through the
step replay itself uses (:meth:`~explaind_tl.Trajectory.train_step_at`), on the recorded batch
*minus* the examples left out. With every example kept it reproduces the recorded run bit for
bit (tested). It is what data-attribution scores are judged against (the linear datamodeling
score of ``analyses/faithfulness``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

Params = dict[str, Tensor]


def retrain(trajectory: Any, keep: Tensor | None = None, stop: int | None = None, weights: Tensor | None = None) -> Params:
    """The parameters after retraining steps ``0 .. stop-1`` on the kept examples.

    Args:
        trajectory: a recorded :class:`~explaind_tl.Trajectory`.
        keep: ``[N_train]`` bool, the examples to keep (default: all). Each step trains on its
            recorded batch restricted to them (the mean over the kept rows); a step whose whole
            batch was left out changes nothing (no update, optimizer state untouched).
        stop: the number of steps (default: the whole run).
        weights: ``[N_train]`` float, a weight on each example's loss (default: 1): each step
            trains on the mean over its (kept) rows of ``weights[i] * loss_i``, what
            :func:`explaind_tl.metagradient` differentiates with respect to.

    Returns:
        ``{name: w}`` of the trainable parameters (clones, on the trajectory's replay device).

    Raises:
        ValueError: ``keep`` is not a ``[N_train]`` bool tensor, ``weights`` not a ``[N_train]``
            floating tensor, or ``stop`` is outside the run.
    """
    n, T = trajectory.num_train, trajectory.num_steps
    if keep is not None and (not isinstance(keep, Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (n,)):
        raise ValueError(f"keep must be a bool tensor of shape [{n}] (one entry per training example)")
    if weights is not None and (not isinstance(weights, Tensor) or not weights.is_floating_point() or tuple(weights.shape) != (n,)):
        raise ValueError(f"weights must be a floating tensor of shape [{n}] (one entry per training example)")
    stop = T if stop is None else int(stop)
    if not 0 <= stop <= T:
        raise ValueError(f"stop must be in [0, {T}], got {stop}")
    model, opt, params = trajectory.fresh_training()
    for s in range(stop):
        ids = trajectory.batch_ids(s)
        if keep is not None:
            ids = ids[keep[ids]]
            if len(ids) == 0:
                continue
        batch = {k: v.to(trajectory.device) for k, v in trajectory.batch(ids).items()}
        loss_fn = None
        if weights is not None:
            w_b = weights[ids].to(trajectory.device)

            def loss_fn(model, batch, w_b=w_b):
                losses = trajectory.loss_fn(model, batch)
                return losses * w_b.to(losses.dtype)
        trajectory.train_step_at(s, model, opt, params, batch, loss_fn=loss_fn)
    return {k: p.detach().clone() for k, p in zip(trajectory.param_names, params)}
