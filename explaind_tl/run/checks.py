"""Checking the data files of a run directory: checkpoints, step records, the training set.

Every failure (also the parsers' own exceptions on garbage) is a
:class:`~explaind_tl.errors.TrajectoryError`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from explaind_tl.errors import ExplaindError, TrajectoryError
from explaind_tl.run.validate import ARROW_FILE, OPTIMIZER_STATE_KEYS, _json_loads, read_json_file

# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------


def _scalar_or_list(v: Any) -> bool:
    if isinstance(v, list):
        return len(v) <= 64 and all(type(x) in (int, float, bool) or x is None for x in v)
    return type(v) in (int, float, bool, str) or v is None


GROUP_NUMBERS = {"lr", "eps", "weight_decay", "momentum", "dampening", "initial_lr", "max_lr", "min_lr",
                 "base_momentum", "max_momentum"}
GROUP_FLAGS = {"amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "nesterov",
               "decoupled_weight_decay"}


def _check_group(group: Any) -> str | None:
    """Why ``group`` is not a param group's hyper-parameters, or ``None``."""
    if not isinstance(group, dict):
        return "not an object"
    for k, v in group.items():
        if k == "params" or not _scalar_or_list(v):
            return f"{k!r} is not a hyper-parameter"
        if k in GROUP_NUMBERS and not (type(v) in (int, float) and math.isfinite(v) and v >= 0):
            return f"{k!r} must be a finite number >= 0"
        if k == "betas" and not (isinstance(v, list) and len(v) == 2 and all(type(b) in (int, float) and 0 <= b < 1 for b in v)):
            return "'betas' must be two numbers in [0, 1)"
        if k in GROUP_FLAGS and v is not None and type(v) is not bool:
            return f"{k!r} must be true, false or null"
    return None


@contextlib.contextmanager
def as_trajectory_error(what: str, active: bool = True) -> Iterator[None]:
    """Turn any non-explaind_tl exception of the block into a ``TrajectoryError`` (chained).

    For code that runs on a run directory's data and can fail in many ways on hostile values:
    building a model from the recorded config (TransformerLens raises ``ValueError``,
    ``KeyError``, ``AssertionError``...), replaying a step on recorded data (token ids out of
    the vocabulary raise ``IndexError``).

    Args:
        what: Message prefix (``": <type>: <message>"`` follows).
        active: ``False`` passes everything through (e.g. a user's ``model_factory``: its errors
            are the caller's own).
    """
    if not active:
        yield
        return
    try:
        yield
    except ExplaindError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise TrajectoryError(f"{what}: {type(exc).__name__}: {str(exc)[:300]}") from exc


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a checkpoint: ``{"step": str, "group": dict, "scheduler": str, ...}``.

    ``group`` (the param group's hyper-parameters) is parsed and checked (an object of
    numbers, booleans, strings, ``null`` and short lists of numbers; no ``params``; ``lr``,
    ``eps``, ``weight_decay``... finite and >= 0, ``betas`` two numbers in ``[0, 1)``);
    ``scheduler`` is left as text for :func:`decode_scheduler_state`.

    Raises:
        TrajectoryError: unreadable file or malformed metadata.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise TrajectoryError(f"cannot read the metadata of {path} (truncated or corrupted?): {exc}") from exc
    if "group" in meta:
        group = _json_loads(meta["group"], f"the param-group metadata of {path}")
        why = _check_group(group)
        if why is not None:
            raise TrajectoryError(f"{path}: malformed param-group metadata: {why} (damaged or tampered)")
        meta["group"] = group
    return meta


