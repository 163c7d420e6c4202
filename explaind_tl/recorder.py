"""Recording training runs so that every step can be replayed exactly (DESIGN §5).

:class:`TrajectoryRecorder` wraps a model, a supported optimizer and a training set. Each
:meth:`TrajectoryRecorder.step` runs one optimizer step on the given training examples and
records ``(batch ids, clip factor, loss)`` and the hyper-parameters the optimizer used
(``lr``, and ``betas``/``eps``/``weight_decay`` or ``momentum``/``dampening``/``weight_decay``:
schedulers such as OneCycleLR and hand edits may change them between steps); every
``checkpoint_every`` steps (and at the end) it writes a full checkpoint (parameters + optimizer
state + RNG) and the step records of the segment since the previous checkpoint, then atomically
rewrites ``manifest.json``. The manifest lists only complete files, so a crash (or a full disk)
leaves a valid run up to its last checkpoint, and :meth:`TrajectoryRecorder.resume` continues
from there.

A step is atomic: it is either fully recorded, or the model, the optimizer and the scheduler
are exactly as before it and the error says why (bad input and settings that cannot change
mid-run are refused before the step; a failure after ``optimizer.step()`` restores a snapshot
taken just before it). One recorder writes a run directory at a time (an OS lock,
:class:`explaind_tl.storage.RunLock`), and ``overwrite=True`` only ever deletes the files of a
recorded run, never other files.

Recording and replay (:class:`explaind_tl.trajectory.Trajectory`) share :func:`train_step`,
use torch's single-tensor optimizer code (``foreach=False``), the same batch tensors and the
same number of CPU threads, so replay on the same machine is bitwise identical. The recorded
steps run single-threaded by default: multi-threaded CPU kernels are not bitwise reproducible
(their results depend on memory alignment and scheduling), and a small-lr Adam run amplifies a
1e-8 difference in one step's gradient into 1e-2 parameter differences within 100 steps.

:func:`train` is a convenience loop (full batch or seeded shuffled minibatches) on top.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from explaind_tl import safe_format, storage
from explaind_tl.errors import (
    ExplaindError,
    NondeterministicTrainingError,
    StorageError,
    TrajectoryError,
    UnsupportedOptimizerError,
)
from explaind_tl.models import import_path, model_spec, param_signature
from explaind_tl.optim import (
    HPARAM_COLUMNS,
    OptimizerSpec,
    fixed_settings,
    force_single_tensor,
    optimizer_state_to_tensors,
    spec_from_optimizer,
    step_hparams,
)

if TYPE_CHECKING:
    import datasets

    from explaind_tl.trajectory import Trajectory

FORMAT = safe_format.FORMAT
FORMAT_VERSION = safe_format.FORMAT_VERSION  # 2: scheduler state as JSON, not a pickle
MANIFEST = safe_format.MANIFEST
DATA_DIR = "train_data"
METRICS = "metrics.csv"
# names of the files a run directory holds (regular expressions; everything else is the user's)
CHECKPOINT_FILE = r"step_\d{8}\.safetensors"
RECORDS_FILE = r"steps_\d{8}_\d{8}\.parquet"
DATASET_FILE = r"data-\d{5}-of-\d{5}\.arrow|dataset_info\.json|state\.json"
LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


class RecordingError(ExplaindError, ValueError):
    """Bad input while recording (batch ids, loss shape, non-finite values, ...)."""


# --------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------


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


def load_train_data(path: Path) -> datasets.Dataset:
    """Load a saved training set in torch format."""
    import datasets

    try:
        return datasets.load_from_disk(str(path)).with_format("torch")
    except Exception as exc:
        raise TrajectoryError(f"cannot load the training data at {path}: {exc}") from exc


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
    if ids.numel() == 0:
        raise RecordingError("batch ids are empty")
    ids = ids.to(torch.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_train:
        raise RecordingError(f"batch ids out of range [0, {num_train}): min {lo}, max {hi}")
    return ids


# --------------------------------------------------------------------------------------------
# The one training step shared by recording and replay
# --------------------------------------------------------------------------------------------


def clip_grad_norm(grads: list[Tensor], max_norm: float) -> float:
    """Scale ``grads`` in place like ``torch.nn.utils.clip_grad_norm_``; return ``κ``.

    ``κ = min(1, max_norm / (total_norm + 1e-6))`` with the global 2-norm; the gradients are
    always multiplied by ``κ`` (a no-op at 1.0).

    Raises:
        RecordingError: the gradient norm is not finite.
    """
    norms = [torch.linalg.vector_norm(g, 2.0) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    if not torch.isfinite(total):
        raise RecordingError(f"non-finite gradient norm ({float(total)})")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return float(coef)


@dataclass
class StepOutcome:
    """What one :func:`train_step` observed."""

    loss: float
    lr: float
    clip_factor: float
    grads: list[Tensor] | None  # clipped gradients the optimizer saw (cloned), if captured


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    loss_fn: LossFn,
    batch: dict[str, Tensor],
    clip_max_norm: float | None,
    *,
    lr: float | None = None,
    capture_grads: bool = False,
    before_step: Callable[[], None] | None = None,
) -> StepOutcome:
    """One optimizer step on ``batch`` (mean of per-example losses); identical for record/replay.

    Args:
        model: The model (its mode is left as is).
        optimizer: Single-group optimizer over ``params``.
        params: Trainable parameters in ``named_parameters()`` order.
        loss_fn: ``loss_fn(model, batch) -> [B]`` per-example losses.
        batch: Rows of the training set.
        clip_max_norm: Global-norm clipping threshold or ``None``.
        lr: If given, set as the group's lr first (replay); else the current lr is used.
        capture_grads: Clone the (clipped) gradients before the optimizer step.
        before_step: Called right before ``optimizer.step()`` (e.g. to snapshot state).

    Raises:
        RecordingError: wrong loss shape, non-finite loss or gradients (nothing is changed).
    """
    group = optimizer.param_groups[0]
    if lr is not None:
        group["lr"] = lr
    for p in params:
        p.grad = None
    losses = loss_fn(model, batch)
    n = next(iter(batch.values())).shape[0]
    if not isinstance(losses, Tensor) or losses.shape != (n,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise RecordingError(f"loss_fn must return per-example losses of shape [{n}] (batch size), got {shape}")
    if not bool(torch.isfinite(losses).all()):
        bad = torch.nonzero(~torch.isfinite(losses)).flatten()[:5].tolist()
        raise RecordingError(f"non-finite loss for batch rows {bad}; the run is valid up to its last checkpoint")
    loss = losses.mean()
    loss.backward()
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if clip_max_norm is not None:
        kappa = clip_grad_norm(grads, clip_max_norm)
    else:
        kappa = 1.0
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            raise RecordingError("non-finite gradients; the run is valid up to its last checkpoint")
    captured = [g.detach().clone() for g in grads] if capture_grads else None
    lr_used = float(group["lr"])
    if before_step is not None:
        before_step()
    optimizer.step()
    return StepOutcome(loss=float(loss.detach()), lr=lr_used, clip_factor=kappa, grads=captured)


def check_no_dropout(model: nn.Module) -> None:
    """Refuse active dropout-like modules (``p > 0`` while training).

    Raises:
        NondeterministicTrainingError: naming the module.
    """
    if not model.training:
        return
    for name, mod in model.named_modules():
        p = getattr(mod, "p", None)
        is_dropout = isinstance(mod, nn.modules.dropout._DropoutNd) or "dropout" in type(mod).__name__.lower()
        if is_dropout and mod.training and isinstance(p, (int, float)) and p > 0:
            raise NondeterministicTrainingError(
                f"module {name or '<root>'} ({type(mod).__name__}, p={p}) is random while training; "
                "replay must be exact: set p=0 or call model.eval() before recording"
            )


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.detach().reshape(-1).contiguous().view(torch.uint8), b.detach().reshape(-1).contiguous().view(torch.uint8))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (``None``: leave as is), then restore."""
    cur = torch.get_num_threads()
    if n is None or n == cur:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(cur)


