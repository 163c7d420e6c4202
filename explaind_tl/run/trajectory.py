"""Loading recorded runs and replaying them exactly (docs/design.md §5).

A :class:`Trajectory` reads a run directory written by
:class:`explaind_tl.run.recorder.TrajectoryRecorder`, validates it (manifest, sha256 of every
listed file) and reproduces any step by replaying from the nearest checkpoint with the shared
:func:`explaind_tl.run.step.train_step`: same model code, same batch tensors, same optimizer
implementation (``foreach=False``), the recorded hyper-parameters (``lr``, and ``betas``,
``eps``, ``weight_decay`` / ``momentum``, ``dampening``, ``weight_decay``) set before each step.
Runs recorded before those were stored per step replay with the manifest's constant values.
On the machine and thread count used for recording (one thread by default, stored in the
manifest and re-applied during replay) replay is bitwise identical; :meth:`Trajectory.verify`
checks this against every checkpoint, and :meth:`Trajectory.segments` compares each replayed
segment's end with its checkpoint (``replay_mismatch``, :class:`ReplayMismatchWarning`, which
names the first step whose replayed loss differs from the recorded one).
"""

from __future__ import annotations

import collections
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from explaind_tl.errors import ReplayMismatchWarning, TrajectoryError
from explaind_tl.model import move_model
from explaind_tl.model.spec import build_model, check_model_matches
from explaind_tl.optim import (
    HPARAM_COLUMNS,
    OptimizerSpec,
    apply_hparams,
    build_optimizer,
    load_optimizer_state,
    optimizer_state_to_tensors,
    spec_for_step,
    state_dict_by_key,
)
from explaind_tl.run import checks, storage
from explaind_tl.run.data import check_batch_ids, dataset_columns, gather_batch
from explaind_tl.run.format import (
    checkpoint_optimizer_tensors,
    checkpoint_params,
    checkpoint_state,
    read_records,
    restore_initial,
)
from explaind_tl.run.records import Params, State, StepRecord, VerifyReport  # noqa: F401 (re-exported)
from explaind_tl.run.step import deterministic_algorithms, replay_device, torch_threads, train_step
from explaind_tl.run.trust import resolve_recorded_callable
from explaind_tl.run.validate import read_manifest


def _clone(d: Params) -> Params:
    return {k: v.detach().clone() for k, v in d.items()}


