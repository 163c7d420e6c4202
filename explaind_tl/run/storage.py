"""Crash-safe file I/O for run directories: atomic writes, sha256, safetensors, JSON manifests.

Every write goes to a temporary file in the destination directory, is fsynced, then renamed
over the destination with :func:`os.replace` (atomic on POSIX), and the directory is fsynced.
A crash therefore leaves either the old file or the complete new one, never half of one.

:class:`RunLock` is the one-writer-per-run-directory lock (``fcntl.flock`` on
``recorder.lock``, which names the holder's pid and host); the kernel releases it when the
holder exits, so a lock file left by a crashed process never blocks.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from explaind_tl.errors import ChecksumError, StorageError, TrajectoryError

try:  # POSIX; elsewhere recording runs without the one-writer lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_CHUNK = 1 << 20
LOCK_FILE = "recorder.lock"


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


def is_temp_of(path: Path, names: str) -> bool:
    """Whether ``path`` is a temp file :func:`atomic_path` made for a file matching ``names``.

    Args:
        path: A file.
        names: Regular expression the destination's name must match (e.g. ``r"step_\\d+\\.safetensors"``).
    """
    m = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", path.name)
    return m is not None and re.fullmatch(names, m.group(1)) is not None


class RunLock:
    """An exclusive, advisory lock on a run directory for the lifetime of one writer.

    ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``run_dir/recorder.lock``: a second writer (in this
    process or another) is refused; the kernel drops the lock when the holder closes it or
    dies, so a stale lock file left by a killed process does not block. The file holds the
    holder's pid and host name, which the refusal names. The file itself is left in place
    (removing it would let two writers lock two different files).
    """

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd
        self._held = True

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> RunLock:
        """Lock ``run_dir`` (which must exist) or raise.

        Raises:
            TrajectoryError: another writer holds the lock (names its pid and host).
            StorageError: the lock file cannot be created or locked (permissions, a file
                system without locks).
        """
        path = Path(run_dir) / LOCK_FILE
        if fcntl is None:  # pragma: no cover
            return cls(path, None)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot create the lock file {path}: [Errno {exc.errno}] {exc.strerror}", exc.errno, str(path)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = cls._read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise StorageError(
                    f"cannot lock {path}: [Errno {exc.errno}] {exc.strerror} (does this file system support flock?)",
                    exc.errno,
                    str(path),
                ) from exc
            pid = holder.get("pid", "?")
            mine = " (this process: close or abort the other TrajectoryRecorder first)" if str(pid) == str(os.getpid()) else ""
            raise TrajectoryError(
                f"run directory {Path(run_dir)} is being written by another recorder: pid {pid} on host "
                f"{holder.get('host', '?')}{mine} holds {path}. Only one writer at a time; wait for it to "
                "finish or choose another run_dir"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n", 0)
        except OSError:
            pass  # the lock holds regardless; only the holder's name is missing
        return cls(path, fd)

    @staticmethod
    def _read_holder(fd: int) -> dict[str, Any]:
        try:
            return dict(json.loads(os.pread(fd, 4096, 0).decode() or "{}"))
        except (OSError, ValueError, TypeError):
            return {}

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._held

    def release(self) -> None:
        """Release the lock (idempotent)."""
        self._held = False
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:  # plain try: also runs from __del__ at interpreter shutdown
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except Exception:  # noqa: BLE001 - closing the descriptor releases it anyway
            pass
        try:
            os.close(fd)
        except Exception:  # noqa: BLE001
            pass

    def __del__(self) -> None:
        self.release()
