"""Recording training runs so that every step can be replayed exactly (docs/design.md §5).

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
taken just before it; :mod:`explaind_tl.run.atomic`). One recorder writes a run directory at a time (an OS lock,
:class:`explaind_tl.run.storage.RunLock`), and ``overwrite=True`` only ever deletes the files of a
recorded run, never other files.

Recording and replay (:class:`explaind_tl.run.trajectory.Trajectory`) share
:func:`explaind_tl.run.step.train_step`,
use torch's single-tensor optimizer code (``foreach=False``), the same batch tensors and the
same number of CPU threads, so replay on the same machine is bitwise identical. The recorded
steps run single-threaded by default: multi-threaded CPU kernels are not bitwise reproducible
(their results depend on memory alignment and scheduling), and a small-lr Adam run amplifies a
1e-8 difference in one step's gradient into 1e-2 parameter differences within 100 steps.

:func:`explaind_tl.run.training.train` is a convenience loop (full batch or seeded shuffled
minibatches) on top. What the files hold is :mod:`explaind_tl.run.format`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from explaind_tl.errors import (
    ExplaindError,
    RecordingError,
    TrajectoryError,
)
from explaind_tl.model.spec import check_model_matches, import_path, model_spec, param_signature
from explaind_tl.optim import (
    HPARAM_COLUMNS,
    OptimizerSpec,
    build_optimizer,
    fixed_settings,
    force_single_tensor,
    load_optimizer_state,
    optimizer_state_to_tensors,
    spec_from_optimizer,
    step_hparams,
)
from explaind_tl.run import storage
from explaind_tl.run.atomic import (
    check_optimizer,
    check_scheduler_metric,
    restore,
    snapshot,
    step_error,
)
from explaind_tl.run.checks import load_train_data
from explaind_tl.run.codec import decode_scheduler_state, encode_scheduler_state
from explaind_tl.run.data import (
    check_batch_ids,
    dataset_columns,
    gather_batch,
    prepare_train_data,
    save_train_data,
)
from explaind_tl.run.format import (
    CHECKPOINT_DIR,
    DATA_DIR,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    RECORDS_DIR,
    checkpoint_metadata,
    checkpoint_name,
    checkpoint_optimizer_tensors,
    initial_tensors,
    package_versions,
    records_name,
    write_records,
)
from explaind_tl.run.rundir import clear_run_dir, our_temp_files, prepare_run_dir, storage_error
from explaind_tl.run.step import (
    LossFn,
    check_no_dropout,
    determinism_probe,
    deterministic_algorithms,
    recording_device,
    torch_threads,
    train_step,
)
from explaind_tl.run.trajectory import Trajectory

__all__ = ["RecordingError", "TrajectoryRecorder"]


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
            :func:`explaind_tl.run.data.prepare_train_data`).
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
        deterministic: run each recorded step (and its replay) with PyTorch's deterministic
            algorithms (:func:`explaind_tl.run.step.deterministic_algorithms`); default: on when
            the model is on a GPU, whose atomics-based kernels otherwise differ from run to run.
            An op without a deterministic implementation then raises
            :class:`~explaind_tl.errors.NondeterministicTrainingError` naming it (nothing is
            recorded). The model's device (``"cpu"``/``"cuda"``) is recorded; batches are moved
            to it, and :meth:`Trajectory.load` replays there.

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
        deterministic: bool | None = None,
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
        self.device, self.deterministic = recording_device(self.params, deterministic, (_resume or {}).get("manifest"))

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
        self._lock = prepare_run_dir(self.run_dir, overwrite)
        try:
            target = self.run_dir
            try:
                for sub in (CHECKPOINT_DIR, RECORDS_DIR):
                    target = self.run_dir / sub
                    target.mkdir(exist_ok=True)
                target = self.run_dir / DATA_DIR
                data_files = save_train_data(ds, target)
            except OSError as exc:
                if isinstance(exc, ExplaindError):
                    raise
                raise storage_error(exc, target, None) from exc
            self.train_data = load_train_data(self.run_dir / DATA_DIR, data_files)
            self._columns = dataset_columns(self.train_data)
            self.num_train = len(self.train_data)
            self.num_steps = 0
            self.manifest: dict[str, Any] = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "versions": package_versions(),
                "torch_num_threads": self.num_threads or torch.get_num_threads(),
                "device": self.device.type,
                "deterministic": self.deterministic,
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
                clear_run_dir(self.run_dir)
                for sub in (CHECKPOINT_DIR, RECORDS_DIR):
                    with contextlib.suppress(OSError):
                        (self.run_dir / sub).rmdir()
            self._release_lock()
            raise

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
                once with ``python -m explaind_tl.run.migrate RUN_DIR``.
            UntrustedCodeError: as :meth:`Trajectory.load`.
        """
        run_dir = Path(run_dir)
        lock = storage.RunLock.acquire(run_dir) if run_dir.is_dir() else None
        try:
            return cls._resume_locked(run_dir, lock, model, optimizer_factory, scheduler_factory, loss_fn, model_factory,
                                      trust_remote_code)
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
        traj = Trajectory.load(run_dir, loss_fn=loss_fn, model_factory=model_factory, check=True,
                               trust_remote_code=trust_remote_code)
        man = traj.manifest
        if model is None:
            model = traj.build_model()
        else:
            check_model_matches(model, man)
        model.train(man.get("model_training", True))
        last = traj.checkpoint_steps[-1]
        traj.load_into(model, last)
        named = dict(model.named_parameters())
        params = [named[n] for n in traj.param_names]
        opt = optimizer_factory(params) if optimizer_factory is not None else build_optimizer(traj.optimizer_spec, params)
        spec = spec_from_optimizer(opt, model)
        # hyper-parameters may change during a run (they are restored from the checkpoint below);
        # the kind and the form of the update may not
        rec_spec = traj.optimizer_spec
        if (spec.kind, spec.nesterov, spec.momentum != 0) != (rec_spec.kind, rec_spec.nesterov, rec_spec.momentum != 0):
            raise TrajectoryError(f"optimizer {spec} does not match the recorded {rec_spec}")
        force_single_tensor(opt)
        ck = traj.checkpoint(last)
        load_optimizer_state(opt, checkpoint_optimizer_tensors(ck), traj.param_names)
        meta = traj.checkpoint_metadata(last)
        scheduler = None
        if man.get("has_scheduler"):
            if scheduler_factory is None:
                raise TrajectoryError("this run used an lr scheduler: pass scheduler_factory=lambda opt: ... to resume it")
            scheduler = scheduler_factory(opt)
            if meta.get("scheduler"):
                scheduler.load_state_dict(decode_scheduler_state(meta["scheduler"], scheduler.state_dict(), where=str(run_dir)))
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
        for p in our_temp_files(Path(run_dir)):
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
            model_factory=traj.model_factory,
            _resume={"manifest": man, "train_data": traj.train_data, "columns": traj.train_columns, "lock": lock},
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
        metric = check_scheduler_metric(self.scheduler, scheduler_metric, s)
        hparams = check_optimizer(self.optimizer, self.spec.kind, self._fixed, self.param_names, self.params, s)
        batch = {k: v.to(self.device) for k, v in self.batch(ids).items()}
        check_no_dropout(self.model)
        if not self._probed:
            with torch_threads(self.num_threads), deterministic_algorithms(self.deterministic, f"step {s}"):
                determinism_probe(self.model, self.loss_fn, batch)
            self._probed = True
        snap: dict[str, Any] = {}
        phase = "optimizer.step()"
        try:
            with torch_threads(self.num_threads), deterministic_algorithms(self.deterministic, f"step {s}"):
                out = train_step(
                    self.model, self.optimizer, self.params, self.loss_fn, batch, self.clip_grad_norm,
                    before_step=lambda: snap.update(snapshot(self.params, self.optimizer, self.scheduler)),
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
            restore(snap, self.params, self.optimizer, self.scheduler)
            self._records = [r for r in self._records if r["step"] < s]
            self.num_steps = s
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt & co: state restored, re-raised as is
            raise step_error(exc, s, phase, self.last_checkpoint) from exc
        return out.loss

    def _check_open(self) -> None:
        if self._closed:
            raise RecordingError("this recorder is closed")
        if self._lock is not None and not self._lock.held:
            raise RecordingError(
                f"this recorder released its lock on {self.run_dir} (it left a with-block on an error or was "
                "aborted): continue with TrajectoryRecorder.resume(run_dir)"
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
            raise storage_error(exc, self.run_dir / MANIFEST, cks[-1]["step"] if cks else None) from exc

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
            tensors.update(initial_tensors(self.model))
        sched = None if self.scheduler is None else encode_scheduler_state(self.scheduler.state_dict())
        meta = checkpoint_metadata(step, self.optimizer, sched)
        man = dict(self.manifest)
        target: Path | None = None
        try:
            if self._records:
                start, stop = self._records[0]["step"], self._records[-1]["step"] + 1
                rel = records_name(start, stop)
                target = self.run_dir / rel
                write_records(target, self._records, HPARAM_COLUMNS[self.spec.kind])
                entry = {"start": start, "stop": stop, "file": rel, "sha256": storage.sha256_file(target)}
                man["segments"] = [*man["segments"], entry]
            rel = checkpoint_name(step)
            target = self.run_dir / rel
            sha = storage.save_tensors(target, tensors, meta)
            man["checkpoints"] = [*man["checkpoints"], {"step": step, "file": rel, "sha256": sha}]
            man["num_steps"] = step
            target = self.run_dir / MANIFEST
            storage.write_json(target, man)  # the commit point
        except OSError as exc:
            if isinstance(exc, ExplaindError):
                raise
            raise storage_error(exc, target, valid) from exc
        self.manifest = man
        self._records = []

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
        self.close()
        kw.setdefault("model_factory", self.model_factory)
        return Trajectory.load(self.run_dir, loss_fn=self.loss_fn, **kw)
