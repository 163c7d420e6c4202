"""Argument checks of :func:`explaind_tl.explain`: every argument before any work.

Wrong types raise ``TypeError``, wrong values ``ValueError``; booleans are never accepted as
numbers. :func:`check_arguments` checks what the call asks for (axes, window, metric,
components); :class:`explaind_tl.engine.options.ExplainOptions` checks how it is computed.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from typing import Any

import torch

from explaind_tl.axes import AXES
from explaind_tl.metrics import LM_METRICS, check_position
from explaind_tl.model.components import GRANULARITIES, ComponentMap
from explaind_tl.run.trajectory import Trajectory


def check_int(name: str, x: Any, minimum: int | None = None) -> int:
    """``x`` as an ``int`` (Python or NumPy/torch integer; not bool, not float)."""
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got a bool ({x!r})")
    try:
        v = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__} ({x!r})") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def check_positive(name: str, x: Any, why: str = "") -> float:
    """``x`` as a finite ``float > 0`` (any real number type but bool)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(x).__name__} ({x!r})")
    x = float(x)
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {x!r}{why}")
    return x


def check_tol(tol: Any) -> float:
    return check_positive("tol", tol, " (it bounds every step's relative residual)")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_dtype(dtype: Any) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"dtype={dtype} is not supported: the certificate needs float32 or float64 gradients "
            "(half precision leaves percent-level residuals per step)"
        )
    return dtype


def as_trajectory(trajectory: Any, trust_remote_code: bool = False):
    """A :class:`Trajectory`, loading it when given its run directory (``trust_remote_code`` as
    :meth:`Trajectory.load`)."""
    if isinstance(trajectory, (str, os.PathLike)):
        return Trajectory.load(trajectory, trust_remote_code=trust_remote_code)
    missing = [k for k in ("num_steps", "param_names", "model", "segments") if not hasattr(trajectory, k)]
    if missing:
        raise TypeError(
            f"trajectory must be a Trajectory or a run directory path, got {type(trajectory).__name__}"
        )
    return trajectory


def check_flag(name: str, flag: Any) -> bool:
    """``flag`` if it is a bool, else ``TypeError``."""
    if not isinstance(flag, bool):
        raise TypeError(f"{name} must be True or False, got {flag!r}")
    return flag


def check_by(by: Any) -> tuple[str, ...]:
    """The axes to keep, as a tuple of known, distinct axis names."""
    if isinstance(by, str):
        by = (by,)
    elif isinstance(by, (list, tuple)):
        by = tuple(by)
    else:
        raise TypeError(f"by must be an axis name or a list/tuple of them, got {type(by).__name__}")
    not_str = [d for d in by if not isinstance(d, str)]
    if not_str:
        raise TypeError(f"by entries must be axis names (str), got {not_str}")
    unknown = [d for d in by if d not in AXES]
    if unknown:
        raise ValueError(f"unknown axes {unknown}; choose from {AXES}")
    if len(set(by)) != len(by):
        raise ValueError(f"repeated axes in by={by}")
    if "train" in by and "source" in by:
        raise ValueError("by='train' already carries the source split (pseudo-entries); drop 'source'")
    if "train_position" in by and "train" not in by:
        raise ValueError("by='train_position' splits the train axis by token: keep 'train' as well")
    if "position" in by and "output" in by:
        raise ValueError("a next-token metric has one output per position: keep 'position' or 'output', not both")
    return by


def check_arguments(
    by: Any,
    metric: Any,
    components: Any,
    reduce: Any,
    steps: Any,
    step_bins: Any,
    position: Any,
    device: Any,
    progress: Any,
    strict: Any,
    resume_dir: Any,
) -> tuple[tuple[str, ...], tuple[int, int] | None, int | None, Any]:
    """Check what an explain call asks for; returns ``(by, steps, step_bins, position)`` normalized."""
    by = check_by(by)
    if not (isinstance(metric, str) or callable(metric)):
        raise TypeError(f"metric must be a metric name or a callable, got {type(metric).__name__}")
    if "position" in by and not (isinstance(metric, str) and metric in LM_METRICS):
        raise ValueError(
            f"by=(..., 'position') keeps the read positions of a next-token metric {LM_METRICS}; got metric="
            f"{metric if isinstance(metric, str) else 'a callable'} (a callable can return [Q, positions] and use 'output')"
        )
    if components is not None and not isinstance(components, (str, ComponentMap)):
        raise TypeError(
            f"components must be None, a granularity name or a ComponentMap, got {type(components).__name__}"
        )
    if isinstance(components, str) and components not in GRANULARITIES:
        raise ValueError(f"unknown component granularity {components!r}; choose from {GRANULARITIES}")
    check_choice("reduce", reduce, ("sum", "mean"))
    if steps is not None:
        if not isinstance(steps, (tuple, list)) or len(steps) != 2:
            raise TypeError(f"steps must be a pair (a, b) of ints, got {steps!r}")
        steps = (check_int("steps[0]", steps[0]), check_int("steps[1]", steps[1]))
    if step_bins is not None:
        step_bins = check_int("step_bins", step_bins, minimum=1)
        if "step" not in by:
            raise ValueError(f"step_bins={step_bins} bins the step axis, but 'step' is not in by={by}")
    position = check_position(metric, position)
    if device is not None:
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
        try:
            torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"invalid device {device!r}: {err}") from err
    check_flag("progress", progress)
    check_flag("strict", strict)
    if resume_dir is not None and not isinstance(resume_dir, (str, os.PathLike)):
        raise TypeError(f"resume_dir must be a path, got {type(resume_dir).__name__}")
    return by, steps, step_bins, position
