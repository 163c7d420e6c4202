"""The atomic step: what the recorder checks before a step and how it undoes one after it.

A recorded step is either fully recorded, or the model, the optimizer and the scheduler are as
before it and the error says why (docs/design.md §5). Bad input and settings that cannot
change mid-run are refused before the step (:func:`check_scheduler_metric`,
:func:`check_optimizer`); a failure after ``optimizer.step()`` restores the :func:`snapshot`
taken just before it (:func:`restore`) and raises :func:`step_error`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor

from explaind_tl.errors import (
    ExplaindError,
    RecordingError,
    StorageError,
    UnsupportedOptimizerError,
)
from explaind_tl.optim import fixed_settings, step_hparams


def is_plateau(scheduler: Any) -> bool:
    """Whether ``scheduler`` is a ``ReduceLROnPlateau`` (its ``step()`` needs a metric)."""
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def check_scheduler_metric(scheduler: Any, metric: Any, s: int) -> float | str | None:
    """Validate ``scheduler_metric`` before step ``s``; ``"loss"``, a float, or ``None``."""
    plateau = is_plateau(scheduler)
    if metric is None:
        if plateau:
            raise RecordingError(
                f"the scheduler is ReduceLROnPlateau, whose step() needs a metric: call "
                f"rec.step(ids, scheduler_metric=<validation loss>) or scheduler_metric='loss' (this "
                f"batch's loss); step {s} was not taken"
            )
        return None
    if not plateau:
        raise RecordingError(
            f"scheduler_metric is only for a ReduceLROnPlateau scheduler (this recorder's is "
            f"{type(scheduler).__name__ if scheduler is not None else 'None'}); step {s} was not taken"
        )
    if isinstance(metric, str):
        if metric != "loss":
            raise RecordingError(f"scheduler_metric must be a number or 'loss', got {metric!r}; step {s} was not taken")
        return metric
    if isinstance(metric, Tensor):
        if metric.numel() != 1:
            raise RecordingError(f"scheduler_metric must be one number, got a tensor of shape {tuple(metric.shape)}; step {s} was not taken")
        metric = metric.item()
    if isinstance(metric, bool) or not isinstance(metric, (int, float)) and not hasattr(metric, "__float__"):
        raise RecordingError(f"scheduler_metric must be a number or 'loss', got {type(metric).__name__}; step {s} was not taken")
    value = float(metric)
    if not math.isfinite(value):
        raise RecordingError(f"scheduler_metric is not finite ({value}); step {s} was not taken")
    return value

def check_optimizer(
    optimizer: torch.optim.Optimizer, kind: str, fixed: dict[str, Any], param_names: list[str], params: list[Tensor], s: int
) -> dict[str, float]:
    """Refuse settings that changed in a way replay cannot follow; the step's hyper-parameters.

    ``fixed`` is :func:`explaind_tl.optim.fixed_settings` of the optimizer when recording began.
    """
    now = fixed_settings(optimizer)
    if now != fixed:
        for key in list(fixed) + [k for k in now if k not in fixed]:
            was, new = fixed.get(key, "<unset>"), now.get(key, "<unset>")
            if was != new:
                what = (
                    "the optimizer's param groups changed (parameters added, removed or replaced)"
                    if key == "parameters of the param group"
                    else f"the optimizer's {key} changed from {was!r} to {new!r}"
                )
                raise RecordingError(
                    f"{what} before step {s}: it fixes the form of the update and cannot change during a "
                    f"recorded run (step {s} was not taken; nothing changed). Between steps only lr, "
                    "betas, eps, weight_decay (Adam/AdamW) and lr, momentum, dampening, weight_decay "
                    "(SGD) may change; start a new run for anything else"
                )
    frozen = [n for n, p in zip(param_names, params) if not p.requires_grad]
    if frozen:
        raise RecordingError(
            f"parameters {frozen[:5]} were frozen (requires_grad=False) during the run; the set of trained "
            f"parameters cannot change (step {s} was not taken)"
        )
    try:
        return step_hparams(optimizer, kind)
    except UnsupportedOptimizerError as exc:
        raise RecordingError(f"before step {s}: {exc} (step {s} was not taken; nothing changed)") from exc


def snapshot(params: list[Tensor], opt: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Parameters, optimizer state and hyper-parameters, scheduler state (just before the step)."""
    state = {}
    for i, p in enumerate(params):
        st = opt.state.get(p)
        if st:
            state[i] = {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in st.items()}
    return {
        "params": [p.detach().clone() for p in params],
        "state": state,
        "group": {k: v for k, v in opt.param_groups[0].items() if k != "params"},
        "scheduler": copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
    }


def restore(snap: dict[str, Any], params: list[Tensor], opt: torch.optim.Optimizer, scheduler: Any) -> None:
    """Put parameters, optimizer state and hyper-parameters and scheduler back as in ``snap``."""
    with torch.no_grad():
        for p, w in zip(params, snap["params"]):
            p.copy_(w)
            p.grad = None
    for i, p in enumerate(params):
        if i in snap["state"]:
            opt.state[p] = snap["state"][i]
        else:
            opt.state.pop(p, None)
    group = opt.param_groups[0]
    for k in [k for k in group if k != "params" and k not in snap["group"]]:
        del group[k]
    group.update(snap["group"])
    if scheduler is not None:
        scheduler.load_state_dict(snap["scheduler"])


def step_error(exc: Exception, s: int, phase: str, last_checkpoint: int) -> Exception:
    """The error a step raises after it was undone: the cause, and that nothing was recorded."""
    undone = (
        f"; step {s} was not recorded: the model, optimizer and scheduler were restored to before it "
        f"(fix the cause and call step() again, or continue later with TrajectoryRecorder.resume(run_dir))"
    )
    if isinstance(exc, StorageError):
        return StorageError(exc.message + undone, exc.errno, exc.filename)
    if isinstance(exc, ExplaindError):
        try:
            return type(exc)(f"{exc}{undone}")
        except TypeError:
            pass
    return RecordingError(
        f"{phase} failed at step {s} ({type(exc).__name__}: {exc}); the run is valid up to step "
        f"{last_checkpoint}{undone}"
    )
