"""Stored import paths: aliases, resolution, and which ones are imported without consent.

Run directories record callables by import path (docs/design.md §5). :func:`resolve_import_path`
is the one place that turns a path back into an object; paths of objects that have moved since
a run was recorded are translated by :data:`IMPORT_ALIASES`. A manifest names its loss function and model factory as ``"module:qualname"``. Only
explaind_tl's built-in ones (:func:`is_builtin_import_path`) are imported automatically;
anything else needs the callable passed in (``loss_fn=``, ``model_factory=``) or
``trust_remote_code=True`` (:func:`resolve_recorded_callable`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

from explaind_tl.errors import TrajectoryError, UntrustedCodeError

# ------------------------------------------------------------------------------------------
# The trust rule
# ------------------------------------------------------------------------------------------

BUILTIN_MODULES: tuple[str, ...] = ("explaind_tl.losses",)
"""Modules whose public functions (defined in the module itself) are built-in callables."""
BUILTIN_CALLABLES: frozenset[str] = frozenset()
"""Further built-in callables, one ``"module:qualname"`` each."""

# Stored import paths of objects that have moved: old "module:qualname" (or old module, for
# every name in it) -> new. Runs keep the paths they were recorded with.
IMPORT_ALIASES: dict[str, str] = {
    # names that left their module for another one than the module's successor below
    "explaind_tl.tasks:last_token_cross_entropy": "explaind_tl.losses:last_token_cross_entropy",
    "explaind_tl.recorder:train": "explaind_tl.run.training:train",
    "explaind_tl.recorder:batch_schedule": "explaind_tl.run.training:batch_schedule",
    "explaind_tl.recorder:train_step": "explaind_tl.run.step:train_step",
    "explaind_tl.recorder:RecordingError": "explaind_tl.errors:RecordingError",
    # modules that moved (every other name in them)
    "explaind_tl.tasks": "analyses.grokking.task",
    "explaind_tl.cli": "analyses.cli",
    "explaind_tl.models": "explaind_tl.model.spec",
    "explaind_tl.functional": "explaind_tl.model.functional",
    "explaind_tl.readout": "explaind_tl.model.readout",
    "explaind_tl.components": "explaind_tl.model.components",
    "explaind_tl.storage": "explaind_tl.run.storage",
    "explaind_tl.trajectory": "explaind_tl.run.trajectory",
    "explaind_tl.recorder": "explaind_tl.run.recorder",
    "explaind_tl.engine": "explaind_tl.engine.api",
}


def import_path(obj: Any) -> str | None:
    """``"module:qualname"`` if ``obj`` is importable under that name (not a lambda/local)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    try:
        resolved = resolve_import_path(f"{module}:{qualname}")
    except Exception:
        return None
    return f"{module}:{qualname}" if resolved is obj else None


def aliased_import_path(path: str) -> str:
    """``path`` translated by :data:`IMPORT_ALIASES` (unchanged when nothing applies)."""
    if path in IMPORT_ALIASES:
        return IMPORT_ALIASES[path]
    module, sep, qualname = path.partition(":")
    if module in IMPORT_ALIASES:
        return f"{IMPORT_ALIASES[module]}{sep}{qualname}"
    return path


def resolve_import_path(path: str) -> Any:
    """Import ``"module:qualname"`` (moved objects are found under their new path).

    The one function that turns a stored import path into an object: recording
    (:func:`import_path`), loading and resuming runs all go through it.

    Raises:
        TrajectoryError: malformed, or not importable.
    """
    module, _, qualname = path.partition(":")
    if not module or not qualname:
        raise TrajectoryError(f"malformed import path {path!r} (expected 'module:qualname')")
    module, _, qualname = aliased_import_path(path).partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise TrajectoryError(f"cannot import {path!r}: {exc}") from exc
    return obj




def _split_import_path(path: str) -> tuple[str, str]:
    module, sep, qualname = path.partition(":")
    if not sep or not module or not qualname:
        raise TrajectoryError(f"malformed import path {path!r} (expected 'module:qualname')")
    if not all(p.isidentifier() for p in module.split(".")) or not all(p.isidentifier() for p in qualname.split(".")):
        raise TrajectoryError(f"malformed import path {path!r} (expected 'module:qualname' of Python identifiers)")
    return module, qualname