def determinism_probe(model: nn.Module, loss_fn: LossFn, batch: dict[str, Tensor]) -> None:
    """Run ``loss_fn`` twice and require bitwise-equal losses and an untouched RNG.

    Raises:
        NondeterministicTrainingError: if the two runs differ or the RNG was consumed.
    """
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            a = loss_fn(model, batch)
            mid = torch.get_rng_state()
            b = loss_fn(model, batch)
        if not torch.equal(rng, mid):
            raise NondeterministicTrainingError("loss_fn draws random numbers (the torch RNG changed); training must be deterministic to be replayed")
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and _bitwise_equal(a, b)):
            raise NondeterministicTrainingError("loss_fn gave different results on the same batch twice; training must be deterministic to be replayed")
    finally:
        torch.set_rng_state(rng)


def package_versions() -> dict[str, str]:
    """Versions of torch, transformer_lens, datasets and explaind_tl."""
    from importlib import metadata

    import explaind_tl

    out = {"torch": torch.__version__, "explaind_tl": explaind_tl.__version__}
    for pkg in ("transformer_lens", "datasets", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _group_hparams(opt: torch.optim.Optimizer) -> dict[str, Any]:
    g = opt.param_groups[0]
    return {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, type(None), tuple, list, str))}


# --------------------------------------------------------------------------------------------
# The recorder
# --------------------------------------------------------------------------------------------


def _is_plateau(scheduler: Any) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _our_temp_files(run_dir: Path) -> list[Path]:
    """Temp files our atomic writes left in ``run_dir`` (a crash mid-write); never anything else."""
    out = []
    where = {
        run_dir: "|".join(re.escape(n) for n in (MANIFEST, METRICS)),
        run_dir / "checkpoints": CHECKPOINT_FILE,
        run_dir / "records": RECORDS_FILE,
    }
    for d, names in where.items():
        if d.is_dir() and not d.is_symlink():
            out += [p for p in d.iterdir() if p.is_file() and not p.is_symlink() and storage.is_temp_of(p, names)]
    return out


def _run_dir_content(run_dir: Path) -> list[Path]:
    """Entries of ``run_dir`` other than our lock and the temp files of a crashed write."""
    if not run_dir.is_dir():
        return []
    transient = set(_our_temp_files(run_dir))
    return [p for p in run_dir.iterdir() if p.name not in (storage.LOCK_FILE, f".{DATA_DIR}.tmp") and p not in transient]


def _read_our_manifest(run_dir: Path) -> dict[str, Any] | None:
    try:
        man = storage.read_json(run_dir / MANIFEST)
    except TrajectoryError:
        return None
    return man if isinstance(man, dict) and man.get("format") == FORMAT else None


def _clear_run_dir(run_dir: Path) -> None:
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
    for sub, names in (("checkpoints", CHECKPOINT_FILE), ("records", RECORDS_FILE)):
        d = run_dir / sub
        if d.is_dir() and not d.is_symlink():
            for p in d.iterdir():
                if p.is_file() and not p.is_symlink() and (re.fullmatch(names, p.name) or storage.is_temp_of(p, names)):
                    p.unlink()
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty: the user's files keep it
    for d in data:
        remove_saved_dataset(d)
    for p in _our_temp_files(run_dir):
        p.unlink(missing_ok=True)
    (run_dir / METRICS).unlink(missing_ok=True)
    (run_dir / MANIFEST).unlink(missing_ok=True)


