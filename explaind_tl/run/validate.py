"""Checking a run directory's manifest before use: types, ranges, paths inside (docs/design.md §5).

Run directories get shared, so their content is hostile data: every file a manifest names is a
relative path of plain names that resolves (symlinks followed) inside the run directory
(:func:`resolve_inside`); :func:`validate_manifest` checks every field's type and range and
bounds declared sizes and counts by the bytes actually on disk, before anything proportional
to them is allocated. Every failure is a :class:`~explaind_tl.errors.TrajectoryError`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from explaind_tl.errors import TrajectoryError, UntrustedCodeError
from explaind_tl.run.format import (
    DEVICE_TYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MAX_DIM,
    MAX_JSON_DEPTH,
    MAX_MANIFEST_BYTES,
    MAX_SMALL_JSON_BYTES,
    MAX_THREADS,
    READABLE_FORMAT_VERSIONS,
    ROWS_PER_RECORD_BYTE,
)

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
    if man.get("device") is not None and man["device"] not in DEVICE_TYPES:
        raise F.fail("device", f"one of {list(DEVICE_TYPES)}", man["device"])
    F.bool(man, "deterministic", "deterministic")
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

    ``"transformer_bridge"``: the same checks on a ``TransformerBridgeConfig`` dict, the size
    estimated from the dict (:func:`_check_bridge_config`). ``"hooked_transformer"``: the config
    builds a ``HookedTransformerConfig`` (seed not
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
    if kind not in ("hooked_transformer", "transformer_bridge"):
        raise F.fail("model.kind", "'hooked_transformer', 'transformer_bridge' or 'factory'", kind)
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
    if kind == "transformer_bridge":
        _check_bridge_config(cfg, where, ck0_size)
        return
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


def _check_bridge_config(cfg: Mapping[str, Any], where: str, ck0_size: int) -> None:
    """A ``TransformerBridge`` config (built by ``boot_native``): its dimensions are present and
    integers, it has a standard architecture, and the model it describes is not larger than twice
    what checkpoint 0 holds (estimated from the dict alone, without building anything)."""
    F = _Fields(where)
    for k in ("d_model", "d_head", "n_heads", "n_layers", "n_ctx", "d_vocab"):
        if type(cfg.get(k)) is not int:
            raise F.fail(f"model.config.{k}", f"an integer in [1, {MAX_DIM}]", cfg.get(k))
    if cfg.get("dtype") not in (None, "torch.float32", "torch.float64"):
        raise F.fail("model.config.dtype", "'torch.float32' or 'torch.float64'", cfg.get("dtype"))
    for k in ("num_experts", "n_key_value_heads"):
        if cfg.get(k) is not None:
            raise F.fail(f"model.config.{k}", "null (a dense model with one key/value per head)", cfg[k])
    d, L, n_ctx, H, dh = (int(cfg[k]) for k in ("d_model", "n_layers", "n_ctx", "n_heads", "d_head"))
    vocab_out = cfg.get("d_vocab_out") if type(cfg.get("d_vocab_out")) is int and cfg["d_vocab_out"] > 0 else cfg["d_vocab"]
    numel = int(cfg["d_vocab"]) * d + d * int(vocab_out) + L * 4 * H * dh * d + n_ctx * d
    if not cfg.get("attn_only") and type(cfg.get("d_mlp")) is int:
        numel += L * 2 * d * int(cfg["d_mlp"])
    size = 8 if cfg.get("dtype") == "torch.float64" else 4
    estimate = numel * size
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


