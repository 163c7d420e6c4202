"""One-time conversion of old run directories (pickled scheduler state) and explain snapshots.

Run it only on directories you trust: ``python -m explaind_tl.run.migrate PATH [PATH ...]`` or
:func:`migrate_run_dir` / :func:`migrate_explain_state`. The old pickles are read with
``torch.load(weights_only=True)`` through a restricted unpickler; nothing else ever reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explaind_tl.errors import ExplaindError, SchedulerStateError, TrajectoryError
from explaind_tl.run import storage
from explaind_tl.run.codec import _is_legacy_scheduler_text, encode_scheduler_state, save_state
from explaind_tl.run.format import (
    EXPLAIN_STATE,
    FORMAT_VERSION,
    LEGACY_EXPLAIN_STATE,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MIGRATION_JOURNAL,
)
from explaind_tl.run.validate import read_json_file, resolve_inside, validate_manifest

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
    """``python -m explaind_tl.run.migrate PATH [PATH ...]`` (also ``explaind-tl migrate``)."""
    p = argparse.ArgumentParser(
        prog="python -m explaind_tl.run.migrate",
        description="Convert run directories (format version 1) and explain resume directories "
        "(explain_state.pt) recorded by older explaind_tl to the pickle-free format. Run it only on "
        "directories you trust.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="run directories or explain resume directories")
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