def _walk(obj: Any, qualname: str) -> Any:
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _builtin_target(path: Any) -> str | None:
    """The current path of a built-in callable recorded as ``path``, or ``None``."""
    if not isinstance(path, str):
        return None
    path = aliased_import_path(path)  # runs keep the names their built-ins had when recorded
    if path in BUILTIN_CALLABLES:
        return path
    module, sep, qualname = path.partition(":")
    if not sep or module not in BUILTIN_MODULES:
        return None
    if not all(p.isidentifier() and not p.startswith("_") for p in qualname.split(".")):
        return None
    return path


def is_builtin_import_path(path: Any) -> bool:
    """Whether ``path`` (``"module:qualname"``) names one of explaind_tl's built-in callables.

    Built-in (after :data:`IMPORT_ALIASES`): listed in :data:`BUILTIN_CALLABLES`, or a public
    callable defined in one of :data:`BUILTIN_MODULES` (its ``__module__`` and
    ``__qualname__`` are the path's: ``explaind_tl.losses:torch.load`` is not built-in). Only
    explaind_tl's own modules are imported to decide.

    Args:
        path: A recorded import path (any type; non-strings are not built-in).
    """
    target = _builtin_target(path)
    if target is None:
        return False
    try:
        module, qualname = _split_import_path(target)
        obj = _walk(importlib.import_module(module), qualname)
    except (ImportError, AttributeError, TrajectoryError):
        return False
    return callable(obj) and getattr(obj, "__module__", None) == module and getattr(obj, "__qualname__", None) == qualname


def resolve_recorded_callable(
    path: Any,
    *,
    what: str,
    arg: str,
    run_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> Callable[..., Any]:
    """Import the callable a manifest names, if it is built-in or the user consented.

    Args:
        path: The recorded ``"module:qualname"`` (``None``: it was not importable).
        what: What it is, for messages (``"loss function"``, ``"model factory"``).
        arg: The argument that passes it instead (``"loss_fn"``, ``"model_factory"``).
        run_dir: The run directory, for messages.
        trust_remote_code: Import any path (the user trusts the directory).

    Raises:
        UntrustedCodeError: ``path`` is not built-in and ``trust_remote_code`` is False.
        TrajectoryError: ``path`` is missing, malformed or cannot be imported.
    """
    where = f" of {run_dir}" if run_dir is not None else ""
    if path is None:
        raise TrajectoryError(
            f"the {what}{where} was not importable when recorded (lambda, local or __main__ function): "
            f"pass {arg}=... to Trajectory.load / TrajectoryRecorder.resume"
        )
    if not isinstance(path, str):
        raise TrajectoryError(f"the recorded {what}{where} must be an import path string, got {type(path).__name__}")
    target = _builtin_target(path)
    if target is not None and is_builtin_import_path(path):
        module, qualname = _split_import_path(target)
        return _walk(importlib.import_module(module), qualname)
    _split_import_path(path)
    module, qualname = _split_import_path(aliased_import_path(path))
    if not trust_remote_code:
        raise UntrustedCodeError(
            f"the manifest{where} names the {what} {path!r}, which is not one of explaind_tl's built-in ones; "
            f"importing and calling it would run code chosen by the run directory. Pass the callable itself "
            f"({arg}=...) or, if you trust this run directory, trust_remote_code=True"
        )
    try:
        obj = _walk(importlib.import_module(module), qualname)
    except (ImportError, AttributeError) as exc:
        raise TrajectoryError(f"cannot import the {what} {path!r}{where}: {exc}; pass {arg}=...") from exc
    except Exception as exc:  # noqa: BLE001 - the user consented to run it; report what failed
        raise TrajectoryError(f"importing the {what} {path!r}{where} failed: {type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise TrajectoryError(f"the {what} {path!r}{where} is not callable")
    return obj


