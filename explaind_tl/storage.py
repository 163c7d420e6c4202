"""Crash-safe file I/O for run directories: atomic writes, sha256, safetensors, JSON manifests.

Every write goes to a temporary file in the destination directory, is fsynced, then renamed
over the destination with :func:`os.replace` (atomic on POSIX), and the directory is fsynced.
A crash therefore leaves either the old file or the complete new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from explaind_tl.errors import ChecksumError, TrajectoryError

_CHUNK = 1 << 20


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is fsynced and renamed to ``dest``.

    Use for writers that insist on a path (safetensors, parquet). On error the temp file is
    removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        f.write(data)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_file(path: str | os.PathLike, sha256: str | None, check: bool = True) -> None:
    """Raise :class:`TrajectoryError` if ``path`` is missing, :class:`ChecksumError` on mismatch."""
    path = Path(path)
    if not path.is_file():
        raise TrajectoryError(f"run directory is missing file {path}")
    if check and sha256 is not None:
        got = sha256_file(path)
        if got != sha256:
            raise ChecksumError(f"checksum mismatch for {path}: manifest says {sha256[:12]}..., file has {got[:12]}... (corrupted or truncated)")


def save_tensors(dest: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """Atomically save ``tensors`` as safetensors; return the file's sha256."""
    from safetensors.torch import save_file

    data = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # no shared storage
    with atomic_path(dest) as tmp:
        save_file(data, str(tmp), metadata=dict(metadata) if metadata else None)
    return sha256_file(dest)


def load_tensors(path: str | os.PathLike, sha256: str | None = None, check: bool = True) -> dict[str, Tensor]:
    """Load a safetensors file, checking it first (see :func:`check_file`)."""
    from safetensors.torch import load_file

    check_file(path, sha256, check)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise TrajectoryError(f"cannot read tensors from {path} (truncated or corrupted?): {exc}") from exc


def tensor_to_bytes_tensor(x: Tensor) -> Tensor:
    """View any tensor's storage as a uint8 tensor (for RNG states)."""
    return x.detach().cpu().contiguous().view(torch.uint8).clone()


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars, torch dtypes/devices, tuples and paths to JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return repr(obj)


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(dest, (json.dumps(to_jsonable(obj), indent=1, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; :class:`TrajectoryError` if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise TrajectoryError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrajectoryError(f"malformed JSON in {path}: {exc}") from exc


def sha256_tree(root: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (sorted)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