def check_checkpoint(tensors: Mapping[str, Any], manifest: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Check a loaded checkpoint's tensors against the (validated) manifest.

    ``param/<name>`` for every trainable parameter, with the recorded shape and dtype;
    ``optim/<key>/<name>`` only for the optimizer's state keys and trainable parameters
    (``step``: one number; others: the parameter's shape and dtype), complete or absent per
    parameter; ``frozen/<name>`` for frozen parameters, ``buffer/<name>`` for recorded
    buffers; ``rng/torch`` a torch CPU RNG state. Nothing else.

    Raises:
        TrajectoryError: naming the first bad tensor.
    """
    import torch

    names = list(manifest["param_names"])
    shapes = manifest.get("param_shapes") or {}
    dtypes = manifest.get("param_dtypes") or {}
    frozen = set(manifest.get("frozen_names") or [])
    buffers = manifest.get("buffer_names")
    opt = manifest["optimizer"]
    keys = OPTIMIZER_STATE_KEYS[opt["kind"]] if opt["kind"] != "sgd" or opt.get("momentum") else ()
    trainable = set(names)

    def bad(key: str, why: str) -> TrajectoryError:
        return TrajectoryError(f"checkpoint {path} is malformed: {key} {why} (damaged or tampered)")

    def like_param(key: str, t: Any, n: str) -> None:
        if n in shapes and list(t.shape) != list(shapes[n]):
            raise bad(key, f"has shape {list(t.shape)}, the parameter {list(shapes[n])}")
        if n in dtypes and str(t.dtype) != dtypes[n]:
            raise bad(key, f"has dtype {t.dtype}, the parameter {dtypes[n]}")

    state: dict[str, set[str]] = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise bad(key, "is not a tensor")
        kind, _, rest = key.partition("/")
        if kind == "param":
            if rest not in trainable:
                raise bad(key, "is not a trainable parameter of the manifest")
            like_param(key, t, rest)
        elif kind == "optim":
            skey, _, n = rest.partition("/")
            if skey not in keys or n not in trainable:
                raise bad(key, f"is not optimizer state of this run ({opt['kind']}: {list(keys)})")
            if skey == "step":
                if t.numel() != 1 or not t.dtype.is_floating_point:
                    raise bad(key, "must be one floating-point number")
            else:
                like_param(key, t, n)
            state.setdefault(n, set()).add(skey)
        elif kind == "frozen":
            if rest not in frozen:
                raise bad(key, "is not a frozen parameter of the manifest")
            like_param(key, t, rest)
        elif kind == "buffer":
            if buffers is not None and rest not in buffers:
                raise bad(key, "is not a buffer of the manifest")
        elif key == "rng/torch":
            if t.dtype != torch.uint8 or tuple(t.shape) != tuple(torch.get_rng_state().shape):
                raise bad(key, "is not a torch CPU RNG state")
        else:
            raise bad(key, "is not a checkpoint entry")
    missing = [n for n in names if f"param/{n}" not in tensors]
    if missing:
        raise bad(f"param/{missing[0]}", "is missing")
    for n, have in state.items():
        if have != set(keys):
            raise bad(f"optim/*/{n}", f"is incomplete ({sorted(have)} of {list(keys)})")


def check_buffers(tensors: Mapping[str, Any], model_buffers: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Check checkpoint 0's ``buffer/<name>`` tensors against the rebuilt model's buffers.

    Raises:
        TrajectoryError: a buffer the model lacks, or of another shape or dtype.
    """
    for key, t in tensors.items():
        kind, _, n = key.partition("/")
        if kind != "buffer" or n not in model_buffers:
            continue
        b = model_buffers[n]
        if tuple(t.shape) != tuple(b.shape) or t.dtype != b.dtype:
            raise TrajectoryError(
                f"checkpoint {path} is malformed: {key} has shape {list(t.shape)} and dtype {t.dtype}, the model's "
                f"buffer {list(b.shape)} and {b.dtype} (damaged or tampered)"
            )


# ------------------------------------------------------------------------------------------
# Step records
# ------------------------------------------------------------------------------------------


def check_records(table: Mapping[str, list], start: int, stop: int, num_train: int, hp_columns: Iterable[str],
                  path: str | os.PathLike) -> None:
    """Check the columns of one segment's step records (``pyarrow`` table as ``to_pydict()``).

    ``step`` is exactly ``start..stop-1``; ``lr``, ``loss``, the hyper-parameter columns that
    are present are finite numbers, ``clip_factor`` is in ``(0, 1]``; ``batch_ids`` is null
    (full batch) or a non-empty list of ids in ``[0, num_train)``.

    Raises:
        TrajectoryError: naming the column.
    """
    def bad(col: str, why: str) -> TrajectoryError:
        return TrajectoryError(f"step records {path} are malformed: {col} {why} (damaged or tampered)")

    if not isinstance(table, Mapping):
        raise bad("the table", "is not a table")
    n = stop - start
    for col in ("step", "lr", "clip_factor", "loss", "batch_ids", *[c for c in hp_columns if c in table]):
        v = table.get(col)
        if not isinstance(v, list) or len(v) != n:
            raise bad(f"column {col!r}", f"must have {n} rows, has {len(v) if isinstance(v, list) else 'none'}")
    if table["step"] != list(range(start, stop)):
        raise bad("column 'step'", f"must be the steps {start}..{stop - 1} in order")
    for col in ("lr", "loss", *[c for c in hp_columns if c in table]):
        if not all(type(x) in (int, float) and math.isfinite(x) for x in table[col]):
            raise bad(f"column {col!r}", "must hold finite numbers")
    if not all(type(x) in (int, float) and 0.0 < x <= 1.0 for x in table["clip_factor"]):
        raise bad("column 'clip_factor'", "must hold numbers in (0, 1]")
    for ids in table["batch_ids"]:
        if ids is None:
            continue
        if not isinstance(ids, list) or not ids or not all(type(i) is int and 0 <= i < num_train for i in ids):
            raise bad("column 'batch_ids'", f"must hold null or non-empty lists of ids in [0, {num_train})")


# ------------------------------------------------------------------------------------------
# Training data
# ------------------------------------------------------------------------------------------

_ALLOWED_FEATURES = ("Value", "ClassLabel", "List", "LargeList", "Sequence", "Array2D", "Array3D", "Array4D", "Array5D")


def _check_features(features: Any, where: str) -> None:
    import datasets

    allowed = tuple(c for c in (getattr(datasets, n, None) for n in _ALLOWED_FEATURES) if isinstance(c, type))
    stack = [features]
    while stack:
        f = stack.pop()
        if isinstance(f, dict):
            stack.extend(f.values())
        elif isinstance(f, (list, tuple)):
            stack.extend(f)
        elif isinstance(f, allowed):
            inner = getattr(f, "feature", None)
            if inner is not None:
                stack.append(inner)
        else:
            raise TrajectoryError(
                f"the training data in {where} has a {type(f).__name__} column; only numeric columns are read "
                "(Image/Audio/... columns would open files or URLs named by the data)"
            )


def _check_regular_columns(table: Any, where: str) -> None:
    """Every column numeric, without nulls, and lists of one length per level (one tensor each)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def check(arrays: list, name: str, depth: int = 0) -> None:
        if depth > 8:
            raise TrajectoryError(f"the training data in {where}: column {name!r} is nested too deeply")
        arrays = [a.storage if isinstance(a.type, pa.ExtensionType) else a for a in arrays]
        if not arrays:
            return
        t = arrays[0].type
        if any(a.null_count for a in arrays):
            raise TrajectoryError(f"the training data in {where}: column {name!r} has missing values")
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            return
        if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
            if not pa.types.is_fixed_size_list(t):
                lengths = set()
                for a in arrays:
                    if len(a):
                        mm = pc.min_max(pc.list_value_length(a)).as_py()
                        lengths.update((mm["min"], mm["max"]))
                if len(lengths) > 1:
                    raise TrajectoryError(f"the training data in {where}: column {name!r} is ragged (lists of different lengths)")
            check([a.flatten() for a in arrays], name, depth + 1)
            return
        raise TrajectoryError(f"the training data in {where}: column {name!r} has type {t}, not numbers")

    for name in table.column_names:
        check(list(table.column(name).chunks), name)


def load_train_data(data_dir: str | os.PathLike, files: Mapping[str, str]) -> Any:
    """Load the training set saved in ``data_dir`` (torch format) after checking the directory.

    The manifest must list ``state.json``, ``dataset_info.json`` and the Arrow files, all
    regular files (their paths were checked by :func:`validate_manifest`); ``state.json`` may
    only name listed Arrow files (``datasets`` would open any path it names); the features may
    only be numeric (``Value``, lists, arrays, ``ClassLabel``: ``Image``/``Audio`` columns open
    files or URLs named by the data) and every column must convert to one tensor. Other files
    in the directory (the user's) are never read. ``datasets`` errors become
    :class:`TrajectoryError`.

    Args:
        data_dir: The run's ``train_data`` directory (already resolved inside the run dir).
        files: The manifest's ``train_data.files`` (``{name: sha256}``).

    Raises:
        TrajectoryError: a missing file, a bad ``state.json``, a non-numeric or ragged column,
            or data ``datasets`` cannot read.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TrajectoryError(f"the training data {data_dir} is not a directory")
    present = set()
    for rel in files:
        p = data_dir / rel
        if not p.is_file():
            raise TrajectoryError(f"run directory is missing file {p}")
        present.add(rel)
    for name in ("state.json", "dataset_info.json"):
        if name not in present:
            raise TrajectoryError(f"the manifest's train_data.files does not list {name}")
    state = read_json_file(data_dir / "state.json", "dataset state")
    read_json_file(data_dir / "dataset_info.json", "dataset info")
    data_files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(data_files, list) or not data_files or not all(
        isinstance(e, dict) and isinstance(e.get("filename"), str) and ARROW_FILE.fullmatch(e["filename"]) and e["filename"] in present
        for e in data_files
    ) or len({e["filename"] for e in data_files}) != len(data_files):
        raise TrajectoryError(f"{data_dir / 'state.json'}: _data_files must list the directory's Arrow files by name")
    if not (
        (state.get("_format_type") is None or isinstance(state.get("_format_type"), str))
        and isinstance(state.get("_format_kwargs", {}), dict)
        and (state.get("_format_columns") is None or isinstance(state.get("_format_columns"), list))
    ):
        raise TrajectoryError(f"{data_dir / 'state.json'}: malformed format fields")
    import datasets

    try:
        ds = datasets.load_from_disk(str(data_dir))
        if not isinstance(ds, datasets.Dataset):
            raise TypeError(f"a {type(ds).__name__}, not a Dataset")
        _check_features(ds.features, str(data_dir))
        _check_regular_columns(ds.data.table if hasattr(ds.data, "table") else ds.data, str(data_dir))
        return ds.with_format("torch")
    except TrajectoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many types on bad data
        raise TrajectoryError(f"cannot load the training data at {data_dir}: {type(exc).__name__}: {str(exc)[:300]}") from exc


