"""Reading run directories safely: data never runs code, paths stay inside, fields are checked.

Run directories get shared (a colleague's run, a paper's artifact, a download). Everything in
this module treats their content as hostile data:

* **No pickle.** Scheduler state is JSON (:func:`encode_scheduler_state`), explain's resume
  snapshots are safetensors + JSON (:func:`save_state`). Nothing here, or in the loaders that
  call it, unpickles; the one ``torch.load`` (in :func:`migrate_run_dir`, for the user's own
  old directories) uses ``weights_only=True``.
* **Code only by consent.** A manifest names its loss function and model factory as
  ``"module:qualname"``. Only explaind_tl's built-in ones (:func:`is_builtin_import_path`) are
  imported automatically; anything else needs the callable passed in (``loss_fn=``,
  ``model_factory=``) or ``trust_remote_code=True`` (:func:`resolve_recorded_callable`). The
  same holds for a ``HookedTransformerConfig`` that names a tokenizer (building it would fetch
  the tokenizer, and run its code when the config says ``trust_remote_code``).
* **Paths stay inside.** Every file a manifest names is a relative path of plain names that
  resolves (symlinks followed) inside the run directory (:func:`resolve_inside`).
* **Fields are checked before use.** :func:`validate_manifest` checks every manifest field's
  type and range, and bounds declared sizes and counts by the bytes actually on disk, before
  anything proportional to them is allocated; :func:`check_checkpoint`, :func:`check_records`
  and :func:`load_train_data` check the data files' content. Every failure is a
  :class:`~explaind_tl.errors.TrajectoryError` (or :class:`~explaind_tl.errors.ChecksumError`).

Old run directories (format version 1, whose checkpoints carry the scheduler state as a
pickle) and old ``explain_state.pt`` snapshots are converted once, explicitly, by the user, on
directories they trust: ``python -m explaind_tl.safe_format migrate PATH [PATH ...]`` or
:func:`migrate_run_dir` / :func:`migrate_explain_state`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explaind_tl import storage
from explaind_tl.errors import ExplaindError, TrajectoryError

FORMAT = "explaind_tl.trajectory"
FORMAT_VERSION = 2
"""Version written by this explaind_tl. 2: scheduler state as JSON (1: as a base64 pickle)."""
READABLE_FORMAT_VERSIONS = (1, 2)
"""Versions :func:`validate_manifest` accepts (version 1 loads; resuming one with a scheduler
needs :func:`migrate_run_dir`)."""
MANIFEST = "manifest.json"
EXPLAIN_STATE = "explain_state.safetensors"
LEGACY_EXPLAIN_STATE = "explain_state.pt"
MIGRATION_JOURNAL = "migration.json"

MAX_MANIFEST_BYTES = 64 << 20
MAX_SMALL_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 64
MAX_THREADS = 1024
MAX_DIM = 1 << 40
ROWS_PER_RECORD_BYTE = 16
"""A segment of ``n`` steps needs a parquet file of at least ``n / 16`` bytes (a recorded one
holds a distinct int64 step per row: ~8 bytes before compression)."""

SCHEDULER_FORMAT = "explaind_tl.scheduler_state"
STATE_FORMAT = "explaind_tl.explain_state"

MIGRATE_HINT = (
    "if you trust this directory, convert it once with `python -m explaind_tl.safe_format migrate {path}` "
    "(or explaind_tl.safe_format.migrate_run_dir); it never runs code either, but only migrate what you trust"
)

# ------------------------------------------------------------------------------------------
# The trust rule
# ------------------------------------------------------------------------------------------

BUILTIN_MODULES: tuple[str, ...] = ("explaind_tl.losses",)
"""Modules whose public functions (defined in the module itself) are built-in callables."""
BUILTIN_CALLABLES: frozenset[str] = frozenset({"explaind_tl.tasks:last_token_cross_entropy"})
"""Further built-in callables, one ``"module:qualname"`` each."""
BUILTIN_ALIASES: dict[str, str] = {}
"""``{recorded path: current path}`` for built-ins that moved (runs keep their recorded
names). A target is trusted because it is written here, in explaind_tl."""


class UntrustedCodeError(TrajectoryError):
    """A run directory names code (a callable, a tokenizer) that is not explaind_tl's own.

    Pass the callable itself (``loss_fn=``, ``model_factory=``) or ``trust_remote_code=True``
    if you trust the directory.
    """


class SchedulerStateError(ExplaindError, ValueError):
    """A scheduler's ``state_dict()`` holds something that cannot be stored as JSON."""


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
    if path in BUILTIN_ALIASES:
        return BUILTIN_ALIASES[path]
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

    Built-in: listed in :data:`BUILTIN_CALLABLES` or :data:`BUILTIN_ALIASES`, or a public
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
    module, qualname = _split_import_path(path)
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


