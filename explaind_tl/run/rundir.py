"""Which files of a run directory are ours, and how a recorder takes a directory (docs/design.md §5).

A run directory may hold the user's files too: overwriting a recorded run deletes only the files
this package writes (:func:`clear_run_dir`), never others, and a recorder refuses a non-empty
directory that is not a recorded run (:func:`prepare_run_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import re
from pathlib import Path

from explaind_tl.errors import StorageError, TrajectoryError
from explaind_tl.run import storage
from explaind_tl.run.data import remove_saved_dataset, saved_dataset_files
from explaind_tl.run.format import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    DATA_DIR,
    FORMAT,
    MANIFEST,
    METRICS,
    RECORDS_DIR,
    RECORDS_FILE,
    read_our_manifest,
)


def our_temp_files(run_dir: Path) -> list[Path]:
    """Temp files our atomic writes left in ``run_dir`` (a crash mid-write); never anything else."""
    out = []
    where = {
        run_dir: "|".join(re.escape(n) for n in (MANIFEST, METRICS)),
        run_dir / CHECKPOINT_DIR: CHECKPOINT_FILE,
        run_dir / RECORDS_DIR: RECORDS_FILE,
    }
    for d, names in where.items():
        if d.is_dir() and not d.is_symlink():
            out += [p for p in d.iterdir() if p.is_file() and not p.is_symlink() and storage.is_temp_of(p, names)]
    return out


def run_dir_content(run_dir: Path) -> list[Path]:
    """Entries of ``run_dir`` other than our lock and the temp files of a crashed write."""
    if not run_dir.is_dir():
        return []
    transient = set(our_temp_files(run_dir))
    return [p for p in run_dir.iterdir() if p.name not in (storage.LOCK_FILE, f".{DATA_DIR}.tmp") and p not in transient]


def clear_run_dir(run_dir: Path) -> None:
    """Delete a recorded run's files from ``run_dir`` (``overwrite=True``), and nothing else.

    Our files: ``manifest.json``, ``metrics.csv``, ``checkpoints/step_*.safetensors``,
    ``records/steps_*.parquet``, the saved training set in ``train_data/`` and temp files of
    our atomic writes. Anything else (the user's files, also inside ``checkpoints/``) stays, and
    so do the directories that still hold it. The manifest goes last, so an interrupted
    overwrite can be repeated.

    Raises:
        TrajectoryError: ``train_data/`` holds files we did not write (nothing is deleted).
    """
    data = [run_dir / DATA_DIR, run_dir / f".{DATA_DIR}.tmp"]
    for d in data:
        saved_dataset_files(d)  # refuse before deleting anything
    for sub, names in ((CHECKPOINT_DIR, CHECKPOINT_FILE), (RECORDS_DIR, RECORDS_FILE)):
        d = run_dir / sub
        if d.is_dir() and not d.is_symlink():
            for p in d.iterdir():
                if p.is_file() and not p.is_symlink() and (re.fullmatch(names, p.name) or storage.is_temp_of(p, names)):
                    p.unlink()
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty: the user's files keep it
    for d in data:
        remove_saved_dataset(d)
    for p in our_temp_files(run_dir):
        p.unlink(missing_ok=True)
    (run_dir / METRICS).unlink(missing_ok=True)
    (run_dir / MANIFEST).unlink(missing_ok=True)


def storage_error(exc: OSError, target: Path | None, valid_upto: int | None, tail: str = "") -> StorageError:
    """A :class:`StorageError` naming the file, the errno and the last valid step."""
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else "?"
    what = exc.strerror or str(exc)
    valid = f"the run is valid up to step {valid_upto} (its last complete checkpoint)" if valid_upto is not None else "nothing was recorded yet"
    name = str(target) if target is not None else (exc.filename or "?")
    return StorageError(f"cannot write {name}: [Errno {exc.errno}] {code} ({what}); {valid}{tail}", exc.errno, name)


def prepare_run_dir(run_dir: Path, overwrite: bool) -> storage.RunLock:
    """Check ``run_dir`` is empty (or a recorded run to overwrite), lock it, clear it.

    Raises:
        TrajectoryError: ``run_dir`` is a file, is not empty (and not a recorded run with
            ``overwrite=True``), or another recorder holds it.
        StorageError: it cannot be created or locked.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise TrajectoryError(f"run_dir {run_dir} is a file, not a directory")
    content = run_dir_content(run_dir)
    if content:
        if not overwrite:
            raise TrajectoryError(f"run directory {run_dir} is not empty (pass overwrite=True to replace a recorded run)")
        if read_our_manifest(run_dir) is None:
            names = ", ".join(sorted(p.name for p in content)[:5])
            raise TrajectoryError(
                f"run directory {run_dir} is not empty ({names}) and holds no explaind_tl trajectory "
                f"(no {MANIFEST} with format {FORMAT!r}): overwrite=True only replaces a recorded run and "
                "never deletes other files; choose an empty or new directory"
            )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, run_dir, None) from exc
    lock = storage.RunLock.acquire(run_dir)
    try:
        clear_run_dir(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock
