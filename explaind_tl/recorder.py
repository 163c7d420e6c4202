"""Recording training runs so that every step can be replayed exactly (DESIGN §5).

:class:`TrajectoryRecorder` wraps a model, a supported optimizer and a training set. Each
:meth:`TrajectoryRecorder.step` runs one optimizer step on the given training examples and
records ``(batch ids, lr, clip factor, loss)``; every ``checkpoint_every`` steps (and at the
end) it writes a full checkpoint (parameters + optimizer state + RNG) and the step records of
the segment since the previous checkpoint, then atomically rewrites ``manifest.json``. The
manifest lists only complete files, so a crash leaves a valid run up to its last checkpoint,
and :meth:`TrajectoryRecorder.resume` continues from there.

Recording and replay (:class:`explaind_tl.trajectory.Trajectory`) share :func:`train_step`,
use torch's single-tensor optimizer code (``foreach=False``), the same batch tensors and the
same number of CPU threads, so replay on the same machine is bitwise identical. The recorded
steps run single-threaded by default: multi-threaded CPU kernels are not bitwise reproducible
(their results depend on memory alignment and scheduling), and a small-lr Adam run amplifies a
1e-8 difference in one step's gradient into 1e-2 parameter differences within 100 steps.

:func:`train` is a convenience loop (full batch or seeded shuffled minibatches) on top.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from explaind_tl import storage
from explaind_tl.errors import ExplaindError, NondeterministicTrainingError, TrajectoryError
from explaind_tl.models import import_path, model_spec, param_signature
from explaind_tl.optim import (
    OptimizerSpec,
    force_single_tensor,
    optimizer_state_to_tensors,
    spec_from_optimizer,
)

if TYPE_CHECKING:
    import datasets

    from explaind_tl.trajectory import Trajectory

FORMAT = "explaind_tl.trajectory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_DIR = "train_data"
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
    if tmp.exists():
        shutil.rmtree(tmp)
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
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return storage.sha256_tree(dest)


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


def _pickle_b64(obj: Any) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _unpickle_b64(s: str) -> Any:
    return torch.load(io.BytesIO(base64.b64decode(s)), weights_only=False)


def _group_hparams(opt: torch.optim.Optimizer) -> dict[str, Any]:
    g = opt.param_groups[0]
    return {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, type(None), tuple, list, str))}


# --------------------------------------------------------------------------------------------
# The recorder
# --------------------------------------------------------------------------------------------


class TrajectoryRecorder:
    """Records a training run into ``run_dir`` for exact replay.

    Args:
        model: The model (a ``HookedTransformer``, or any module with ``model_factory``).
        optimizer: ``AdamW``, ``Adam`` or ``SGD`` over exactly the trainable parameters
            (its ``foreach`` is set to False: replay uses the same single-tensor code).
        run_dir: New or empty directory.
        train_data: ``datasets.Dataset`` / dict of tensors / tensor (see
            :func:`prepare_train_data`).
        loss_fn: ``loss_fn(model, batch) -> [B]`` per-example losses; stored by import path
            when importable, else :meth:`Trajectory.load` needs ``loss_fn=``.
        checkpoint_every: ``K``: full checkpoint every K steps (and at the end).
        scheduler: Optional lr scheduler, stepped after every optimizer step.
        clip_grad_norm: Optional global-norm clipping threshold (applied by the recorder).
        model_factory: Zero-argument callable rebuilding ``model`` (needed unless a
            ``HookedTransformer``); stored by import path.
        overwrite: Allow a non-empty ``run_dir`` (its contents are deleted).
        num_threads: torch CPU threads used inside each recorded step (and by replay).
            The default 1 makes replay bitwise exact; ``None`` keeps torch's current setting,
            which on CPU usually makes replay drift (``Trajectory.verify()`` measures it and
            :func:`explaind_tl.explain` reports it as ``meta["replay_mismatch"]``).

    Use as a context manager, or call :meth:`close` when done.
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
        if int(checkpoint_every) < 1:
            raise RecordingError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if clip_grad_norm is not None and not (clip_grad_norm > 0 and math.isfinite(clip_grad_norm)):
            raise RecordingError(f"clip_grad_norm must be a positive number, got {clip_grad_norm}")
        self.run_dir = Path(run_dir)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.checkpoint_every = int(checkpoint_every)
        self.spec: OptimizerSpec = spec_from_optimizer(optimizer, model)
        force_single_tensor(optimizer)
        check_no_dropout(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._records: list[dict[str, Any]] = []
        self._probed = False
        self._closed = False

        if num_threads is not None and int(num_threads) < 1:
            raise RecordingError(f"num_threads must be >= 1 or None, got {num_threads}")
        self.num_threads = None if num_threads is None else int(num_threads)

        if _resume is not None:
            self.manifest = _resume["manifest"]
            self.num_threads = self.manifest.get("torch_num_threads")
            self.train_data = _resume["train_data"]
            self._columns = _resume["columns"]
            self.num_train = len(self.train_data)
            self.num_steps = int(self.manifest["num_steps"])
            self.manifest["complete"] = False
            storage.write_json(self.run_dir / MANIFEST, self.manifest)
            return

        mspec = model_spec(model, model_factory)
        ds = prepare_train_data(train_data)
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not overwrite:
                raise TrajectoryError(f"run directory {self.run_dir} is not empty (pass overwrite=True to replace it)")
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        (self.run_dir / "records").mkdir(exist_ok=True)

        data_files = save_train_data(ds, self.run_dir / DATA_DIR)
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
    ) -> TrajectoryRecorder:
        """A recorder positioned at the last checkpoint of ``run_dir``.

        Parameters, optimizer state, scheduler state and the torch RNG are restored; step
        records after the checkpoint are discarded.

        Args:
            run_dir: An existing run directory.
            model: The model object to continue training (its parameters are overwritten);
                rebuilt from the manifest if omitted.
            optimizer_factory: ``params -> optimizer``; default rebuilds it from the stored spec.
            scheduler_factory: ``optimizer -> scheduler``; required if the run had a scheduler.
            loss_fn: Required if the recorded loss_fn is not importable.
            model_factory: Required if the recorded model factory is not importable.
        """
        from explaind_tl.models import check_model_matches
        from explaind_tl.optim import build_optimizer, load_optimizer_state
        from explaind_tl.trajectory import Trajectory

        traj = Trajectory.load(run_dir, loss_fn=loss_fn, model_factory=model_factory, check=True)
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
        if {**spec.to_dict(), "lr": 0} != {**traj.optimizer_spec.to_dict(), "lr": 0}:
            raise TrajectoryError(f"optimizer {spec} does not match the recorded {traj.optimizer_spec}")
        force_single_tensor(opt)
        load_optimizer_state(opt, {k.split("/", 1)[1]: v for k, v in ck.items() if k.startswith("optim/")}, traj.param_names)
        meta = traj._checkpoint_meta(last)
        scheduler = None
        if man.get("has_scheduler"):
            if scheduler_factory is None:
                raise TrajectoryError("this run used an lr scheduler: pass scheduler_factory=lambda opt: ... to resume it")
            scheduler = scheduler_factory(opt)
            if meta.get("scheduler"):
                scheduler.load_state_dict(_unpickle_b64(meta["scheduler"]))
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
        for p in Path(run_dir).rglob(".*.tmp"):
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
            _resume={"manifest": man, "train_data": traj.train_data, "columns": traj._columns},
        )

    # ---------------------------------------------------------------- stepping

    def batch(self, batch_ids: Tensor | None) -> dict[str, Tensor]:
        """Rows ``batch_ids`` of the (saved) training set as tensors."""
        return gather_batch(self._columns, batch_ids)

    def step(self, batch_ids: Any = None) -> float:
        """One recorded optimizer step on the training examples ``batch_ids``.

        Args:
            batch_ids: 1-d integer ids (row indices) or ``None`` for the full training set.

        Returns:
            The batch's mean loss (before the step).

        Raises:
            RecordingError: bad ids, bad loss shape, non-finite loss/gradients. The model and
                optimizer are unchanged and the run directory is valid up to its last checkpoint.
            NondeterministicTrainingError: on the first step, if ``loss_fn`` is random.
        """
        if self._closed:
            raise RecordingError("this recorder is closed")
        if batch_ids is None:
            ids = None
        else:
            ids = check_batch_ids(batch_ids, self.num_train)
            if ids.numel() == self.num_train and torch.equal(ids, torch.arange(self.num_train)):
                ids = None
        batch = self.batch(ids)
        check_no_dropout(self.model)
        if not self._probed:
            with torch_threads(self.num_threads):
                determinism_probe(self.model, self.loss_fn, batch)
            self._probed = True
        with torch_threads(self.num_threads):
            out = train_step(self.model, self.optimizer, self.params, self.loss_fn, batch, self.clip_grad_norm)
        if self.scheduler is not None:
            self.scheduler.step()
        self._records.append(
            {
                "step": self.num_steps,
                "lr": out.lr,
                "clip_factor": out.clip_factor,
                "loss": out.loss,
                "batch_ids": None if ids is None else ids.tolist(),
            }
        )
        self.num_steps += 1
        if self.num_steps % self.checkpoint_every == 0:
            self.checkpoint()
        return out.loss

    # ---------------------------------------------------------------- writing

    @property
    def last_checkpoint(self) -> int:
        """Step of the last written checkpoint."""
        return self.manifest["checkpoints"][-1]["step"]

    def checkpoint(self) -> None:
        """Write the pending step records and a checkpoint now (no-op if already at one)."""
        if self.manifest["checkpoints"] and self.last_checkpoint == self.num_steps:
            return
        self._write_checkpoint()

    def _write_checkpoint(self, initial: bool = False) -> None:
        step = self.num_steps
        tensors: dict[str, Tensor] = {}
        for n, p in zip(self.param_names, self.params):
            if not bool(torch.isfinite(p).all()):
                raise RecordingError(f"parameter {n} is not finite at step {step}; not writing a checkpoint (run valid up to step {self.last_checkpoint})")
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
            meta["scheduler"] = _pickle_b64(self.scheduler.state_dict())
        seg_entry = None
        if self._records:
            seg_entry = self._write_segment()
        ck_name = f"checkpoints/step_{step:08d}.safetensors"
        sha = storage.save_tensors(self.run_dir / ck_name, tensors, meta)
        if seg_entry is not None:
            self.manifest["segments"].append(seg_entry)
        self.manifest["checkpoints"].append({"step": step, "file": ck_name, "sha256": sha})
        self.manifest["num_steps"] = step
        storage.write_json(self.run_dir / MANIFEST, self.manifest)
        self._records = []

    def _write_segment(self) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        recs = self._records
        start, stop = recs[0]["step"], recs[-1]["step"] + 1
        table = pa.table(
            {
                "step": pa.array([r["step"] for r in recs], pa.int64()),
                "lr": pa.array([r["lr"] for r in recs], pa.float64()),
                "clip_factor": pa.array([r["clip_factor"] for r in recs], pa.float64()),
                "loss": pa.array([r["loss"] for r in recs], pa.float64()),
                "batch_ids": pa.array([r["batch_ids"] for r in recs], pa.list_(pa.int64())),
            }
        )
        name = f"records/steps_{start:08d}_{stop:08d}.parquet"
        with storage.atomic_path(self.run_dir / name) as tmp:
            pq.write_table(table, str(tmp))
        return {"start": start, "stop": stop, "file": name, "sha256": storage.sha256_file(self.run_dir / name)}

    def close(self) -> None:
        """Write the final checkpoint and mark the run complete (idempotent)."""
        if self._closed:
            return
        self.checkpoint()
        self.manifest["complete"] = True
        storage.write_json(self.run_dir / MANIFEST, self.manifest)
        self._closed = True

    finish = close

    def __enter__(self) -> TrajectoryRecorder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        # on error: leave the run valid up to its last checkpoint

    def trajectory(self, **kw: Any) -> Trajectory:
        """Load the recorded run (closes the recorder first)."""
        from explaind_tl.trajectory import Trajectory

        self.close()
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
        scheduler: Optional lr scheduler (stepped every step).
        clip_grad_norm: Optional global-norm clipping.
        callback: ``callback(step, model) -> dict | None`` called after steps
            ``callback_every, 2*callback_every, ...`` and the last (``step`` = number of
            steps done); returned dicts are shown in the progress bar and saved to
            ``run_dir/metrics.csv`` (also available as ``trajectory.metrics``).
        callback_every: Interval of ``callback`` calls.
        progress: Show a tqdm progress bar.
        model_factory: For non-HookedTransformer models.
        overwrite: Replace a non-empty ``run_dir``.
        num_threads: CPU threads of each recorded step (see :class:`TrajectoryRecorder`).
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
    try:
        for s in range(steps):
            loss = rec.step(schedule[s])
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
        rec.close()
    finally:
        bar.close()
    if metrics:
        import pandas as pd

        with storage.atomic_path(Path(run_dir) / "metrics.csv") as tmp:
            pd.DataFrame(metrics).to_csv(tmp, index=False)
    traj = rec.trajectory()
    traj.metrics = metrics
    return traj