# ------------------------------------------------------------------------------------------
# The path rule
# ------------------------------------------------------------------------------------------

_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")


def check_relative_path(rel: Any, what: str) -> str:
    """``rel`` if it is a relative POSIX path of plain names, else :class:`TrajectoryError`.

    Plain names: letters, digits, ``._-``, not starting with a dot (no ``..``, no hidden
    files), at most 255 characters; no absolute paths, backslashes, drive letters or URLs.
    """
    if not isinstance(rel, str) or not rel:
        raise TrajectoryError(f"{what} must be a relative path (a non-empty string), got {rel!r:.100}")
    parts = rel.split("/")
    if len(parts) > 16 or not all(_PART.fullmatch(p) for p in parts):
        raise TrajectoryError(
            f"{what} is {rel!r:.200}: files named by a manifest must be relative paths of plain names inside the "
            "run directory (no absolute paths, '..', hidden names or special characters)"
        )
    return rel


def resolve_inside(root: str | os.PathLike, rel: Any, what: str) -> Path:
    """``root / rel``, checked to resolve inside ``root`` (symlinks followed).

    Args:
        root: The run directory (itself may be a symlink).
        rel: The path the manifest names.
        what: Its description, for messages.

    Raises:
        TrajectoryError: ``rel`` is not a plain relative path (:func:`check_relative_path`)
            or resolves outside ``root`` (a symlink pointing out).
    """
    check_relative_path(rel, what)
    root = Path(root)
    try:
        real_root = root.resolve()
        target = (real_root / rel).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise TrajectoryError(f"{what} {rel!r} cannot be resolved inside {root}: {exc}") from exc
    if target != real_root and real_root not in target.parents:
        raise TrajectoryError(
            f"{what} {rel!r} resolves to {target}, outside the run directory {root} (a symlink pointing out): "
            "every file of a run directory must be inside it"
        )
    return root / rel


# ------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------


