"""The training set of a run: preparing, saving, loading, and gathering batches (docs/design.md §5).

A run directory keeps its training set in ``train_data/`` (``datasets.save_to_disk``, Arrow) with
an integer column ``"id"`` equal to the row index; a batch is a set of ids, and
:func:`gather_batch` turns them into the tensors ``loss_fn`` receives, identically when
recording and when replaying.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from explaind_tl.errors import RecordingError, TrajectoryError
from explaind_tl.run import storage
from explaind_tl.run.format import DATASET_FILE

if TYPE_CHECKING:
    import datasets


def prepare_train_data(train_data: Any) -> datasets.Dataset:
    """Convert ``train_data`` to a ``datasets.Dataset`` with an integer ``"id"`` column.

    Args:
        train_data: A ``datasets.Dataset``, a dict of equal-length tensors/arrays/lists, or a
            single tensor (stored as column ``"input"``).

    Returns:
        The dataset; ``id`` is added as ``arange(N)`` if missing.

    Raises:
        RecordingError: ``id`` present but not equal to ``arange(N)``, or empty data.
    """
    import datasets
    import numpy as np

    if isinstance(train_data, Tensor):
        train_data = {"input": train_data}
    if isinstance(train_data, Mapping):
        cols = {}
        for k, v in train_data.items():
            if isinstance(v, Tensor):
                v = v.detach().cpu().numpy()
            cols[k] = v
        ds = datasets.Dataset.from_dict(cols)
    elif isinstance(train_data, datasets.Dataset):
        ds = train_data
    else:
        raise RecordingError(f"train_data must be a datasets.Dataset, a dict of tensors or a tensor, not {type(train_data).__name__}")
    n = len(ds)
    if n == 0:
        raise RecordingError("train_data is empty")
    if "id" in ds.column_names:
        ids = np.asarray(ds.with_format("numpy")["id"][:])
        if ids.dtype.kind not in "iu" or not np.array_equal(ids, np.arange(n)):
            raise RecordingError('train_data["id"] must be the row indices 0..N-1 (ids are row indices); drop or fix the column')
    else:
        ds = ds.add_column("id", np.arange(n, dtype=np.int64))
    return ds


def save_train_data(ds: datasets.Dataset, dest: Path) -> dict[str, str]:
    """Save ``ds`` to ``dest`` (Arrow, via a temp dir + rename); return ``{file: sha256}``."""
    import datasets

    tmp = dest.parent / f".{dest.name}.tmp"
    remove_saved_dataset(tmp)
    if dest.exists() or dest.is_symlink():
        saved_dataset_files(dest)  # refuse before writing anything if dest holds other files
    was_disabled = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    try:
        if getattr(ds, "_indices", None) is not None:
            ds = ds.flatten_indices()
        ds.save_to_disk(str(tmp))
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    remove_saved_dataset(dest)
    os.replace(tmp, dest)
    return storage.sha256_tree(dest)


def saved_dataset_files(path: Path) -> list[Path]:
    """The files of a directory written by ``Dataset.save_to_disk`` (``[]`` if ``path`` is absent).

    Raises:
        TrajectoryError: ``path`` is a file or link, or holds anything ``save_to_disk`` does not
            write (those files are the user's: nothing is deleted).
    """
    if not path.exists() and not path.is_symlink():
        return []
    if path.is_symlink() or not path.is_dir():
        raise TrajectoryError(f"{path} is not a training set saved by explaind_tl (a file or link); not deleting it")
    entries = list(path.iterdir())
    foreign = sorted(p.name for p in entries if p.is_symlink() or not p.is_file() or not re.fullmatch(DATASET_FILE, p.name))
    if foreign:
        raise TrajectoryError(
            f"{path} holds files explaind_tl did not write ({', '.join(foreign[:5])}); not deleting them: "
            "move them away or choose another run_dir"
        )
    return entries


def remove_saved_dataset(path: Path) -> None:
    """Delete a directory written by ``Dataset.save_to_disk``: only its own files, then the directory.

    Raises:
        TrajectoryError: as :func:`saved_dataset_files` (before anything is deleted).
    """
    files = saved_dataset_files(path)
    if not files and not path.exists():
        return
    for p in files:
        p.unlink()
    path.rmdir()


def dataset_columns(ds: datasets.Dataset) -> dict[str, Tensor]:
    """All rows of a torch-format dataset as ``{column: tensor [N, ...]}``."""
    cols = ds.with_format("torch")[:]
    out = {}
    for k, v in cols.items():
        if not isinstance(v, Tensor):
            raise RecordingError(f"column {k!r} does not convert to one tensor (ragged or non-numeric); use fixed-size numeric columns")
        out[k] = v
    return out


def gather_batch(columns: Mapping[str, Tensor], ids: Tensor | None) -> dict[str, Tensor]:
    """Rows ``ids`` (``None``: all rows in order) of ``columns`` — what ``loss_fn`` receives."""
    if ids is None:
        return dict(columns)
    return {k: v[ids] for k, v in columns.items()}


def check_batch_ids(batch_ids: Any, num_train: int) -> Tensor:
    """Validate and convert batch ids to a 1-d int64 tensor.

    Raises:
        RecordingError: empty, non-integer, not 1-d, or out of ``[0, num_train)``.
    """
    if isinstance(batch_ids, Tensor):
        ids = batch_ids.detach().cpu()
    else:
        try:
            ids = torch.as_tensor(list(batch_ids) if not hasattr(batch_ids, "__array__") else batch_ids)
        except (TypeError, ValueError) as exc:
            raise RecordingError(f"batch ids must be integers, got {batch_ids!r:.80}") from exc
    if ids.numel() == 0:
        raise RecordingError("batch ids are empty")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise RecordingError(f"batch ids must be integers, got dtype {ids.dtype}")
    if ids.dim() != 1:
        raise RecordingError(f"batch ids must be 1-d, got shape {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_train:
        raise RecordingError(f"batch ids out of range [0, {num_train}): min {lo}, max {hi}")
    return ids

