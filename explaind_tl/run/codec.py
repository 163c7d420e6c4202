"""Pickle-free encodings: scheduler state as JSON, explain's resume snapshots as safetensors + JSON.

Nothing here unpickles: loading a run directory or a resume directory never runs code from it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from explaind_tl.errors import SchedulerStateError, TrajectoryError
from explaind_tl.run import storage
from explaind_tl.run.format import (
    EXPLAIN_STATE,
    LEGACY_EXPLAIN_STATE,
    MAX_JSON_DEPTH,
    MIGRATE_HINT,
    SCHEDULER_FORMAT,
    STATE_FORMAT,
)
from explaind_tl.run.validate import _json_loads

# ------------------------------------------------------------------------------------------
# Tagged JSON trees (scheduler state, explain snapshots)
# ------------------------------------------------------------------------------------------

_TAGS = ("__tensor__", "__tuple__", "__dict__", "__float__")


def _is_function(v: Any) -> bool:
    import types

    return isinstance(v, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.BuiltinMethodType)) or (
        type(v).__name__ == "partial" and callable(v)
    )


def encode_tree(obj: Any, tensors: dict[str, Any] | None, *, drop_functions: bool = False, at: str = "state") -> Any:
    """Encode ``obj`` as JSON-able data; tensors go to ``tensors`` (``None``: refused).

    Handles ``None``, bools, ints, floats (non-finite tagged), strings, lists, tuples
    (tagged), dicts (non-string keys tagged) and tensors (a reference into ``tensors``).

    Args:
        obj: The value.
        tensors: Receives ``{key: tensor}``; ``None`` to refuse tensors.
        drop_functions: Leave out dict entries whose value is a function (a scheduler's
            lambdas: the factory that rebuilds the scheduler supplies them again).
        at: Where ``obj`` is, for messages.

    Raises:
        SchedulerStateError: a value of another type (names where it is).
    """
    import numbers

    import torch

    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        x = float(obj)
        return x if math.isfinite(x) else {"__float__": repr(x)}
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise SchedulerStateError(f"{at} is a Tensor; explaind_tl stores scheduler state as JSON (plain numbers)")
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, drop_functions=drop_functions, at=f"{at}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, drop_functions=drop_functions, at=f"{at}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, Mapping):
        items = [(k, v) for k, v in obj.items() if not (drop_functions and _is_function(v))]
        if all(isinstance(k, str) for k, _ in items) and not (len(items) == 1 and items[0][0] in _TAGS):
            return {k: encode_tree(v, tensors, drop_functions=drop_functions, at=f"{at}[{k!r}]") for k, v in items}
        return {"__dict__": [[encode_tree(k, tensors, at=f"{at} key"), encode_tree(v, tensors, drop_functions=drop_functions, at=f"{at}[{k!r}]")]
                             for k, v in items]}
    raise SchedulerStateError(f"{at} is a {type(obj).__module__}.{type(obj).__qualname__}, which cannot be stored as JSON")


def decode_tree(obj: Any, tensors: Mapping[str, Any], depth: int = 0) -> Any:
    """Inverse of :func:`encode_tree`.

    Raises:
        TrajectoryError: an unknown tag, a missing tensor, or nesting deeper than
            :data:`MAX_JSON_DEPTH`.
    """
    if depth > MAX_JSON_DEPTH:
        raise TrajectoryError(f"stored state is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(obj, list):
        return [decode_tree(v, tensors, depth + 1) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, v), = obj.items()
        if tag == "__tensor__":
            if not isinstance(v, str) or v not in tensors:
                raise TrajectoryError(f"stored state refers to a missing tensor {v!r:.40}")
            return tensors[v]
        if tag == "__tuple__":
            if not isinstance(v, list):
                raise TrajectoryError("stored state has a malformed tuple")
            return tuple(decode_tree(x, tensors, depth + 1) for x in v)
        if tag == "__float__":
            if v not in ("nan", "inf", "-inf"):
                raise TrajectoryError(f"stored state has a malformed float {v!r:.40}")
            return float(v)
        if tag == "__dict__":
            if not isinstance(v, list) or not all(isinstance(kv, list) and len(kv) == 2 for kv in v):
                raise TrajectoryError("stored state has a malformed mapping")
            out = {}
            for k, x in v:
                k = decode_tree(k, tensors, depth + 1)
                if not isinstance(k, (str, int, float, bool, tuple)) and k is not None:
                    raise TrajectoryError("stored state has a malformed mapping key")
                out[k] = decode_tree(x, tensors, depth + 1)
            return out
    return {k: decode_tree(v, tensors, depth + 1) for k, v in obj.items()}


# ---- scheduler state


def encode_scheduler_state(state: Mapping[str, Any]) -> str:
    """A scheduler's ``state_dict()`` as JSON text (format version 2 checkpoints).

    Entries whose value is a function (``LambdaLR``-style lambdas, which torch itself leaves
    out) are dropped: the ``scheduler_factory`` given to ``resume`` supplies them again.

    Raises:
        SchedulerStateError: another value is not JSON-able (a Tensor, an object); the message
            names it and says what to do.
    """
    try:
        tree = encode_tree(dict(state), None, drop_functions=True, at="scheduler.state_dict()")
    except SchedulerStateError as exc:
        raise SchedulerStateError(
            f"cannot record the lr scheduler: {exc}. explaind_tl stores scheduler state as JSON, never as a pickle "
            "(loading a run must not run code); use a scheduler whose state_dict() holds numbers, strings and "
            "lists (all of torch.optim.lr_scheduler's do, with float learning rates)"
        ) from None
    return json.dumps({"format": SCHEDULER_FORMAT, "version": 1, "state": tree}, allow_nan=False)


def _is_legacy_scheduler_text(text: str) -> bool:
    return not text.lstrip().startswith("{")


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, (list, tuple)):
        return "list"
    return type(v).__name__


def decode_scheduler_state(text: Any, like: Mapping[str, Any] | None = None, *, where: str = "the checkpoint") -> dict[str, Any]:
    """Parse :func:`encode_scheduler_state` output, checked against ``like``.

    Args:
        text: The checkpoint's ``scheduler`` metadata.
        like: The ``state_dict()`` of the scheduler about to load it (its keys and value
            kinds bound what the stored state may set); ``None`` skips this check.
        where: For messages.

    Raises:
        TrajectoryError: ``text`` is a version-1 pickle (never loaded: points at the
            migration), malformed, or sets keys / kinds of values ``like`` does not have.
    """
    if not isinstance(text, str):
        raise TrajectoryError(f"the scheduler state in {where} is malformed")
    if _is_legacy_scheduler_text(text):
        raise TrajectoryError(
            f"the scheduler state in {where} is a pickle (written by explaind_tl before format version 2), which "
            f"can run arbitrary code when loaded, so it is not loaded; "
            + MIGRATE_HINT.format(path=where if where != "the checkpoint" else "RUN_DIR")
        )
    doc = _json_loads(text, f"the scheduler state in {where}")
    if not isinstance(doc, dict) or doc.get("format") != SCHEDULER_FORMAT or not isinstance(doc.get("state"), dict):
        raise TrajectoryError(f"the scheduler state in {where} is malformed")
    state = decode_tree(doc["state"], {})
    if not isinstance(state, dict):
        raise TrajectoryError(f"the scheduler state in {where} is malformed")
    if like is not None:
        unknown = [k for k in state if k not in like]
        if unknown:
            raise TrajectoryError(
                f"the scheduler state in {where} sets {unknown[:5]}, which the scheduler of scheduler_factory does not "
                "have: a different scheduler class, or a tampered checkpoint"
            )
        for k, v in state.items():
            want = like[k]
            if want is not None and v is not None and _kind(v) != _kind(want):
                raise TrajectoryError(
                    f"the scheduler state in {where} has a {_kind(v)} for {k!r}, the scheduler of scheduler_factory a {_kind(want)}"
                )
    return state


# ---- explain snapshots


def save_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Atomically write ``state`` (nested dicts/lists of tensors and numbers) as safetensors + JSON.

    Tensors go into the safetensors body, the structure into its metadata (key ``tree``) and
    the devices of tensors not on the CPU into key ``devices`` (:func:`load_state` puts them
    back, as ``torch.load`` did).
    """
    tensors: dict[str, Any] = {}
    tree = encode_tree(dict(state), tensors)
    devices = {k: str(t.device) for k, t in tensors.items() if t.device.type != "cpu"}
    meta = {"format": STATE_FORMAT, "version": "1", "tree": json.dumps(tree, allow_nan=False), "devices": json.dumps(devices)}
    storage.save_tensors(path, tensors, meta)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read :func:`save_state` output (no pickle).

    Raises:
        TrajectoryError: not such a file, truncated or malformed.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors raises its own error types
        raise TrajectoryError(f"cannot read the saved state {path} (truncated or corrupted?): {exc}") from exc
    if meta.get("format") != STATE_FORMAT or "tree" not in meta:
        raise TrajectoryError(f"{path} is not an explaind_tl state file")
    devices = _json_loads(meta.get("devices", "{}"), str(path))
    if not isinstance(devices, dict):
        raise TrajectoryError(f"{path}: malformed devices")
    for k, dev in devices.items():
        if k not in tensors or not isinstance(dev, str) or not _DEVICE.fullmatch(dev):
            raise TrajectoryError(f"{path}: malformed device {dev!r:.40} for {k!r:.40}")
        if dev.startswith("cuda") and _cuda_has(dev):
            tensors[k] = tensors[k].to(dev)
    state = decode_tree(_json_loads(meta["tree"], str(path)), tensors)
    if not isinstance(state, dict):
        raise TrajectoryError(f"{path} is not an explaind_tl state file")
    return state


_DEVICE = re.compile(r"cpu|cuda(:\d{1,3})?")


def _cuda_has(dev: str) -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    index = int(dev.partition(":")[2] or 0)
    return index < torch.cuda.device_count()


def check_legacy_explain_state(resume_dir: str | os.PathLike) -> None:
    """Refuse a resume directory that holds only an old pickled ``explain_state.pt``.

    Raises:
        TrajectoryError: pointing at :func:`migrate_explain_state` (or deleting the file).
    """
    resume_dir = Path(resume_dir)
    legacy = resume_dir / LEGACY_EXPLAIN_STATE
    if (legacy.exists() or legacy.is_symlink()) and not (resume_dir / EXPLAIN_STATE).exists():
        raise TrajectoryError(
            f"{legacy} holds partial results in the old pickle format, which can run arbitrary code when loaded, so it "
            f"is not loaded: delete it to start over or, if you wrote it yourself, "
            f"convert it with `python -m explaind_tl.run.migrate {resume_dir}`"
        )