class Trajectory:
    """A recorded training run: checkpoints, step records, and exact replay.

    Attributes:
        run_dir: The run directory.
        manifest: The parsed manifest.
        num_steps: ``T`` (steps up to the last checkpoint).
        checkpoint_steps: Steps with a stored checkpoint (0, K, 2K, ..., T).
        checkpoint_every: ``K``.
        param_names: Trainable parameter names.
        optimizer_spec: The optimizer.
        loss_fn: ``loss_fn(model, batch) -> [B]``.
        train_data: The training set (``datasets.Dataset``, torch format, column ``"id"``).
        num_train: ``N``.
        clip_grad_norm: Clipping threshold or ``None``.
    """

    def __init__(self) -> None:  # use Trajectory.load
        self.metrics: list[dict[str, Any]] = []

    # ------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        run_dir: str | os.PathLike,
        *,
        loss_fn: Callable[..., Tensor] | None = None,
        model_factory: Callable[[], nn.Module] | None = None,
        check: bool = True,
        trust_remote_code: bool = False,
        device: str | torch.device | None = None,
    ) -> Trajectory:
        """Load and validate a run directory. Loading never runs code from the directory.

        Args:
            run_dir: Directory written by the recorder.
            loss_fn: The loss function; needed unless the recorded one is one of explaind_tl's
                built-in ones (or ``trust_remote_code=True``).
            model_factory: The model factory; needed when the run was recorded with one, unless
                ``trust_remote_code=True``.
            check: Verify sha256 of every listed file (missing files are always errors).
            trust_remote_code: Import and call the loss function / model factory the manifest
                names even when they are not explaind_tl's (and build a model config that
                names a tokenizer). Only for run directories you trust.
            device: where replay runs (and where the parameters it returns live). Default: the
                device type the run was recorded on (``manifest["device"]``), or the CPU with a
                :class:`ReplayMismatchWarning` when that is CUDA and none is available: GPU and
                CPU kernels round differently, so such a replay is not the recorded run
                (``verify()`` and ``explain``'s certificate show by how much).

        Raises:
            TrajectoryError: missing/malformed manifest or files, unimportable loss_fn/factory,
                a file named outside the run directory, a field of the wrong type or range.
            UntrustedCodeError: (a ``TrajectoryError``) the manifest names code that is not
                explaind_tl's and neither the callable nor ``trust_remote_code=True`` was given.
            ChecksumError: a file does not match its checksum (names the file).
            ModelMismatchError: the rebuilt model does not match the recording.
        """
        self = cls()
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise TrajectoryError(f"run directory {self.run_dir} does not exist")
        man = self.manifest = read_manifest(self.run_dir, trust_remote_code=trust_remote_code,
                                            builds_from_config=model_factory is None)
        for entry in man["checkpoints"] + man["segments"]:
            storage.check_file(self.run_dir / entry["file"], entry["sha256"], check)
        data_dir = self.run_dir / man["train_data"]["path"]
        for rel, sha in man["train_data"]["files"].items():
            storage.check_file(data_dir / rel, sha, check)

        self.num_steps = int(man["num_steps"])
        self.checkpoint_steps = [int(c["step"]) for c in man["checkpoints"]]
        self.checkpoint_every = int(man["checkpoint_every"])
        self.param_names = list(man["param_names"])
        self.optimizer_spec = OptimizerSpec.from_dict(man["optimizer"])
        self.clip_grad_norm = man.get("clip_grad_norm")
        self.num_train = int(man["num_train"])
        self.torch_num_threads = man.get("torch_num_threads")
        self.recorded_device = man.get("device", "cpu")
        self.deterministic = bool(man.get("deterministic", False))
        self.device = replay_device(device, self.recorded_device, self.run_dir)
        self.replay_mismatch: dict[int, float] = {}
        self.loss_mismatch: dict[int, tuple[float, float]] = {}
        self._warned_replay = False
        if model_factory is None and man["model"]["kind"] == "factory":
            model_factory = resolve_recorded_callable(
                man["model"].get("factory"), what="model factory", arg="model_factory", run_dir=self.run_dir,
                trust_remote_code=trust_remote_code)
        self.model_factory = model_factory
        if loss_fn is None:
            loss_fn = resolve_recorded_callable(
                man.get("loss_fn"), what="loss function", arg="loss_fn", run_dir=self.run_dir,
                trust_remote_code=trust_remote_code)
        self.loss_fn = loss_fn
        self._load_records()
        self.train_data = checks.load_train_data(data_dir, man["train_data"]["files"])
        self.train_columns: dict[str, Tensor] = dataset_columns(self.train_data)
        if len(self.train_data) != self.num_train:
            raise TrajectoryError(f"training data has {len(self.train_data)} rows, manifest says {self.num_train}")
        self._work: tuple[nn.Module, torch.optim.Optimizer, list[nn.Parameter]] | None = None
        self._seg_cache: tuple[int, list[Params], list[State]] | None = None
        self._ck_cache: dict[int, dict[str, Tensor]] = {}
        self._check = check
        # build once to validate the model against the manifest
        self._work_model()
        return self

    def _load_records(self) -> None:
        n = self.num_steps
        self._lr = [float("nan")] * n
        self._clip = [float("nan")] * n
        self._loss = [float("nan")] * n
        self._ids: list[list[int] | None] = [None] * n
        # per-step hyper-parameters; segments written before they were recorded (or a run whose
        # manifest predates them) keep the manifest's constant values
        spec = self.optimizer_spec
        const = {"beta1": spec.betas[0], "beta2": spec.betas[1], "eps": spec.eps, "weight_decay": spec.weight_decay,
                 "momentum": spec.momentum, "dampening": spec.dampening}
        self._hp_cols = HPARAM_COLUMNS[spec.kind]
        self._hp: dict[str, list[float]] = {c: [const[c]] * n for c in self._hp_cols}
        seen = 0
        for seg in self.manifest["segments"]:
            path = self.run_dir / seg["file"]
            t = read_records(path)
            checks.check_records(t, seg["start"], seg["stop"], self.num_train, self._hp_cols, path)
            for i, s in enumerate(t["step"]):
                if not 0 <= s < n:
                    raise TrajectoryError(f"{path} has step {s} outside [0, {n})")
                self._lr[s] = t["lr"][i]
                self._clip[s] = t["clip_factor"][i]
                self._loss[s] = t["loss"][i]
                self._ids[s] = t["batch_ids"][i]
                for c in self._hp_cols:
                    if c in t:
                        self._hp[c][s] = t[c][i]
                seen += 1
        if seen != n:
            raise TrajectoryError(f"{self.run_dir}: step records cover {seen} of {n} steps")

    # ------------------------------------------------------------ model + checkpoints

    def build_model(self) -> nn.Module:
        """A freshly built model as recorded: trainable parameters at their (random) init, frozen
        parameters and buffers from the run, ``requires_grad`` and train/eval mode as recorded.

        Raises:
            ModelMismatchError: the rebuilt model does not match the recording.
            TrajectoryError: the recorded model config does not build a model.
        """
        with checks.as_trajectory_error(f"the model config recorded in {self.run_dir} does not build a model",
                                        active=self.model_factory is None):
            model = build_model(self.manifest["model"], self.model_factory)
        trainable = set(self.param_names)
        shapes = self.manifest.get("param_shapes", {})
        for n, p in model.named_parameters():
            if n in shapes:
                p.requires_grad_(n in trainable)
        check_model_matches(model, self.manifest)
        init = self.checkpoint(0)
        checks.check_buffers(init, dict(model.named_buffers()), self.run_dir / self._checkpoint_entry(0)["file"])
        restore_initial(model, init)
        model.train(self.manifest.get("model_training", True))
        return model

    def load_into(self, model: nn.Module, step: int) -> None:
        """Copy ``w_step`` and the run's frozen parameters and buffers into ``model`` (in place)."""
        params = self.params_at(step)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in params.items():
                named[n].copy_(t)
        restore_initial(model, self.checkpoint(0))

    def fresh_training(self) -> tuple[nn.Module, torch.optim.Optimizer, list[nn.Parameter]]:
        """``(model, optimizer, params)`` at the run's initialisation on the replay device, the
        optimizer rebuilt from the recorded spec (what replay and retraining step)."""
        model = move_model(self.build_model(), self.device)
        named = dict(model.named_parameters())
        params = [named[n] for n in self.param_names]
        return model, build_optimizer(self.optimizer_spec, params), params

    def train_step_at(self, s: int, model: nn.Module, opt: torch.optim.Optimizer, params: list[nn.Parameter],
                      batch: dict[str, Tensor], capture_grads: bool = False, loss_fn: Any = None) -> Any:
        """Step ``s`` as recorded (its hyper-parameters, clipping, threads, deterministic mode) on
        ``batch``, the one step of replay and :func:`~explaind_tl.run.retrain.retrain` (``loss_fn``:
        a per-example loss in place of the run's, e.g. a reweighted one)."""
        hp = self.hyperparameters(s)
        apply_hparams(opt, self.optimizer_spec.kind, hp)
        with torch_threads(self.torch_num_threads), deterministic_algorithms(self.deterministic, f"replaying step {s}"), \
                checks.as_trajectory_error(f"replaying step {s} of {self.run_dir} failed (its recorded data does not "
                                           "fit the model and loss_fn)"):
            return train_step(model, opt, params, loss_fn or self.loss_fn, batch, self.clip_grad_norm, lr=hp["lr"],
                              capture_grads=capture_grads)

    def _work_model(self) -> tuple[nn.Module, torch.optim.Optimizer, list[nn.Parameter]]:
        if self._work is None:
            self._work = self.fresh_training()
        return self._work

    def _checkpoint_entry(self, step: int) -> dict[str, Any]:
        for c in self.manifest["checkpoints"]:
            if c["step"] == step:
                return c
        raise TrajectoryError(f"no checkpoint at step {step}")

    def checkpoint(self, step: int) -> dict[str, Tensor]:
        """The tensors of the checkpoint at ``step`` (a checkpoint step; read-only, cached):
        ``param/{name}``, ``optim/{key}/{name}``, ``rng/torch``, and at step 0 ``frozen/{name}``,
        ``buffer/{name}`` (docs/design.md §5)."""
        if step in self._ck_cache:
            return self._ck_cache[step]
        entry = self._checkpoint_entry(step)
        t = storage.load_tensors(self.run_dir / entry["file"], entry["sha256"], check=False)
        checks.check_checkpoint(t, self.manifest, self.run_dir / entry["file"])
        if len(self._ck_cache) > 2:
            self._ck_cache.pop(next(k for k in self._ck_cache if k != 0))
        self._ck_cache[step] = t
        return t

    def checkpoint_metadata(self, step: int) -> dict[str, Any]:
        """The metadata of the checkpoint at ``step``: ``step``, ``group`` (the param group's
        settings) and, with a scheduler, ``scheduler`` (JSON; see
        :func:`explaind_tl.run.codec.decode_scheduler_state`)."""
        return checks.read_checkpoint_meta(self.run_dir / self._checkpoint_entry(step)["file"])

    def _checkpoint_params(self, step: int) -> Params:
        return {n: t.to(self.device) for n, t in checkpoint_params(self.checkpoint(step), self.param_names).items()}

    def _checkpoint_state(self, step: int) -> State:
        return {k: {n: t.to(self.device) for n, t in d.items()} for k, d in checkpoint_state(self.checkpoint(step)).items()}

    def _check_step(self, s: int, upto: int | None = None) -> int:
        upto = self.num_steps if upto is None else upto
        if not isinstance(s, int) or isinstance(s, bool):
            s = int(s)
        if not 0 <= s <= upto:
            raise TrajectoryError(f"step {s} out of range [0, {upto}]")
        return s

    def _segment_start(self, s: int) -> int:
        """Largest checkpoint step <= s."""
        return max(c for c in self.checkpoint_steps if c <= s)

    # ------------------------------------------------------------ replay

    def _replay(self, start_ck: int, stop: int, capture: bool, final_only: bool = False, grads: bool = True,
                start: tuple[Params, dict[str, Tensor]] | None = None) -> Iterator[StepRecord | tuple[int, Params, State]]:
        """Replay from checkpoint ``start_ck`` up to step ``stop`` (exclusive).

        Yields a :class:`StepRecord` per step (``capture``; consecutive records share tensors,
        see :meth:`segments`), else ``(s + 1, w_{s+1}, state)`` per step, or only after the
        last step with ``final_only``. With ``start = (w, optimizer tensors)`` (a state taken
        by :meth:`_snapshots`; ``start_ck`` is then its step, not necessarily a checkpoint) the
        replay begins from it instead of the stored checkpoint.
        """
        model, opt, params = self._work_model()
        w0, opt0 = start if start is not None else (None, None)
        if start is None:
            ck = self.checkpoint(start_ck)
            w0 = {n: ck[f"param/{n}"] for n in self.param_names}
            opt0 = checkpoint_optimizer_tensors(ck)
        with torch.no_grad():
            for n, p in zip(self.param_names, params):
                p.copy_(w0[n])
        load_optimizer_state(opt, opt0, self.param_names)
        spec = self.optimizer_spec
        w_next = state_after = None  # the previous record's, shared with the next one
        for s in range(start_ck, stop):
            ids = self.batch_ids(s)
            raw = self._ids[s]
            batch = {k: v.to(self.device) for k, v in gather_batch(self.train_columns, None if raw is None else ids).items()}
            w_s = state_before = None
            if capture:
                w_s = w_next if w_next is not None else {n: p.detach().clone() for n, p in zip(self.param_names, params)}
                state_before = state_after if state_after is not None else state_dict_by_key(opt, self.param_names)
            hp = self.hyperparameters(s)
            out = self.train_step_at(s, model, opt, params, batch, capture_grads=capture and grads)
            if out.loss != self._loss[s]:
                self.loss_mismatch.setdefault(s, (out.loss, self._loss[s]))
            if capture:
                w_next = {n: p.detach().clone() for n, p in zip(self.param_names, params)}
                state_after = state_dict_by_key(opt, self.param_names)
                st = state_after.get("step")
                step_count = int(next(iter(st.values())).item()) if st else s + 1
                if spec.kind == "sgd":
                    step_count = s + 1
                yield StepRecord(
                    step=s, params=w_s, next_params=w_next, grad=dict(zip(self.param_names, out.grads)) if grads else {},
                    state_before=state_before, state_after=state_after, step_count=step_count, lr=self._lr[s],
                    clip_factor=out.clip_factor, loss=out.loss, batch_ids=ids, spec=spec_for_step(spec, hp),
                )
            elif not final_only or s + 1 == stop:
                yield s + 1, {n: p.detach().clone() for n, p in zip(self.param_names, params)}, state_dict_by_key(opt, self.param_names)

    def _segment(self, start_ck: int) -> tuple[list[Params], list[State]]:
        """Params/state at every step of the segment starting at checkpoint ``start_ck`` (cached)."""
        if self._seg_cache is not None and self._seg_cache[0] == start_ck:
            return self._seg_cache[1], self._seg_cache[2]
        i = self.checkpoint_steps.index(start_ck)
        stop = self.checkpoint_steps[i + 1] if i + 1 < len(self.checkpoint_steps) else start_ck
        ps = [self._checkpoint_params(start_ck)]
        sts = [self._checkpoint_state(start_ck)]
        for _, p, st in self._replay(start_ck, stop, capture=False):
            ps.append(p)
            sts.append(st)
        self._seg_cache = (start_ck, ps, sts)
        return ps, sts

    def params_at(self, s: int) -> Params:
        """``w_s`` (clones), by replay from the nearest checkpoint ``<= s``."""
        s = self._check_step(s)
        if s in self.checkpoint_steps:
            return self._checkpoint_params(s)
        c = self._segment_start(s)
        return _clone(self._segment(c)[0][s - c])

    def optimizer_state_at(self, s: int) -> State:
        """Optimizer state before step ``s`` (after ``s`` steps); ``{}`` at step 0."""
        s = self._check_step(s)
        if s in self.checkpoint_steps:
            return self._checkpoint_state(s)
        c = self._segment_start(s)
        return {k: _clone(v) for k, v in self._segment(c)[1][s - c].items()}

    def batch_ids(self, s: int) -> Tensor:
        """``[B]`` training-example ids of step ``s``."""
        s = self._check_step(s, self.num_steps - 1)
        raw = self._ids[s]
        return torch.arange(self.num_train) if raw is None else torch.tensor(raw, dtype=torch.int64)

    def lr(self, s: int) -> float:
        """Learning rate used at step ``s``."""
        return self._lr[self._check_step(s, self.num_steps - 1)]

    def hyperparameters(self, s: int) -> dict[str, float]:
        """The optimizer hyper-parameters step ``s`` used: ``lr`` and ``beta1``, ``beta2``,
        ``eps``, ``weight_decay`` (Adam/AdamW) or ``momentum``, ``dampening``, ``weight_decay``
        (SGD)."""
        s = self._check_step(s, self.num_steps - 1)
        return {"lr": self._lr[s], **{c: self._hp[c][s] for c in self._hp_cols}}

    def optimizer_spec_at(self, s: int) -> OptimizerSpec:
        """The :class:`OptimizerSpec` step ``s`` used (``optimizer_spec`` with its hyper-parameters)."""
        return spec_for_step(self.optimizer_spec, self.hyperparameters(s))

    def clip_factor(self, s: int) -> float:
        """Clip factor ``κ_s`` of step ``s`` (1.0 without clipping)."""
        return self._clip[self._check_step(s, self.num_steps - 1)]

    def loss(self, s: int) -> float:
        """Recorded mean batch loss at step ``s``."""
        return self._loss[self._check_step(s, self.num_steps - 1)]

    def batch(self, ids: Any) -> dict[str, Tensor]:
        """Rows ``ids`` of the training set as tensors (what ``loss_fn`` receives)."""
        return gather_batch(self.train_columns, check_batch_ids(ids, self.num_train))

    def model(self, step: int = 0) -> nn.Module:
        """A freshly built model with ``w_step`` loaded, in ``eval()`` mode."""
        model = self.build_model()
        self.load_into(model, step)
        return model.eval()

    def _ranges(self, start: int, stop: int | None) -> list[tuple[int, int, int]]:
        stop = self.num_steps if stop is None else stop
        start = self._check_step(start)
        stop = self._check_step(stop)
        out = []
        for i, c in enumerate(self.checkpoint_steps[:-1]):
            nxt = self.checkpoint_steps[i + 1]
            lo, hi = max(c, start), min(nxt, stop)
            if lo < hi:
                out.append((c, lo, hi))
        return out

    def steps(self, start: int = 0, stop: int | None = None, *, progress: bool = False) -> Iterator[StepRecord]:
        """Replay steps ``[start, stop)`` forward, yielding a :class:`StepRecord` per step."""
        from tqdm.auto import tqdm

        ranges = self._ranges(start, stop)
        bar = tqdm(total=sum(hi - lo for _, lo, hi in ranges), disable=not progress, desc="replay")
        try:
            for c, lo, hi in ranges:
                for rec in self._replay(c, hi, capture=True):
                    if rec.step >= lo:
                        bar.update(1)
                        yield rec
        finally:
            bar.close()

    def segments(self, start: int = 0, stop: int | None = None, *, reverse: bool = False, grads: bool = True,
                 hold: int | None = None) -> Iterator[list[StepRecord]]:
        """Checkpoint segments ∩ ``[start, stop)``, each as a forward-ordered list of records.

        With ``reverse=True`` segments come from the last one backwards (for adjoint sweeps);
        records inside each list stay in forward order. A record's ``params``/``state_before``
        are the previous one's ``next_params``/``state_after`` (shared: read-only), so a step's
        ``w`` and state are held once; ``grads=False`` leaves ``StepRecord.grad`` empty.

        With ``reverse=True`` and ``hold``, a segment of more than ``hold`` steps comes as
        sub-segments of ``ceil(sqrt(n))`` of its ``n`` steps, last first (two-level
        checkpointing: one more replay of the segment keeps the state at each sub-segment's
        start, so about ``2 sqrt(n)`` steps' parameters and optimizer state are held instead of
        ``n``). The records are bitwise the same.
        """
        ranges = self._ranges(start, stop)
        if reverse:
            ranges = ranges[::-1]
        for c, lo, hi in ranges:
            if reverse and hold is not None and hi - lo > hold:
                yield from self._sub_segments(c, lo, hi, grads, math.isqrt(hi - lo - 1) + 1)
                continue
            records = [r for r in self._replay(c, hi, capture=True, grads=grads) if r.step >= lo]
            if records and hi in self.checkpoint_steps:
                self._check_replay(hi, records[-1].next_params)
            yield records

    def _sub_segments(self, c: int, lo: int, hi: int, grads: bool, length: int) -> Iterator[list[StepRecord]]:
        """Records of steps ``[lo, hi)`` (checkpoint segment from ``c``) as lists of at most
        ``length`` steps, the last first: one replay from ``c`` keeps the parameters and
        optimizer state at each list's first step (:meth:`_snapshots`), then each list is
        replayed from its state. Training is deterministic and the state is the replay's own,
        so the records are bitwise the ones one replay of the segment gives."""
        starts = list(range(lo, hi, length))
        snaps = self._snapshots(c, set(starts) - {c})
        for t in reversed(starts):
            end = min(t + length, hi)
            records = list(self._replay(t, end, capture=True, grads=grads, start=snaps.pop(t, None)))
            if end == hi and hi in self.checkpoint_steps:
                self._check_replay(hi, records[-1].next_params)
            yield records

    def _snapshots(self, c: int, steps: set[int]) -> dict[int, tuple[Params, dict[str, Tensor]]]:
        """``{t: (w_t, optimizer tensors before step t)}`` for ``t`` in ``steps`` (inside the
        segment from checkpoint ``c``), from one replay that keeps nothing else."""
        out: dict[int, tuple[Params, dict[str, Tensor]]] = {}
        if not steps:
            return out
        model, opt, params = self._work_model()
        for t, _, _ in self._replay(c, max(steps), capture=False):
            if t in steps:
                out[t] = ({n: p.detach().clone() for n, p in zip(self.param_names, params)},
                          optimizer_state_to_tensors(opt, self.param_names))
        return out

    def _check_replay(self, step: int, replayed: Params) -> None:
        """Compare a replayed ``w_step`` with the stored checkpoint; record and warn on drift.

        The largest absolute difference per checkpoint is kept in ``self.replay_mismatch``
        (``{step: max abs diff}``); anything nonzero means the per-step records of the
        preceding segment are not the recorded run's, and a :class:`ReplayMismatchWarning` says
        so once per trajectory, naming the cause it can see: the first step of the segment
        whose replayed loss differs from the recorded one (``self.loss_mismatch``), and CPU
        threads only when the run was recorded with more than one.
        """
        want = self._checkpoint_params(step)
        diff = max(float((replayed[n].double() - want[n].double()).abs().max()) for n in self.param_names)
        self.replay_mismatch[step] = diff
        if diff > 0 and not self._warned_replay:
            self._warned_replay = True
            warnings.warn(self._mismatch_message(step, diff), ReplayMismatchWarning, stacklevel=3)

    def _mismatch_message(self, step: int, diff: float) -> str:
        start = max((c for c in self.checkpoint_steps if c < step), default=0)
        bad = sorted(k for k in self.loss_mismatch if start <= k < step)
        threads = self.torch_num_threads or 1
        head = f"replay does not reproduce checkpoint {step} bitwise (max abs diff {diff:.3g})"
        thread_note = (
            f"the run was recorded with {threads} CPU threads, whose kernels are not bitwise reproducible "
            "(record with TrajectoryRecorder(..., num_threads=1) for exact replay)"
        )
        if bad:
            k = bad[0]
            got, want = self.loss_mismatch[k]
            cause = (
                f"the loss at step {k} differs from the recorded one (replayed {got!r}, recorded {want!r}): "
                "the model, data, loss_fn or optimizer settings were changed outside the recorder"
            )
            return f"{head}: {cause}" + (f"; or {thread_note}" if threads > 1 else "")
        if threads > 1:
            return f"{head}: {thread_note}"
        return (
            f"{head}, although every replayed loss of steps {start}..{step - 1} matches the recording: the "
            "optimizer's update differed, i.e. its settings were changed outside the recorder (e.g. in a run "
            "recorded before per-step hyper-parameters were stored, by a scheduler that changes betas/momentum "
            "or a hand-edited param group) or the optimizer code changed (torch version)"
        )

    def verify(self, progress: bool = True) -> VerifyReport:
        """Replay every segment and compare with the next checkpoint (params + optimizer state)."""
        from tqdm.auto import tqdm

        report = VerifyReport()
        pairs = list(zip(self.checkpoint_steps[:-1], self.checkpoint_steps[1:]))
        for c, nxt in tqdm(pairs, disable=not progress, desc="verify"):
            _, p, st = collections.deque(self._replay(c, nxt, capture=False, final_only=True), maxlen=1)[0]
            want_p, want_st = self._checkpoint_params(nxt), self._checkpoint_state(nxt)
            diff = 0.0
            for n in self.param_names:
                diff = max(diff, float((p[n].double() - want_p[n].double()).abs().max()))
            if set(st) != set(want_st):
                diff = float("inf")
            else:
                for key in st:
                    for n in st[key]:
                        diff = max(diff, float((st[key][n].double() - want_st[key][n].double()).abs().max()))
            report.per_checkpoint[nxt] = diff
            report.max_abs_diff = max(report.max_abs_diff, diff)
        return report

    def __repr__(self) -> str:
        return f"Trajectory({str(self.run_dir)!r}, steps={self.num_steps}, checkpoints={len(self.checkpoint_steps)}, optimizer={self.optimizer_spec.kind})"
