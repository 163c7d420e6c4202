"""A convenience training loop on top of the recorder (docs/design.md §5).

:func:`train` records ``steps`` optimizer steps (full batch or seeded shuffled minibatches from
:func:`batch_schedule`), calls a callback every few steps (its results go to the progress bar and
``metrics.csv``), may stop early (``stop_when``), and returns the :class:`Trajectory`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from explaind_tl.run import storage
from explaind_tl.run.atomic import is_plateau
from explaind_tl.run.format import METRICS
from explaind_tl.run.recorder import TrajectoryRecorder
from explaind_tl.run.step import LossFn
from explaind_tl.run.trajectory import Trajectory


def batch_schedule(num_train: int, steps: int, batch_size: int | None, shuffle: bool = True, seed: int = 0) -> list[Tensor | None]:
    """Batch ids for ``steps`` steps: ``None`` (full batch) or reproducible minibatches.

    Minibatches walk through seeded random permutations (one per epoch, from a
    ``torch.Generator`` seeded with ``seed``); the last partial batch of an epoch is dropped
    unless the epoch has only one batch.
    """
    if batch_size is None or batch_size >= num_train and not shuffle:
        return [None] * steps
    batch_size = min(int(batch_size), num_train)
    gen = torch.Generator().manual_seed(int(seed))
    out: list[Tensor | None] = []
    per_epoch = max(1, num_train // batch_size)
    while len(out) < steps:
        perm = torch.randperm(num_train, generator=gen) if shuffle else torch.arange(num_train)
        for b in range(per_epoch):
            if len(out) >= steps:
                break
            out.append(perm[b * batch_size : (b + 1) * batch_size].clone())
    return out


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: Any,
    loss_fn: LossFn,
    steps: int,
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    run_dir: str | os.PathLike = "runs/run",
    checkpoint_every: int = 100,
    scheduler: Any = None,
    clip_grad_norm: float | None = None,
    callback: Callable[[int, nn.Module], Mapping[str, float] | None] | None = None,
    callback_every: int = 100,
    progress: bool = True,
    model_factory: Callable[[], nn.Module] | None = None,
    overwrite: bool = False,
    num_threads: int | None = 1,
    scheduler_metric: str | Callable[[int, nn.Module], float] = "loss",
    stop_when: Callable[[int, nn.Module], bool] | None = None,
) -> Trajectory:
    """Train ``model`` for ``steps`` recorded steps and return the :class:`Trajectory`.

    Args:
        model: Model to train (in place).
        optimizer: Supported optimizer over its trainable parameters.
        train_data: Training set (see :func:`explaind_tl.run.data.prepare_train_data`).
        loss_fn: Per-example loss function.
        steps: Number of optimizer steps.
        batch_size: ``None`` for full-batch training, else minibatch size.
        shuffle: Shuffle minibatches (seeded, reproducible).
        seed: Seed of the minibatch generator.
        run_dir: Where to record.
        checkpoint_every: Checkpoint interval ``K``.
        scheduler: Optional lr scheduler (stepped every step; ``ReduceLROnPlateau`` gets
            ``scheduler_metric``).
        clip_grad_norm: Optional global-norm clipping.
        callback: ``callback(step, model) -> dict | None`` called after steps
            ``callback_every, 2*callback_every, ...`` and the last (``step`` = number of
            steps done); returned dicts are shown in the progress bar and saved to
            ``run_dir/metrics.csv`` (also available as ``trajectory.metrics``).
        callback_every: Interval of ``callback`` calls.
        progress: Show a tqdm progress bar.
        model_factory: For non-HookedTransformer models.
        overwrite: Replace a recorded run in ``run_dir`` (only its files; see
            :class:`TrajectoryRecorder`).
        num_threads: CPU threads of each recorded step (see :class:`TrajectoryRecorder`).
        scheduler_metric: For ``ReduceLROnPlateau`` only: ``"loss"`` (each step's batch loss,
            the default) or ``metric(step, model) -> float`` called before each step (``step`` =
            steps done; e.g. a validation loss).
        stop_when: ``stop_when(step, model) -> bool`` called after every step (after the
            callback; ``step`` = steps done): True ends training there, before ``steps``, and
            ``callback`` is called for that last step if it was not already.
    """
    from tqdm.auto import tqdm

    rec = TrajectoryRecorder(
        model,
        optimizer,
        run_dir,
        train_data,
        loss_fn,
        checkpoint_every=checkpoint_every,
        scheduler=scheduler,
        clip_grad_norm=clip_grad_norm,
        model_factory=model_factory,
        overwrite=overwrite,
        num_threads=num_threads,
    )
    schedule = batch_schedule(rec.num_train, steps, batch_size, shuffle, seed)
    metrics: list[dict[str, Any]] = []
    bar = tqdm(total=steps, disable=not progress, desc="train")
    postfix: dict[str, Any] = {}
    plateau = is_plateau(scheduler)

    def report(done: int, loss: float) -> None:
        result = _in_mode(model, callback, done, model)
        if result:
            metrics.append({"step": done, "loss": loss, **dict(result)})
            postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in result.items()})

    try:
        for s in range(steps):
            metric = None
            if plateau:
                metric = _in_mode(model, scheduler_metric, s, model) if callable(scheduler_metric) else scheduler_metric
            loss = rec.step(schedule[s], scheduler_metric=metric)
            postfix["loss"] = f"{loss:.4g}"
            done = s + 1
            due = done % callback_every == 0 or done == steps
            if callback is not None and due:
                report(done, loss)
            stop = stop_when is not None and bool(_in_mode(model, stop_when, done, model))
            if stop and callback is not None and not due:
                report(done, loss)
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if stop:
                break
        if metrics:  # written while the run is still locked
            import pandas as pd

            with storage.atomic_path(Path(run_dir) / METRICS) as tmp:
                pd.DataFrame(metrics).to_csv(tmp, index=False)
        rec.close()
    except BaseException:
        rec.abort()  # valid up to its last checkpoint, unlocked (resume continues it)
        raise
    finally:
        bar.close()
    traj = rec.trajectory()
    traj.metrics = metrics
    return traj


def _in_mode(model: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, then put ``model`` back in the train/eval mode it had before."""
    was_training = model.training
    try:
        return fn(*args)
    finally:
        model.train(was_training)