def _json_loads(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:  # JSONDecodeError, huge ints, nesting
        raise TrajectoryError(f"malformed JSON in {what}: {str(exc)[:200]}") from None


def read_json_file(path: str | os.PathLike, what: str, max_bytes: int = MAX_SMALL_JSON_BYTES) -> Any:
    """Parse a JSON file that must be a regular file of at most ``max_bytes``.

    Raises:
        TrajectoryError: missing, not a regular file, too large, or malformed.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise TrajectoryError(f"missing file {path}") from None
    if not path.is_file():
        raise TrajectoryError(f"{path} is not a regular file")
    if st.st_size > max_bytes:
        raise TrajectoryError(f"{what} {path} is {st.st_size} bytes, more than the {max_bytes} a {what} may have")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise TrajectoryError(f"cannot read {path}: {exc}") from exc
    if len(data) > max_bytes:
        raise TrajectoryError(f"{what} {path} is larger than the {max_bytes} bytes a {what} may have")
    return _json_loads(data, str(path))


def _depth(obj: Any, limit: int) -> int:
    stack = [(obj, 1)]
    deepest = 0
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


# ------------------------------------------------------------------------------------------
# Manifest validation
# ------------------------------------------------------------------------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}")
DTYPE_SIZES = {
    "torch.float64": 8, "torch.float32": 4, "torch.float16": 2, "torch.bfloat16": 2,
    "torch.complex128": 16, "torch.complex64": 8, "torch.int64": 8, "torch.int32": 4,
    "torch.int16": 2, "torch.int8": 1, "torch.uint8": 1, "torch.bool": 1,
}  # fmt: skip
OPTIMIZER_FIELDS = {"kind", "lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov"}
OPTIMIZER_STATE_KEYS = {"adamw": ("step", "exp_avg", "exp_avg_sq"), "adam": ("step", "exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}
DATASET_FILE = re.compile(r"data-\d{5}-of-\d{5}\.arrow|dataset_info\.json|state\.json")
ARROW_FILE = re.compile(r"data-\d{5}-of-\d{5}\.arrow")


class _Fields:
    """Typed access to a manifest's fields; every failure is a :class:`TrajectoryError`."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, name: str, want: str, got: Any) -> TrajectoryError:
        shown = repr(got)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return TrajectoryError(f"{self.where}: field {name!r} must be {want}, got {shown} (a damaged or tampered run directory)")

    def int(self, d: Mapping, key: str, name: str, lo: int = 0, hi: int = 1 << 62, optional: bool = False) -> int | None:
        if optional and d.get(key) is None:
            return None
        v = d.get(key)
        if type(v) is not int or not lo <= v <= hi:
            raise self.fail(name, f"an integer in [{lo}, {hi}]", v)
        return v

    def num(self, d: Mapping, key: str, name: str, lo: float = -math.inf, hi: float = math.inf, optional: bool = False,
            lo_open: bool = False) -> float | None:
        if optional and d.get(key) is None:
            return None
        v = d.get(key)
        ok = type(v) in (int, float) and math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi
        if not ok:
            raise self.fail(name, f"a finite number in {'(' if lo_open else '['}{lo}, {hi}]", v)
        return float(v)

    def bool(self, d: Mapping, key: str, name: str, optional: bool = True) -> bool | None:
        if optional and key not in d:
            return None
        v = d.get(key)
        if type(v) is not bool:
            raise self.fail(name, "true or false", v)
        return v

    def str(self, d: Mapping, key: str, name: str, optional: bool = False) -> str | None:
        v = d.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, str) or len(v) > 4096:
            raise self.fail(name, "a string", v)
        return v

    def dict(self, d: Mapping, key: str, name: str, optional: bool = False) -> dict | None:
        v = d.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, dict):
            raise self.fail(name, "an object", v)
        return v

    def list(self, d: Mapping, key: str, name: str, optional: bool = False) -> list | None:
        v = d.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, list):
            raise self.fail(name, "a list", v)
        return v

    def names(self, d: Mapping, key: str, name: str, optional: bool = False) -> list[str] | None:
        v = self.list(d, key, name, optional)
        if v is None:
            return None
        if not all(isinstance(x, str) and 0 < len(x) <= 1024 for x in v) or len(set(v)) != len(v):
            raise self.fail(name, "a list of distinct non-empty strings", v)
        return v

    def sha(self, d: Mapping, name: str) -> str:
        v = d.get("sha256")
        if not isinstance(v, str) or not _HEX64.fullmatch(v):
            raise self.fail(f"{name}.sha256", "a sha256 (64 lowercase hex digits)", v)
        return v


def _file_size(path: Path) -> int:
    try:
        st = path.stat()
    except OSError:
        raise TrajectoryError(f"run directory is missing file {path}") from None
    if not path.is_file():
        raise TrajectoryError(f"{path} is not a regular file")
    return st.st_size