def _storage_error(exc: OSError, target: Path | None, valid_upto: int | None, tail: str = "") -> StorageError:
    """A :class:`StorageError` naming the file, the errno and the last valid step."""
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else "?"
    what = exc.strerror or str(exc)
    valid = f"the run is valid up to step {valid_upto} (its last complete checkpoint)" if valid_upto is not None else "nothing was recorded yet"
    name = str(target) if target is not None else (exc.filename or "?")
    return StorageError(f"cannot write {name}: [Errno {exc.errno}] {code} ({what}); {valid}{tail}", exc.errno, name)


class TrajectoryRecorder:
    """Records a training run into ``run_dir`` for exact replay.

    Args:
        model: The model (a ``HookedTransformer``, or any module with ``model_factory``).
        optimizer: ``AdamW``, ``Adam`` or ``SGD`` over exactly the trainable parameters
            (its ``foreach`` is set to False: replay uses the same single-tensor code).
            ``lr``, ``betas``, ``eps``, ``weight_decay`` (Adam/AdamW) and ``lr``, ``momentum``,
            ``dampening``, ``weight_decay`` (SGD) may change between steps (schedulers, hand
            edits): each step's values are recorded. Everything else (nesterov, amsgrad,
            maximize, foreach/fused, SGD momentum on/off, the param groups) is refused at the
            step where it changes, before the step.
        run_dir: New or empty directory (the recorder holds an OS lock on it, file
            ``recorder.lock``, until :meth:`close`).
        train_data: ``datasets.Dataset`` / dict of tensors / tensor (see
            :func:`prepare_train_data`).
        loss_fn: ``loss_fn(model, batch) -> [B]`` per-example losses; stored by import path
            when importable, else :meth:`Trajectory.load` needs ``loss_fn=``.
        checkpoint_every: ``K``: full checkpoint every K steps (and at the end).
        scheduler: Optional lr scheduler, stepped after every optimizer step
            (``ReduceLROnPlateau`` too: then every :meth:`step` needs ``scheduler_metric``).
        clip_grad_norm: Optional global-norm clipping threshold (applied by the recorder).
        model_factory: Zero-argument callable rebuilding ``model`` (needed unless a
            ``HookedTransformer``); stored by import path.
        overwrite: Allow ``run_dir`` to hold a recorded run (its manifest names the explaind_tl
            format): that run's files are deleted, the user's files in it are kept. A non-empty
            directory that is not a recorded run is refused even with ``overwrite=True``.
        num_threads: torch CPU threads used inside each recorded step (and by replay).
            The default 1 makes replay bitwise exact; ``None`` keeps torch's current setting,
            which on CPU usually makes replay drift (``Trajectory.verify()`` measures it and
            :func:`explaind_tl.explain` reports it as ``meta["replay_mismatch"]``).

    Raises:
        TrajectoryError: ``run_dir`` is not empty (and not a recorded run with
            ``overwrite=True``), or another recorder is writing it (names its pid).
        StorageError: writing the run directory failed (disk full, permissions).

    Use as a context manager, or call :meth:`close` when done. Each step keeps a copy of the
    parameters and the optimizer state taken just before ``optimizer.step()`` (to undo a step
    that fails after it), so recording holds the model and its optimizer state twice.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        run_dir: str | os.PathLike,
        train_data: Any,
        loss_fn: LossFn,
        checkpoint_every: int = 100,
        scheduler: Any = None,
        clip_grad_norm: float | None = None,
        model_factory: Callable[[], nn.Module] | None = None,
        *,
        overwrite: bool = False,
        num_threads: int | None = 1,
        _resume: dict[str, Any] | None = None,
    ) -> None:
        self._lock: storage.RunLock | None = None
        self._closed = False
        if int(checkpoint_every) < 1:
            raise RecordingError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if clip_grad_norm is not None and not (clip_grad_norm > 0 and math.isfinite(clip_grad_norm)):
            raise RecordingError(f"clip_grad_norm must be a positive number, got {clip_grad_norm}")
        self.run_dir = Path(run_dir)
        self.model = model
        self.model_factory = model_factory
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.checkpoint_every = int(checkpoint_every)
        self.spec: OptimizerSpec = spec_from_optimizer(optimizer, model)
        force_single_tensor(optimizer)
        step_hparams(optimizer, self.spec.kind)  # Tensor / non-finite hyper-parameters: refused now
        self._fixed = fixed_settings(optimizer)
        check_no_dropout(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._records: list[dict[str, Any]] = []
        self._probed = False

        if num_threads is not None and int(num_threads) < 1:
            raise RecordingError(f"num_threads must be >= 1 or None, got {num_threads}")
        self.num_threads = None if num_threads is None else int(num_threads)

        if _resume is not None:
            self._lock = _resume.get("lock")
            self.manifest = _resume["manifest"]
            self.num_threads = self.manifest.get("torch_num_threads")
            self.train_data = _resume["train_data"]
            self._columns = _resume["columns"]
            self.num_train = len(self.train_data)
            self.num_steps = int(self.manifest["num_steps"])
            self.manifest["complete"] = False
            self._write_manifest(self.manifest)
            return

        mspec = model_spec(model, model_factory)
        ds = prepare_train_data(train_data)
        self._lock = self._prepare_run_dir(overwrite)
        try:
            target = self.run_dir
            try:
                for sub in ("checkpoints", "records"):
                    target = self.run_dir / sub
                    target.mkdir(exist_ok=True)
                target = self.run_dir / DATA_DIR
                data_files = save_train_data(ds, target)
            except OSError as exc:
                if isinstance(exc, ExplaindError):
                    raise
                raise _storage_error(exc, target, None) from exc
            self.train_data = load_train_data(self.run_dir / DATA_DIR)
            self._columns = dataset_columns(self.train_data)
            self.num_train = len(self.train_data)
            self.num_steps = 0
            self.manifest: dict[str, Any] = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "versions": package_versions(),
                "torch_num_threads": self.num_threads or torch.get_num_threads(),
                "model": mspec,
                "model_training": bool(model.training),
                "loss_fn": import_path(loss_fn),
                "optimizer": self.spec.to_dict(),
                "clip_grad_norm": self.clip_grad_norm,
                "checkpoint_every": self.checkpoint_every,
                "has_scheduler": scheduler is not None,
                "num_steps": 0,
                "num_train": self.num_train,
                **param_signature(model),
                "train_data": {"path": DATA_DIR, "files": data_files},
                "checkpoints": [],
                "segments": [],
                "complete": False,
            }
            self._write_checkpoint(initial=True)
        except BaseException:
            # leave no half-created run behind (it could not be overwritten: no manifest)
            with contextlib.suppress(Exception):
                _clear_run_dir(self.run_dir)
                for sub in ("checkpoints", "records"):
                    with contextlib.suppress(OSError):
                        (self.run_dir / sub).rmdir()
            self._release_lock()
            raise

    def _prepare_run_dir(self, overwrite: bool) -> storage.RunLock:
        """Check ``run_dir`` is empty (or a recorded run to overwrite), lock it, clear it."""
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise TrajectoryError(f"run_dir {run_dir} is a file, not a directory")
        content = _run_dir_content(run_dir)
        if content:
            if not overwrite:
                raise TrajectoryError(f"run directory {run_dir} is not empty (pass overwrite=True to replace a recorded run)")
            if _read_our_manifest(run_dir) is None:
                names = ", ".join(sorted(p.name for p in content)[:5])
                raise TrajectoryError(
                    f"run directory {run_dir} is not empty ({names}) and holds no explaind_tl trajectory "
                    f"(no {MANIFEST} with format {FORMAT!r}): overwrite=True only replaces a recorded run and "
                    "never deletes other files; choose an empty or new directory"
                )
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _storage_error(exc, run_dir, None) from exc
        lock = storage.RunLock.acquire(run_dir)
        try:
            _clear_run_dir(run_dir)
        except BaseException:
            lock.release()
            raise
        return lock

    # ---------------------------------------------------------------- resume

    @classmethod
    def resume(
        cls,
        run_dir: str | os.PathLike,
        model: nn.Module | None = None,
        optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None = None,
        loss_fn: LossFn | None = None,
        model_factory: Callable[[], nn.Module] | None = None,
        *,
        trust_remote_code: bool = False,
    ) -> TrajectoryRecorder:
        """A recorder positioned at the last checkpoint of ``run_dir``.

        Parameters, optimizer state (and its param group's hyper-parameters), scheduler state
        and the torch RNG are restored; step records after the checkpoint are discarded.

        Args:
            run_dir: An existing run directory (not being written by another recorder).
            model: The model object to continue training (its parameters are overwritten);
                rebuilt from the manifest if omitted.
            optimizer_factory: ``params -> optimizer``; default rebuilds it from the stored spec.
                Its hyper-parameters are replaced by the checkpoint's.
            scheduler_factory: ``optimizer -> scheduler``; required if the run had a scheduler.
            loss_fn: Required unless the recorded loss_fn is one of explaind_tl's built-in ones.
            model_factory: Required if the run was recorded with a model factory.
            trust_remote_code: Import the loss_fn / model factory the manifest names even when
                they are not explaind_tl's (see :meth:`Trajectory.load`); only for trusted runs.

        Raises:
            TrajectoryError: another recorder holds ``run_dir`` (names its pid), the run is
                invalid, the optimizer/scheduler do not match the recording, or (format version
                1) the scheduler state is a pickle: it is never loaded; convert the directory
                once with ``python -m explaind_tl.safe_format migrate RUN_DIR``.
            UntrustedCodeError: as :meth:`Trajectory.load`.
        """
        run_dir = Path(run_dir)
        lock = storage.RunLock.acquire(run_dir) if run_dir.is_dir() else None
        try:
            return cls._resume_locked(run_dir, lock, model, optimizer_factory, scheduler_factory, loss_fn, model_factory, trust_remote_code)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @classmethod
    def _resume_locked(
        cls,
        run_dir: Path,
        lock: storage.RunLock | None,
        model: nn.Module | None,
        optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None,
        scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None,
        loss_fn: LossFn | None,
        model_factory: Callable[[], nn.Module] | None,
        trust_remote_code: bool = False,
    ) -> TrajectoryRecorder:
        from explaind_tl.models import check_model_matches
        from explaind_tl.optim import build_optimizer, load_optimizer_state
        from explaind_tl.trajectory import Trajectory

        traj = Trajectory.load(run_dir, loss_fn=loss_fn, model_factory=model_factory, check=True, trust_remote_code=trust_remote_code)
        man = traj.manifest
        if model is None:
            model = traj._build_model()
        else:
            check_model_matches(model, man)
        model.train(man.get("model_training", True))
        last = traj.checkpoint_steps[-1]
        ck = traj._load_checkpoint(last)
        init = traj._load_checkpoint(0)
        named = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for n in traj.param_names:
                named[n].copy_(ck[f"param/{n}"])
            for key, t in init.items():
                kind, _, n = key.partition("/")
                if kind == "frozen":
                    named[n].copy_(t)
                elif kind == "buffer" and n in buffers:
                    buffers[n].copy_(t)
        params = [named[n] for n in traj.param_names]
        opt = optimizer_factory(params) if optimizer_factory is not None else build_optimizer(traj.optimizer_spec, params)
        spec = spec_from_optimizer(opt, model)
        # hyper-parameters may change during a run (they are restored from the checkpoint below);
        # the kind and the form of the update may not
        rec_spec = traj.optimizer_spec
        if (spec.kind, spec.nesterov, spec.momentum != 0) != (rec_spec.kind, rec_spec.nesterov, rec_spec.momentum != 0):
            raise TrajectoryError(f"optimizer {spec} does not match the recorded {rec_spec}")
        force_single_tensor(opt)
        load_optimizer_state(opt, {k.split("/", 1)[1]: v for k, v in ck.items() if k.startswith("optim/")}, traj.param_names)
        meta = traj._checkpoint_meta(last)
        scheduler = None
        if man.get("has_scheduler"):
            if scheduler_factory is None:
                raise TrajectoryError("this run used an lr scheduler: pass scheduler_factory=lambda opt: ... to resume it")
            scheduler = scheduler_factory(opt)
            if meta.get("scheduler"):
                scheduler.load_state_dict(safe_format.decode_scheduler_state(meta["scheduler"], scheduler.state_dict(), where=str(run_dir)))
        elif scheduler_factory is not None:
            scheduler = scheduler_factory(opt)
        for k, v in (meta.get("group") or {}).items():
            opt.param_groups[0][k] = tuple(v) if k == "betas" else v
        opt.param_groups[0]["foreach"] = False
        if "rng/torch" in ck:
            torch.set_rng_state(ck["rng/torch"])
        # drop records/manifest entries past the checkpoint
        man = dict(man)
        man["checkpoints"] = [c for c in man["checkpoints"] if c["step"] <= last]
        man["segments"] = [s for s in man["segments"] if s["stop"] <= last]
        man["num_steps"] = last
        man["format_version"] = FORMAT_VERSION  # v1 without pickled scheduler state (checked above) is v2
        for p in _our_temp_files(Path(run_dir)):
            p.unlink(missing_ok=True)
        return cls(
            model,
            opt,
            run_dir,
            None,
            traj.loss_fn,
            checkpoint_every=man["checkpoint_every"],
            scheduler=scheduler,
            clip_grad_norm=man["clip_grad_norm"],
            model_factory=traj._model_factory,
            _resume={"manifest": man, "train_data": traj.train_data, "columns": traj._columns, "lock": lock},
        )

    # ---------------------------------------------------------------- stepping

    def batch(self, batch_ids: Tensor | None) -> dict[str, Tensor]:
        """Rows ``batch_ids`` of the (saved) training set as tensors."""
        return gather_batch(self._columns, batch_ids)

    def step(self, batch_ids: Any = None, *, scheduler_metric: Any = None) -> float:
        """One recorded optimizer step on the training examples ``batch_ids`` (atomic).

        Everything that can be checked is checked before the step (ids, the scheduler metric,
        the optimizer's settings); a failure after ``optimizer.step()`` (the scheduler raising,
        a full disk while writing the checkpoint) restores the parameters, the optimizer state
        and hyper-parameters and the scheduler from a snapshot taken just before it.

        Args:
            batch_ids: 1-d integer ids (row indices) or ``None`` for the full training set.
            scheduler_metric: Required with ``ReduceLROnPlateau`` (and refused otherwise): the
                number passed to its ``step()`` after this step, or ``"loss"`` for this
                batch's mean loss.

        Returns:
            The batch's mean loss (before the step).

        Raises:
            RecordingError: bad ids, missing/bad ``scheduler_metric``, an optimizer setting that
                cannot change mid-run was changed, bad loss shape, non-finite loss/gradients, or
                the scheduler failed. The model, optimizer and scheduler are as before the step
                and the run directory is valid up to its last checkpoint.
            StorageError: writing the checkpoint failed (names the file, the errno and the last
                valid step); the step was undone as above and can be repeated.
            NondeterministicTrainingError: on the first step, if ``loss_fn`` is random.
        """
        self._check_open()
        s = self.num_steps
        if batch_ids is None:
            ids = None
        else:
            ids = check_batch_ids(batch_ids, self.num_train)
            if ids.numel() == self.num_train and torch.equal(ids, torch.arange(self.num_train)):
                ids = None
        metric = self._check_scheduler_metric(scheduler_metric, s)
        hparams = self._check_optimizer(s)
        batch = self.batch(ids)
        check_no_dropout(self.model)
        if not self._probed:
            with torch_threads(self.num_threads):
                determinism_probe(self.model, self.loss_fn, batch)
            self._probed = True
        snap: dict[str, Any] = {}
        phase = "optimizer.step()"
        try:
            with torch_threads(self.num_threads):
                out = train_step(
                    self.model, self.optimizer, self.params, self.loss_fn, batch, self.clip_grad_norm,
                    before_step=lambda: snap.update(self._snapshot()),
                )
            if self.scheduler is not None:
                phase = "scheduler.step()"
                if metric is None:
                    self.scheduler.step()
                else:
                    self.scheduler.step(out.loss if metric == "loss" else metric)
            phase = "writing the checkpoint"
            self._records.append(
                {
                    "step": s,
                    "clip_factor": out.clip_factor,
                    "loss": out.loss,
                    "batch_ids": None if ids is None else ids.tolist(),
                    **hparams,
                }
            )
            self.num_steps = s + 1
            if self.num_steps % self.checkpoint_every == 0:
                self._write_checkpoint()
        except BaseException as exc:
            if not snap:  # failed before optimizer.step(): nothing changed
                raise
            self._rollback(snap, s)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt & co: state restored, re-raised as is
            raise self._step_error(exc, s, phase) from exc
        return out.loss

    def _check_open(self) -> None:
        if self._closed:
            raise RecordingError("this recorder is closed")
        if self._lock is not None and not self._lock.held:
            raise RecordingError(
                f"this recorder released its lock on {self.run_dir} (it left a with-block on an error or was "
                "aborted): continue with TrajectoryRecorder.resume(run_dir)"
            )

    def _check_scheduler_metric(self, metric: Any, s: int) -> float | str | None:
        """Validate ``scheduler_metric`` before step ``s``; ``"loss"``, a float, or ``None``."""
        plateau = _is_plateau(self.scheduler)
        if metric is None:
            if plateau:
                raise RecordingError(
                    f"the scheduler is ReduceLROnPlateau, whose step() needs a metric: call "
                    f"rec.step(ids, scheduler_metric=<validation loss>) or scheduler_metric='loss' (this "
                    f"batch's loss); step {s} was not taken"
                )
            return None
        if not plateau:
            raise RecordingError(
                f"scheduler_metric is only for a ReduceLROnPlateau scheduler (this recorder's is "
                f"{type(self.scheduler).__name__ if self.scheduler is not None else 'None'}); step {s} was not taken"
            )
        if isinstance(metric, str):
            if metric != "loss":
                raise RecordingError(f"scheduler_metric must be a number or 'loss', got {metric!r}; step {s} was not taken")
            return metric
        if isinstance(metric, Tensor):
            if metric.numel() != 1:
                raise RecordingError(f"scheduler_metric must be one number, got a tensor of shape {tuple(metric.shape)}; step {s} was not taken")
            metric = metric.item()
        if isinstance(metric, bool) or not isinstance(metric, (int, float)) and not hasattr(metric, "__float__"):
            raise RecordingError(f"scheduler_metric must be a number or 'loss', got {type(metric).__name__}; step {s} was not taken")
        value = float(metric)
        if not math.isfinite(value):
            raise RecordingError(f"scheduler_metric is not finite ({value}); step {s} was not taken")
        return value

    def _check_optimizer(self, s: int) -> dict[str, float]:
        """Refuse settings that changed in a way replay cannot follow; the step's hyper-parameters."""
        now = fixed_settings(self.optimizer)
        if now != self._fixed:
            for key in list(self._fixed) + [k for k in now if k not in self._fixed]:
                was, new = self._fixed.get(key, "<unset>"), now.get(key, "<unset>")
                if was != new:
                    what = (
                        "the optimizer's param groups changed (parameters added, removed or replaced)"
                        if key == "parameters of the param group"
                        else f"the optimizer's {key} changed from {was!r} to {new!r}"
                    )
                    raise RecordingError(
                        f"{what} before step {s}: it fixes the form of the update and cannot change during a "
                        f"recorded run (step {s} was not taken; nothing changed). Between steps only lr, "
                        "betas, eps, weight_decay (Adam/AdamW) and lr, momentum, dampening, weight_decay "
                        "(SGD) may change; start a new run for anything else"
                    )
        frozen = [n for n, p in zip(self.param_names, self.params) if not p.requires_grad]
        if frozen:
            raise RecordingError(
                f"parameters {frozen[:5]} were frozen (requires_grad=False) during the run; the set of trained "
                f"parameters cannot change (step {s} was not taken)"
            )
        try:
            return step_hparams(self.optimizer, self.spec.kind)
        except UnsupportedOptimizerError as exc:
            raise RecordingError(f"before step {s}: {exc} (step {s} was not taken; nothing changed)") from exc

    def _snapshot(self) -> dict[str, Any]:
        """Parameters, optimizer state and hyper-parameters, scheduler state (just before the step)."""
        opt = self.optimizer
        state = {}
        for i, p in enumerate(self.params):
            st = opt.state.get(p)
            if st:
                state[i] = {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in st.items()}
        return {
            "params": [p.detach().clone() for p in self.params],
            "state": state,
            "group": {k: v for k, v in opt.param_groups[0].items() if k != "params"},
            "scheduler": copy.deepcopy(self.scheduler.state_dict()) if self.scheduler is not None else None,
        }

    def _rollback(self, snap: dict[str, Any], s: int) -> None:
        """Undo step ``s`` after ``optimizer.step()``: restore ``snap`` and drop its record."""
        opt = self.optimizer
        with torch.no_grad():
            for p, w in zip(self.params, snap["params"]):
                p.copy_(w)
                p.grad = None
        for i, p in enumerate(self.params):
            if i in snap["state"]:
                opt.state[p] = snap["state"][i]
            else:
                opt.state.pop(p, None)
        group = opt.param_groups[0]
        for k in [k for k in group if k != "params" and k not in snap["group"]]:
            del group[k]
        group.update(snap["group"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(snap["scheduler"])
        self._records = [r for r in self._records if r["step"] < s]
        self.num_steps = s

    def _step_error(self, exc: Exception, s: int, phase: str) -> Exception:
        undone = (
            f"; step {s} was not recorded: the model, optimizer and scheduler were restored to before it "
            f"(fix the cause and call step() again, or continue later with TrajectoryRecorder.resume(run_dir))"
        )
        if isinstance(exc, StorageError):
            return StorageError(exc.message + undone, exc.errno, exc.filename)
        if isinstance(exc, ExplaindError):
            try:
                return type(exc)(f"{exc}{undone}")
            except TypeError:
                pass
        return RecordingError(
            f"{phase} failed at step {s} ({type(exc).__name__}: {exc}); the run is valid up to step "
            f"{self.last_checkpoint}{undone}"
        )

    # ---------------------------------------------------------------- writing

    @property
    def last_checkpoint(self) -> int:
        """Step of the last written checkpoint."""
        return self.manifest["checkpoints"][-1]["step"]

    def checkpoint(self) -> None:
        """Write the pending step records and a checkpoint now (no-op if already at one).

        Raises:
            StorageError: a write failed; the run directory is valid up to its last checkpoint
                and the recorder still holds the pending steps (call again once fixed).
        """
        self._check_open()
        if self.manifest["checkpoints"] and self.last_checkpoint == self.num_steps:
            return
        self._write_checkpoint()

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        try:
            storage.write_json(self.run_dir / MANIFEST, manifest)
        except OSError as exc:
            if isinstance(exc, ExplaindError):
                raise
            cks = manifest.get("checkpoints") or []
            raise _storage_error(exc, self.run_dir / MANIFEST, cks[-1]["step"] if cks else None) from exc

    def _write_checkpoint(self, initial: bool = False) -> None:
        """Write the pending records, a checkpoint and the manifest; commit only when all succeeded."""
        step = self.num_steps
        valid = self.manifest["checkpoints"][-1]["step"] if self.manifest["checkpoints"] else None
        tensors: dict[str, Tensor] = {}
        for n, p in zip(self.param_names, self.params):
            if not bool(torch.isfinite(p).all()):
                raise RecordingError(f"parameter {n} is not finite at step {step}; not writing a checkpoint (run valid up to step {valid})")
            tensors[f"param/{n}"] = p.detach()
        for k, v in optimizer_state_to_tensors(self.optimizer, self.param_names).items():
            tensors[f"optim/{k}"] = v
        tensors["rng/torch"] = torch.get_rng_state()
        if initial:
            for n, p in self.model.named_parameters():
                if not p.requires_grad:
                    tensors[f"frozen/{n}"] = p.detach()
            for n, b in self.model.named_buffers():
                tensors[f"buffer/{n}"] = b.detach()
        meta = {"step": str(step), "group": json.dumps(storage.to_jsonable(_group_hparams(self.optimizer)))}
        if self.scheduler is not None:
            meta["scheduler"] = safe_format.encode_scheduler_state(self.scheduler.state_dict())
        man = dict(self.manifest)
        target: Path | None = None
        try:
            if self._records:
                target = self.run_dir / self._segment_name()
                man["segments"] = [*man["segments"], self._write_segment(target)]
            ck_name = f"checkpoints/step_{step:08d}.safetensors"
            target = self.run_dir / ck_name
            sha = storage.save_tensors(target, tensors, meta)
            man["checkpoints"] = [*man["checkpoints"], {"step": step, "file": ck_name, "sha256": sha}]
            man["num_steps"] = step
            target = self.run_dir / MANIFEST
            storage.write_json(target, man)  # the commit point
        except OSError as exc:
            if isinstance(exc, ExplaindError):
                raise
            raise _storage_error(exc, target, valid) from exc
        self.manifest = man
        self._records = []

    def _segment_name(self) -> str:
        start, stop = self._records[0]["step"], self._records[-1]["step"] + 1
        return f"records/steps_{start:08d}_{stop:08d}.parquet"

    def _write_segment(self, path: Path) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        recs = self._records
        start, stop = recs[0]["step"], recs[-1]["step"] + 1
        cols = {
            "step": pa.array([r["step"] for r in recs], pa.int64()),
            "lr": pa.array([r["lr"] for r in recs], pa.float64()),
            "clip_factor": pa.array([r["clip_factor"] for r in recs], pa.float64()),
            "loss": pa.array([r["loss"] for r in recs], pa.float64()),
            "batch_ids": pa.array([r["batch_ids"] for r in recs], pa.list_(pa.int64())),
        }
        # the hyper-parameters each step used (schedulers and hand edits may change them)
        for c in HPARAM_COLUMNS[self.spec.kind]:
            cols[c] = pa.array([r[c] for r in recs], pa.float64())
        with storage.atomic_path(path) as tmp:
            pq.write_table(pa.table(cols), str(tmp))
        return {"start": start, "stop": stop, "file": path.relative_to(self.run_dir).as_posix(), "sha256": storage.sha256_file(path)}

    def close(self) -> None:
        """Write the final checkpoint, mark the run complete and release the lock (idempotent).

        Raises:
            StorageError: a write failed; the recorder stays open (call ``close()`` again once
                fixed, or :meth:`abort`).
        """
        if self._closed:
            return
        self.checkpoint()
        self._write_manifest({**self.manifest, "complete": True})
        self.manifest["complete"] = True
        self._closed = True
        self._release_lock()

    finish = close

    def abort(self) -> None:
        """Stop without writing anything more and release the lock.

        The run directory stays valid up to its last checkpoint (steps after it are dropped);
        continue it with :meth:`resume`.
        """
        self._closed = True
        self._release_lock()

    def _release_lock(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def __enter__(self) -> TrajectoryRecorder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:
            # on error (here or in close): leave the run valid up to its last checkpoint, unlocked
            self._release_lock()

    def __del__(self) -> None:
        self._release_lock()

    def trajectory(self, **kw: Any) -> Trajectory:
        """Load the recorded run (closes the recorder first)."""
        from explaind_tl.trajectory import Trajectory

        self.close()
        kw.setdefault("model_factory", self.model_factory)
        return Trajectory.load(self.run_dir, loss_fn=self.loss_fn, **kw)


# --------------------------------------------------------------------------------------------
# Convenience training loop
# --------------------------------------------------------------------------------------------


def batch_schedule(num_train: int, steps: int, batch_size: int | None, shuffle: bool = True, seed: int = 0) -> list[Tensor | None]:
    """Batch ids for ``steps`` steps: ``None`` (full batch) or reproducible minibatches.

    Minibatches walk through seeded random permutations (one per epoch, from a
    ``torch.Generator`` seeded with ``seed``); the last partial batch of an epoch is dropped
    unless the epoch has only one batch.
    """
    if batch_size is None or batch_size >= num_train and not shuffle:
        return [None] * steps
    batch_size = min(int(batch_size), num_train)
    gen = torch.Generator().manual_seed(int(seed))
    out: list[Tensor | None] = []
    per_epoch = max(1, num_train // batch_size)
    while len(out) < steps:
        perm = torch.randperm(num_train, generator=gen) if shuffle else torch.arange(num_train)
        for b in range(per_epoch):
            if len(out) >= steps:
                break
            out.append(perm[b * batch_size : (b + 1) * batch_size].clone())
    return out


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: Any,
    loss_fn: LossFn,
    steps: int,
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    run_dir: str | os.PathLike = "runs/run",
    checkpoint_every: int = 100,
    scheduler: Any = None,
    clip_grad_norm: float | None = None,
    callback: Callable[[int, nn.Module], Mapping[str, float] | None] | None = None,
    callback_every: int = 100,
    progress: bool = True,
    model_factory: Callable[[], nn.Module] | None = None,
    overwrite: bool = False,
    num_threads: int | None = 1,
    scheduler_metric: str | Callable[[int, nn.Module], float] = "loss",
) -> Trajectory:
    """Train ``model`` for ``steps`` recorded steps and return the :class:`Trajectory`.

    Args:
        model: Model to train (in place).
        optimizer: Supported optimizer over its trainable parameters.
        train_data: Training set (see :func:`prepare_train_data`).
        loss_fn: Per-example loss function.
        steps: Number of optimizer steps.
        batch_size: ``None`` for full-batch training, else minibatch size.
        shuffle: Shuffle minibatches (seeded, reproducible).
        seed: Seed of the minibatch generator.
        run_dir: Where to record.
        checkpoint_every: Checkpoint interval ``K``.
        scheduler: Optional lr scheduler (stepped every step; ``ReduceLROnPlateau`` gets
            ``scheduler_metric``).
        clip_grad_norm: Optional global-norm clipping.
        callback: ``callback(step, model) -> dict | None`` called after steps
            ``callback_every, 2*callback_every, ...`` and the last (``step`` = number of
            steps done); returned dicts are shown in the progress bar and saved to
            ``run_dir/metrics.csv`` (also available as ``trajectory.metrics``).
        callback_every: Interval of ``callback`` calls.
        progress: Show a tqdm progress bar.
        model_factory: For non-HookedTransformer models.
        overwrite: Replace a recorded run in ``run_dir`` (only its files; see
            :class:`TrajectoryRecorder`).
        num_threads: CPU threads of each recorded step (see :class:`TrajectoryRecorder`).
        scheduler_metric: For ``ReduceLROnPlateau`` only: ``"loss"`` (each step's batch loss,
            the default) or ``metric(step, model) -> float`` called before each step (``step`` =
            steps done; e.g. a validation loss).
    """
    from tqdm.auto import tqdm

    rec = TrajectoryRecorder(
        model,
        optimizer,
        run_dir,
        train_data,
        loss_fn,
        checkpoint_every=checkpoint_every,
        scheduler=scheduler,
        clip_grad_norm=clip_grad_norm,
        model_factory=model_factory,
        overwrite=overwrite,
        num_threads=num_threads,
    )
    schedule = batch_schedule(rec.num_train, steps, batch_size, shuffle, seed)
    metrics: list[dict[str, Any]] = []
    bar = tqdm(total=steps, disable=not progress, desc="train")
    postfix: dict[str, Any] = {}
    plateau = _is_plateau(scheduler)
    try:
        for s in range(steps):
            metric = None
            if plateau:
                if callable(scheduler_metric):
                    was_training = model.training
                    metric = scheduler_metric(s, model)
                    model.train(was_training)
                else:
                    metric = scheduler_metric
            loss = rec.step(schedule[s], scheduler_metric=metric)
            postfix["loss"] = f"{loss:.4g}"
            done = s + 1
            if callback is not None and (done % callback_every == 0 or done == steps):
                was_training = model.training
                result = callback(done, model)
                model.train(was_training)
                if result:
                    metrics.append({"step": done, "loss": loss, **dict(result)})
                    postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in result.items()})
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        if metrics:  # written while the run is still locked
            import pandas as pd

            with storage.atomic_path(Path(run_dir) / METRICS) as tmp:
                pd.DataFrame(metrics).to_csv(tmp, index=False)
        rec.close()
    except BaseException:
        rec.abort()  # valid up to its last checkpoint, unlocked (resume continues it)
        raise
    finally:
        bar.close()
    traj = rec.trajectory()
    traj.metrics = metrics
    return traj