def validate_manifest(
    man: Any, run_dir: str | os.PathLike, *, trust_remote_code: bool = False, builds_from_config: bool = True
) -> dict[str, Any]:
    """Check every field of a parsed manifest before anything uses it.

    Types and ranges of all fields the loader reads; checkpoints strictly increasing from 0
    to ``num_steps``; segments contiguous over ``[0, num_steps)`` between checkpoint steps;
    every named file a plain relative path resolving inside ``run_dir``; declared sizes and
    counts bounded by the bytes on disk (``num_steps`` by the segment files, ``num_train`` by
    the training set's Arrow files, the parameters and the ``HookedTransformerConfig`` by
    checkpoint 0), so that nothing is allocated in proportion to an unchecked number.

    Args:
        man: The parsed ``manifest.json``.
        run_dir: The run directory.
        trust_remote_code: Allow a model config that names a tokenizer (see module doc).
        builds_from_config: Whether the model will be built from the recorded config (False
            when the caller passes a ``model_factory``: then a tokenizer it names is harmless).

    Returns:
        ``man`` (unchanged).

    Raises:
        TrajectoryError: naming the first bad field.
        UntrustedCodeError: the model config names a tokenizer and ``trust_remote_code`` is
            False.
    """
    run_dir = Path(run_dir)
    where = str(run_dir / MANIFEST)
    F = _Fields(where)
    if not isinstance(man, dict):
        raise TrajectoryError(f"{where} is not an explaind_tl trajectory manifest (not a JSON object)")
    if man.get("format") != FORMAT:
        raise TrajectoryError(f"{where} is not an explaind_tl trajectory manifest")
    version = man.get("format_version")
    if type(version) is not int or version not in READABLE_FORMAT_VERSIONS:
        newer = type(version) is int and version > FORMAT_VERSION
        raise TrajectoryError(
            f"unsupported trajectory format version {version!r:.40} (this explaind_tl reads {list(READABLE_FORMAT_VERSIONS)})"
            + ("; upgrade explaind_tl" if newer else "")
        )
    if _depth(man, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise TrajectoryError(f"{where} is nested deeper than {MAX_JSON_DEPTH} levels")

    # ---- checkpoints and segments
    cks = F.list(man, "checkpoints", "checkpoints")
    if not cks:
        raise TrajectoryError(f"{run_dir} has no checkpoint")
    num_steps = F.int(man, "num_steps", "num_steps")
    prev = -1
    for i, c in enumerate(cks):
        if not isinstance(c, dict):
            raise F.fail(f"checkpoints[{i}]", "an object", c)
        s = F.int(c, "step", f"checkpoints[{i}].step", 0, num_steps)
        if s <= prev:
            raise F.fail(f"checkpoints[{i}].step", f"greater than the previous checkpoint's step {prev}", s)
        prev = s
        resolve_inside(run_dir, c.get("file"), f"checkpoints[{i}].file")
        F.sha(c, f"checkpoints[{i}]")
    ck_steps = [c["step"] for c in cks]
    if ck_steps[0] != 0:
        raise F.fail("checkpoints[0].step", "0 (the initial checkpoint)", ck_steps[0])
    if ck_steps[-1] != num_steps:
        raise F.fail("num_steps", f"the last checkpoint's step {ck_steps[-1]}", num_steps)
    segs = F.list(man, "segments", "segments")
    at = 0
    ck_set = set(ck_steps)
    for i, sg in enumerate(segs):
        if not isinstance(sg, dict):
            raise F.fail(f"segments[{i}]", "an object", sg)
        start = F.int(sg, "start", f"segments[{i}].start", 0, num_steps)
        stop = F.int(sg, "stop", f"segments[{i}].stop", 0, num_steps)
        if start != at or stop <= start or start not in ck_set or stop not in ck_set:
            raise TrajectoryError(
                f"{where}: segments[{i}] covers steps [{start}, {stop}); segments must be contiguous from step 0 "
                f"(this one should start at {at}) and run between checkpoint steps"
            )
        at = stop
        path = resolve_inside(run_dir, sg.get("file"), f"segments[{i}].file")
        F.sha(sg, f"segments[{i}]")
        size = _file_size(path)
        if stop - start > ROWS_PER_RECORD_BYTE * size + 4096:
            raise TrajectoryError(
                f"{where}: segments[{i}] declares {stop - start} steps, more than its {size}-byte file {path} can hold"
            )
    if at != num_steps:
        raise TrajectoryError(f"{where}: the segments cover steps [0, {at}), num_steps is {num_steps}")

    # ---- scalars
    F.int(man, "checkpoint_every", "checkpoint_every", 1)
    F.int(man, "torch_num_threads", "torch_num_threads", 1, MAX_THREADS, optional=True)
    F.num(man, "clip_grad_norm", "clip_grad_norm", 0.0, optional=True, lo_open=True)
    F.bool(man, "model_training", "model_training")
    F.bool(man, "has_scheduler", "has_scheduler")
    F.bool(man, "complete", "complete")
    F.dict(man, "versions", "versions", optional=True)
    num_train = F.int(man, "num_train", "num_train", 1)
    _validate_optimizer(F, man)

    # ---- training data
    td = F.dict(man, "train_data", "train_data")
    data_rel = td.get("path")
    data_dir = resolve_inside(run_dir, data_rel, "train_data.path")
    files = F.dict(td, "files", "train_data.files")
    arrow_bytes = 0
    for rel, sha in files.items():
        if not DATASET_FILE.fullmatch(rel):
            raise F.fail("train_data.files", "named as Dataset.save_to_disk names its files (data-XXXXX-of-XXXXX.arrow, "
                         "dataset_info.json, state.json)", rel)
        p = resolve_inside(run_dir, f"{data_rel}/{rel}", f"train_data.files[{rel!r}]")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise F.fail(f"train_data.files[{rel!r}]", "a sha256 (64 lowercase hex digits)", sha)
        if ARROW_FILE.fullmatch(rel):
            arrow_bytes += _file_size(p)
    if not any(ARROW_FILE.fullmatch(rel) for rel in files):
        raise TrajectoryError(f"{where}: train_data.files names no Arrow data file (data-XXXXX-of-XXXXX.arrow)")
    if num_train * 8 > arrow_bytes:  # every row holds at least the int64 "id"
        raise TrajectoryError(
            f"{where}: num_train is {num_train}, more rows than the {arrow_bytes} bytes of training data in {data_dir} can hold"
        )

    # ---- parameters and model
    names = F.names(man, "param_names", "param_names")
    if not names:
        raise F.fail("param_names", "a non-empty list", names)
    shapes = F.dict(man, "param_shapes", "param_shapes", optional=True)
    dtypes = F.dict(man, "param_dtypes", "param_dtypes", optional=True)
    frozen = F.names(man, "frozen_names", "frozen_names", optional=True) or []
    F.names(man, "buffer_names", "buffer_names", optional=True)
    if set(frozen) & set(names):
        raise F.fail("frozen_names", "disjoint from param_names", sorted(set(frozen) & set(names))[:3])
    ck0_size = _file_size(resolve_inside(run_dir, cks[0]["file"], "checkpoints[0].file"))
    if dtypes is not None:
        for n, dt in dtypes.items():
            if not isinstance(dt, str) or dt not in DTYPE_SIZES:
                raise F.fail(f"param_dtypes[{n!r}]", f"one of {sorted(DTYPE_SIZES)}", dt)
        if shapes is not None and set(dtypes) != set(shapes):
            raise F.fail("param_dtypes", "an entry for exactly the parameters of param_shapes", sorted(dtypes)[:3])
    if shapes is not None:
        for n in [*names, *frozen]:
            if n not in shapes:
                raise F.fail("param_shapes", f"an entry for every parameter (missing {n!r})", sorted(shapes)[:3])
        declared = 0
        for n, shape in shapes.items():
            if not isinstance(shape, list) or len(shape) > 16 or not all(type(x) is int and 0 <= x <= MAX_DIM for x in shape):
                raise F.fail(f"param_shapes[{n!r}]", "a list of at most 16 non-negative integers", shape)
            size = DTYPE_SIZES.get(dtypes.get(n), 1) if isinstance(dtypes, dict) else 1
            declared += math.prod(shape) * size
        if declared > ck0_size:
            raise TrajectoryError(
                f"{where}: param_shapes declare {declared} bytes of parameters, more than checkpoint 0 "
                f"({ck0_size} bytes) holds"
            )
    if "loss_fn" in man and man["loss_fn"] is not None and not isinstance(man["loss_fn"], str):
        raise F.fail("loss_fn", "an import path string or null", man["loss_fn"])
    validate_model_spec(F.dict(man, "model", "model"), where, ck0_size,
                        trust_remote_code=trust_remote_code or not builds_from_config)
    return man


def _validate_optimizer(F: _Fields, man: Mapping) -> None:
    opt = F.dict(man, "optimizer", "optimizer")
    unknown = set(opt) - OPTIMIZER_FIELDS
    if unknown:
        raise F.fail("optimizer", f"an object with fields from {sorted(OPTIMIZER_FIELDS)}", sorted(unknown))
    kind = opt.get("kind")
    if not isinstance(kind, str) or kind not in OPTIMIZER_STATE_KEYS:
        raise F.fail("optimizer.kind", f"one of {sorted(OPTIMIZER_STATE_KEYS)}", kind)
    F.num(opt, "lr", "optimizer.lr", 0.0)
    for k in ("eps", "weight_decay", "momentum"):
        F.num(opt, k, f"optimizer.{k}", 0.0, optional=True)
    F.num(opt, "dampening", "optimizer.dampening", optional=True)
    betas = opt.get("betas")
    if betas is not None and not (
        isinstance(betas, list) and len(betas) == 2 and all(type(b) in (int, float) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise F.fail("optimizer.betas", "two numbers in [0, 1)", betas)
    if F.bool(opt, "nesterov", "optimizer.nesterov") and (not opt.get("momentum") or opt.get("dampening")):
        raise F.fail("optimizer.nesterov", "false unless momentum > 0 and dampening == 0", opt.get("nesterov"))


# ---- the model

_CONFIG_DIMS = ("d_model", "d_head", "n_heads", "n_layers", "n_ctx", "d_vocab", "d_vocab_out", "d_mlp",
                "n_key_value_heads", "num_experts", "experts_per_token", "rotary_dim")


def validate_model_spec(spec: Mapping[str, Any], where: str, ck0_size: int, *, trust_remote_code: bool = False) -> None:
    """Check the manifest's ``model`` entry.

    ``"hooked_transformer"``: the config builds a ``HookedTransformerConfig`` (seed not
    applied), its dimensions are integers, the model it describes is not larger than twice
    what checkpoint 0 holds (a lower-bound estimate of the parameters, attention masks and
    rotary tables, experts and key/value heads included: counts such as ``n_layers`` or
    ``num_experts`` also bound the Python objects built),
    and it names no tokenizer and does not set ``trust_remote_code`` unless
    ``trust_remote_code`` is given. ``"factory"``: ``factory`` is an import path or null.

    Raises:
        TrajectoryError, UntrustedCodeError: as :func:`validate_manifest`.
    """
    F = _Fields(where)
    kind = spec.get("kind")
    if kind == "factory":
        F.str(spec, "factory", "model.factory", optional=True)
        return
    if kind != "hooked_transformer":
        raise F.fail("model.kind", "'hooked_transformer' or 'factory'", kind)
    cfg = F.dict(spec, "config", "model.config")
    tok, remote = cfg.get("tokenizer_name"), cfg.get("trust_remote_code")
    if (tok is not None or remote not in (None, False)) and not trust_remote_code:
        raise UntrustedCodeError(
            f"{where}: the model config names the tokenizer {tok!r} (trust_remote_code={remote!r}); building the "
            "model would load it from the Hugging Face Hub or a path outside the run directory, and run its code "
            "when the config sets trust_remote_code. Pass model_factory=... (builds the model without it) or, if "
            "you trust this run directory, trust_remote_code=True"
        )
    for k in _CONFIG_DIMS:
        if k in cfg and cfg[k] is not None and (type(cfg[k]) is not int or not (k == "d_vocab_out" and cfg[k] == -1) and not 1 <= cfg[k] <= MAX_DIM):
            raise F.fail(f"model.config.{k}", f"an integer in [1, {MAX_DIM}]", cfg[k])
    if "n_devices" in cfg and cfg["n_devices"] != 1:
        raise F.fail("model.config.n_devices", "1", cfg["n_devices"])
    c = _hooked_config(cfg, where)
    try:
        size = DTYPE_SIZES.get(str(c.dtype), 4)
        d, L, n_ctx = int(c.d_model), int(c.n_layers), int(c.n_ctx)
        n_heads = int(c.n_heads)
        n_kv = int(getattr(c, "n_key_value_heads", None) or n_heads)
        numel = int(c.d_vocab) * d + d * int(c.d_vocab_out) + L * 2 * (n_heads + n_kv) * int(c.d_head) * d
        if not c.attn_only and c.d_mlp is not None:
            numel += L * 2 * d * int(c.d_mlp) * max(1, int(getattr(c, "num_experts", None) or 1))
        if c.positional_embedding_type == "standard":
            numel += n_ctx * d
        if c.positional_embedding_type == "rotary":
            numel += L * 2 * n_ctx * int(getattr(c, "rotary_dim", None) or 0)
        estimate = numel * size + L * n_ctx**2  # + the bool attention masks
    except (TypeError, ValueError, AttributeError) as exc:
        raise TrajectoryError(f"{where}: model.config does not describe a model: {exc}") from None
    if estimate > 2 * ck0_size + (1 << 20):
        raise TrajectoryError(
            f"{where}: model.config describes a model of at least {estimate} bytes, but checkpoint 0, which holds all "
            f"of its parameters and buffers, has {ck0_size}"
        )


def _hooked_config(cfg: Mapping[str, Any], where: str) -> Any:
    import torch
    from transformer_lens import HookedTransformerConfig

    fields = set(HookedTransformerConfig.__dataclass_fields__)
    kw: dict[str, Any] = {}
    for k, v in cfg.items():
        if k not in fields or k in ("n_params", "seed"):
            continue
        if k == "dtype":
            dt = getattr(torch, v.split(".", 1)[1], None) if isinstance(v, str) and v.startswith("torch.") else None
            if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
                raise _Fields(where).fail("model.config.dtype", "a torch floating dtype such as 'torch.float32'", v)
            v = dt
        kw[k] = v
    kw["device"] = "cpu"
    try:
        import logging

        logging.disable(logging.WARNING)
        try:
            return HookedTransformerConfig(**kw)
        finally:
            logging.disable(logging.NOTSET)
    except Exception as exc:  # noqa: BLE001 - any failure of the dataclass on hostile values
        raise TrajectoryError(f"{where}: model.config is not a valid HookedTransformerConfig: {type(exc).__name__}: {str(exc)[:200]}") from None


def read_manifest(
    run_dir: str | os.PathLike, *, trust_remote_code: bool = False, builds_from_config: bool = True
) -> dict[str, Any]:
    """Read and validate ``run_dir/manifest.json`` (see :func:`validate_manifest`).

    Raises:
        TrajectoryError: missing, not a regular file inside ``run_dir``, larger than
            :data:`MAX_MANIFEST_BYTES`, malformed, or failing validation.
        UntrustedCodeError: as :func:`validate_manifest`.
    """
    run_dir = Path(run_dir)
    path = resolve_inside(run_dir, MANIFEST, "the manifest")
    man = read_json_file(path, "manifest", MAX_MANIFEST_BYTES)
    return validate_manifest(man, run_dir, trust_remote_code=trust_remote_code, builds_from_config=builds_from_config)


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
            f"convert it with `python -m explaind_tl.safe_format migrate {resume_dir}`"
        )


# ------------------------------------------------------------------------------------------
# Migration of old directories (explicit, by the user, on trusted directories)
# ------------------------------------------------------------------------------------------


@dataclass
class MigrationReport:
    """What :func:`migrate_run_dir` / :func:`migrate_explain_state` did.

    Attributes:
        path: The directory.
        converted: Files rewritten.
        format_version: The manifest's version afterwards (``None`` for a resume directory).
    """

    path: Path
    converted: list[str] = field(default_factory=list)
    format_version: int | None = None

    def __str__(self) -> str:
        what = ", ".join(self.converted) if self.converted else "nothing to convert"
        v = f" (format version {self.format_version})" if self.format_version is not None else ""
        return f"{self.path}: {what}{v}"


def _restricted_unpickle(data: bytes, what: str) -> Any:
    import io

    import torch

    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - UnpicklingError & co: name what was refused
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        found = re.search(r"Unsupported global: GLOBAL \S+|Unsupported operand[^\n]*", text)
        why = found.group(0) if found else (text.splitlines() or [type(exc).__name__])[0][:200]
        raise TrajectoryError(
            f"cannot convert {what}: its pickle holds more than plain numbers and tensors ({why.strip()}), so it is not "
            "loaded (that could run its code) and cannot be migrated; Trajectory.load still reads the run, but "
            "resuming it with this scheduler state is not possible"
        ) from None


def _legacy_scheduler_to_json(text: str, what: str) -> str:
    import base64
    import binascii

    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TrajectoryError(f"cannot convert {what}: the scheduler metadata is neither JSON nor base64") from None
    state = _restricted_unpickle(data, what)
    if not isinstance(state, dict):
        raise TrajectoryError(f"cannot convert {what}: the scheduler state is not a dict")
    try:
        return encode_scheduler_state(state)
    except SchedulerStateError as exc:
        raise TrajectoryError(f"cannot convert {what}: {exc}") from None


def migrate_run_dir(path: str | os.PathLike) -> MigrationReport:
    """Convert a run directory to format version 2, in place. Run it only on directories you trust.

    Every checkpoint whose ``scheduler`` metadata is a version-1 pickle gets it as JSON
    (the pickle is read with ``torch.load(weights_only=True)``, which refuses anything but
    plain containers, numbers and tensors, so even this never runs code); checksums and the
    manifest are updated. The run directory is locked meanwhile; every file is replaced
    atomically, and a journal (``migration.json``) makes an interrupted migration safe to run
    again. Idempotent: a version-2 directory is left as is.

    Args:
        path: The run directory.

    Returns:
        What was converted.

    Raises:
        TrajectoryError: not a run directory, a file fails its checksum (nothing is changed),
            or a scheduler state holds objects (nothing is changed).
    """
    from safetensors import safe_open

    run_dir = Path(path)
    if not run_dir.is_dir():
        raise TrajectoryError(f"run directory {run_dir} does not exist")
    lock = storage.RunLock.acquire(run_dir)
    try:
        mpath = resolve_inside(run_dir, MANIFEST, "the manifest")
        man = read_json_file(mpath, "manifest", MAX_MANIFEST_BYTES)
        validate_manifest(man, run_dir, trust_remote_code=True)  # structure only: nothing is built or imported
        report = MigrationReport(run_dir, format_version=man["format_version"])
        journal_path = run_dir / MIGRATION_JOURNAL
        journal = read_json_file(journal_path, "migration journal") if journal_path.exists() else {}
        if not isinstance(journal, dict):
            raise TrajectoryError(f"{journal_path} is malformed; remove it only if no migration was interrupted")
        # 1. everything the manifest lists must match it (or a journaled, already converted file)
        listed = [*man["checkpoints"], *man["segments"]]
        for e in listed:
            p = run_dir / e["file"]
            got = storage.sha256_file(p) if p.is_file() else None
            if got != e["sha256"] and got != journal.get(e["file"]):
                raise TrajectoryError(f"{p} does not match its checksum: the run directory is damaged; nothing was migrated")
        # 2. convert into temp files
        plans: list[tuple[dict, Path, Path]] = []
        try:
            for c in man["checkpoints"]:
                p = run_dir / c["file"]
                try:
                    with safe_open(str(p), framework="pt") as f:
                        meta = dict(f.metadata() or {})
                        keys = list(f.keys())
                except Exception as exc:  # noqa: BLE001
                    raise TrajectoryError(f"cannot read {p}: {exc}") from exc
                if "scheduler" not in meta or not _is_legacy_scheduler_text(meta["scheduler"]):
                    if journal.get(c["file"]):
                        c["sha256"] = storage.sha256_file(p)
                    continue
                meta["scheduler"] = _legacy_scheduler_to_json(meta["scheduler"], str(p))
                with safe_open(str(p), framework="pt") as f:
                    tensors = {k: f.get_tensor(k) for k in keys}
                tmp = p.with_name(f".{p.name}.migrate.tmp")
                storage.save_tensors(tmp, tensors, meta)
                plans.append((c, p, tmp))
            # 3. journal, replace, manifest, drop journal
            if plans:
                journal.update({c["file"]: storage.sha256_file(tmp) for c, _, tmp in plans})
                storage.write_json(journal_path, journal)
            for c, p, tmp in plans:
                c["sha256"] = journal[c["file"]]
                os.replace(tmp, p)
                report.converted.append(c["file"])
        finally:
            for _, _, tmp in plans:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        if man["format_version"] != FORMAT_VERSION or plans or journal:
            man["format_version"] = FORMAT_VERSION
            storage.write_json(mpath, man)
        report.format_version = FORMAT_VERSION
        if journal_path.exists():
            journal_path.unlink()
        return report
    finally:
        lock.release()


def migrate_explain_state(resume_dir: str | os.PathLike) -> MigrationReport:
    """Convert an ``explain(resume_dir=...)`` directory's ``explain_state.pt`` to safetensors + JSON.

    The pickle is read with ``torch.load(weights_only=True)`` (plain containers, numbers and
    tensors only); the new file is written atomically, then the old one is removed. Run it only
    on resume directories you wrote yourself.

    Raises:
        TrajectoryError: no such file, or it holds anything but plain data.
    """
    resume_dir = Path(resume_dir)
    report = MigrationReport(resume_dir)
    legacy = resume_dir / LEGACY_EXPLAIN_STATE
    if not legacy.is_file():
        if (resume_dir / EXPLAIN_STATE).is_file():
            return report
        raise TrajectoryError(f"{resume_dir} holds no {LEGACY_EXPLAIN_STATE}")
    state = _restricted_unpickle(legacy.read_bytes(), str(legacy))
    if not isinstance(state, dict):
        raise TrajectoryError(f"cannot convert {legacy}: not a dict")
    try:
        save_state(resume_dir / EXPLAIN_STATE, state)
    except SchedulerStateError as exc:
        raise TrajectoryError(f"cannot convert {legacy}: {exc}") from None
    legacy.unlink()
    report.converted.append(LEGACY_EXPLAIN_STATE)
    return report


def migrate(path: str | os.PathLike) -> MigrationReport:
    """:func:`migrate_run_dir` for a run directory, :func:`migrate_explain_state` for a resume directory."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return migrate_run_dir(path)
    if (path / LEGACY_EXPLAIN_STATE).exists() or (path / EXPLAIN_STATE).exists():
        return migrate_explain_state(path)
    raise TrajectoryError(
        f"{path} is neither a run directory (no {MANIFEST}) nor an explain resume directory (no {LEGACY_EXPLAIN_STATE})"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m explaind_tl.safe_format migrate PATH [PATH ...]``."""
    p = argparse.ArgumentParser(
        prog="python -m explaind_tl.safe_format",
        description="Convert run directories (format version 1) and explain resume directories "
        "(explain_state.pt) recorded by older explaind_tl to the pickle-free format. Run it only on "
        "directories you trust.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate", help="convert run directories / explain resume directories in place")
    m.add_argument("paths", nargs="+", help="run directories or explain resume directories")
    args = p.parse_args(argv)
    status = 0
    for path in args.paths:
        try:
            print(migrate(path))
        except ExplaindError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
