"""Recorder misuse: settings changed mid-run, ReduceLROnPlateau, atomic steps, overwrite, locks, full disks.

Every case either records exactly or is refused with a clear error that loses nothing: the model,
the optimizer, the scheduler and the run directory are as before the refused call.
"""

from __future__ import annotations

import copy
import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import modular_addition, tiny_model
from torch import nn

from explaind_tl.errors import ExplaindError, RecordingError, StorageError, TrajectoryError
from explaind_tl.losses import last_token_cross_entropy
from explaind_tl.run import storage
from explaind_tl.run.data import save_train_data
from explaind_tl.run.recorder import TrajectoryRecorder
from explaind_tl.run.training import batch_schedule, train
from explaind_tl.run.trajectory import Trajectory

TESTS = Path(__file__).parent
STEPS, K, BS = 8, 3, 16


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _opt_state(opt):
    return {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()} for p, st in opt.state.items()}


def _group(opt):
    return {k: v for k, v in opt.param_groups[0].items() if k != "params"}


def _same_state(a, b):
    if a.keys() != b.keys():
        return False
    for pid in a:
        if a[pid].keys() != b[pid].keys():
            return False
        for k in a[pid]:
            x, y = a[pid][k], b[pid][k]
            if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
                return False
            if (isinstance(x, torch.Tensor) and not torch.equal(x, y)) or (not isinstance(x, torch.Tensor) and x != y):
                return False
    return True


def _same_params(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _snapshot(rec):
    sched = copy.deepcopy(rec.scheduler.state_dict()) if rec.scheduler is not None else None
    return _params(rec.model), _opt_state(rec.optimizer), _group(rec.optimizer), sched, rec.num_steps


def _assert_unchanged(rec, snap):
    params, state, group, sched, n = snap
    assert _same_params(_params(rec.model), params)
    assert _same_state(_opt_state(rec.optimizer), state)
    assert _group(rec.optimizer) == group
    if sched is not None:
        assert rec.scheduler.state_dict() == sched
    assert rec.num_steps == n


def _make_opt(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)


def _make_sched(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)


def _new_recorder(run, model=None, opt=None, scheduler="default", **kw):
    model = model if model is not None else tiny_model()
    opt = opt if opt is not None else _make_opt(model.parameters())
    if scheduler == "default":
        scheduler = _make_sched(opt)
    return TrajectoryRecorder(model, opt, run, modular_addition(7), last_token_cross_entropy, checkpoint_every=K, scheduler=scheduler, **kw)


SCHEDULE = batch_schedule(49, STEPS, BS, seed=3)


def _reference(tmp_path):
    """Parameters after an uninterrupted run of ``STEPS`` steps."""
    with _new_recorder(tmp_path / "reference") as rec:
        for ids in SCHEDULE:
            rec.step(ids)
    return _params(rec.model)


# ------------------------------------------------------------------ 5. settings that cannot change


def _extra_group(opt):
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


CHANGES = {
    "nesterov": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda o: o.param_groups[0].update(nesterov=True), "nesterov"),
    "amsgrad": (_make_opt, lambda o: o.param_groups[0].update(amsgrad=True), "amsgrad"),
    "maximize": (_make_opt, lambda o: o.param_groups[0].update(maximize=True), "maximize"),
    "foreach": (_make_opt, lambda o: o.param_groups[0].update(foreach=True), "foreach"),
    "fused": (_make_opt, lambda o: o.param_groups[0].update(fused=True), "fused"),
    "momentum_switched_on": (lambda ps: torch.optim.SGD(ps, lr=0.1), lambda o: o.param_groups[0].update(momentum=0.9), "momentum on"),
    "momentum_switched_off": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda o: o.param_groups[0].update(momentum=0.0), "momentum on"),
    "param_group_added": (_make_opt, _extra_group, "param groups"),
    "tensor_lr": (_make_opt, lambda o: o.param_groups[0].update(lr=torch.tensor(0.01)), "lr as a Tensor"),
    "nan_beta": (_make_opt, lambda o: o.param_groups[0].update(betas=(float("nan"), 0.999)), "beta1 is not finite"),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_unchangeable_setting_is_refused_before_the_step(tmp_path, case):
    make_opt, change, match = CHANGES[case]
    model = tiny_model()
    opt = make_opt(model.parameters())
    rec = _new_recorder(tmp_path / "run", model, opt)
    for ids in SCHEDULE[:2]:
        rec.step(ids)
    saved_group = copy.copy(opt.param_groups)
    saved = {k: v for k, v in opt.param_groups[0].items()}
    change(opt)
    snap = _snapshot(rec)
    with pytest.raises(RecordingError, match=match) as err:
        rec.step(SCHEDULE[2])
    assert "step 2 was not taken" in str(err.value)
    _assert_unchanged(rec, snap)
    # undo the change: recording continues and the run replays exactly
    opt.param_groups[:] = saved_group
    opt.param_groups[0].clear()
    opt.param_groups[0].update(saved)
    rec.step(SCHEDULE[2])
    traj = rec.trajectory()
    assert traj.num_steps == 3 and traj.verify(progress=False).ok


def test_frozen_parameter_mid_run_is_refused(tmp_path):
    model = tiny_model()
    rec = _new_recorder(tmp_path / "run", model)
    rec.step(SCHEDULE[0])
    model.embed.W_E.requires_grad_(False)
    snap = _snapshot(rec)
    with pytest.raises(RecordingError, match="frozen"):
        rec.step(SCHEDULE[1])
    _assert_unchanged(rec, snap)


# ------------------------------------------------------------------ 6. ReduceLROnPlateau, atomic steps


def _plateau(opt):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.5)


def test_reduce_lr_on_plateau_needs_a_metric_and_records_exactly(tmp_path):
    model = tiny_model()
    opt = _make_opt(model.parameters())
    rec = _new_recorder(tmp_path / "run", model, opt, scheduler=_plateau(opt))
    snap = _snapshot(rec)
    for bad, match in [(None, "ReduceLROnPlateau"), ("val", "number or 'loss'"), (float("nan"), "not finite"), (torch.ones(2), "one number")]:
        with pytest.raises(RecordingError, match=match):
            rec.step(SCHEDULE[0], scheduler_metric=bad)
        _assert_unchanged(rec, snap)
    for s, ids in enumerate(SCHEDULE):
        rec.step(ids, scheduler_metric="loss" if s % 2 else torch.tensor(1.0 / (s + 1)))
    traj = rec.trajectory()
    lrs = [traj.lr(s) for s in range(STEPS)]
    assert len(set(lrs)) > 1 and lrs == sorted(lrs, reverse=True)  # the plateau reduced the lr
    assert traj.verify(progress=False).ok
    # a metric for a scheduler that takes none is refused too
    other = _new_recorder(tmp_path / "other")
    with pytest.raises(RecordingError, match="only for a ReduceLROnPlateau"):
        other.step(SCHEDULE[0], scheduler_metric=1.0)
    assert other.num_steps == 0


def test_train_loop_passes_the_batch_loss_to_reduce_lr_on_plateau(tmp_path):
    model = tiny_model()
    opt = _make_opt(model.parameters())
    traj = train(model, opt, modular_addition(7), last_token_cross_entropy, steps=6, batch_size=16, run_dir=tmp_path / "run",
                 checkpoint_every=K, scheduler=_plateau(opt), progress=False)
    assert len({traj.lr(s) for s in range(6)}) > 1 and traj.verify(progress=False).ok
    seen = []
    model = tiny_model()
    opt = _make_opt(model.parameters())
    traj = train(model, opt, modular_addition(7), last_token_cross_entropy, steps=4, run_dir=tmp_path / "val", checkpoint_every=K,
                 scheduler=_plateau(opt), progress=False, scheduler_metric=lambda s, m: seen.append(s) or 1.0)
    assert seen == [0, 1, 2, 3]
    assert [traj.lr(s) for s in range(4)] == [1e-2, 1e-2, 5e-3, 2.5e-3]  # metric never improves: halved from the 2nd


class BoomScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Changes the lr, then raises on its ``fail_at``-th step (a half-done scheduler step)."""

    def __init__(self, optimizer, fail_at):
        self.fail_at = fail_at
        super().__init__(optimizer)

    def get_lr(self):
        return [g["lr"] * 0.9 for g in self.optimizer.param_groups]

    def step(self, *args, **kwargs):
        super().step(*args, **kwargs)
        if self.last_epoch == self.fail_at:
            raise ValueError("scheduler exploded")


def test_step_is_atomic_when_the_scheduler_raises(tmp_path):
    model = tiny_model()
    opt = _make_opt(model.parameters())
    rec = _new_recorder(tmp_path / "run", model, opt, scheduler=BoomScheduler(opt, fail_at=3))
    for ids in SCHEDULE[:2]:
        rec.step(ids)
    snap = _snapshot(rec)
    with pytest.raises(RecordingError, match=r"scheduler.step\(\) failed at step 2 .*scheduler exploded.*step 2 was not recorded") as err:
        rec.step(SCHEDULE[2])
    assert isinstance(err.value.__cause__, ValueError)
    _assert_unchanged(rec, snap)
    rec.scheduler.fail_at = -1
    rec.step(SCHEDULE[2])  # the same step again, now complete
    traj = rec.trajectory()
    assert traj.num_steps == 3 and traj.verify(progress=False).ok


def test_step_is_atomic_when_optimizer_step_raises_halfway(tmp_path):
    model = tiny_model()
    opt = _make_opt(model.parameters())
    rec = _new_recorder(tmp_path / "run", model, opt)
    rec.step(SCHEDULE[0])
    snap = _snapshot(rec)

    def hook(optimizer, args, kwargs):  # runs after the parameters moved
        raise RuntimeError("hook failed")

    handle = opt.register_step_post_hook(hook)
    with pytest.raises(RecordingError, match=r"optimizer.step\(\) failed at step 1 .*hook failed"):
        rec.step(SCHEDULE[1])
    _assert_unchanged(rec, snap)
    handle.remove()
    rec.step(SCHEDULE[1])
    assert rec.trajectory().verify(progress=False).ok


# ------------------------------------------------------------------ 7. overwrite deletes only our files


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "thesis.tex").write_text("precious")
    (run / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(TrajectoryError, match="holds no explaind_tl trajectory"):
        _new_recorder(run, overwrite=True)
    assert (run / "thesis.tex").read_text() == "precious" and (run / "manifest.json").exists()
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "thesis.tex"]


def test_overwrite_keeps_user_files_inside_a_run(tmp_path):
    run = tmp_path / "run"
    with _new_recorder(run) as rec:
        for ids in SCHEDULE:
            rec.step(ids)
    user = {run / "notes.txt": "mine", run / "checkpoints" / "best_by_hand.pt": "mine too", run / "records" / "plot.png": "also"}
    for p, text in user.items():
        p.write_text(text)
    with _new_recorder(run, overwrite=True) as rec:
        rec.step(SCHEDULE[0])
    for p, text in user.items():
        assert p.read_text() == text
    traj = Trajectory.load(run)
    assert traj.num_steps == 1 and traj.verify(progress=False).ok
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best_by_hand.pt", "step_00000000.safetensors", "step_00000001.safetensors"]


def test_overwrite_refuses_foreign_files_in_train_data_before_deleting_anything(tmp_path):
    run = tmp_path / "run"
    with _new_recorder(run) as rec:
        rec.step(SCHEDULE[0])
    (run / "train_data" / "extra.csv").write_text("x")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    with pytest.raises(TrajectoryError, match="extra.csv"):
        _new_recorder(run, overwrite=True)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert Trajectory.load(run).num_steps == 1


def test_save_train_data_only_replaces_a_saved_dataset(tmp_path):
    from explaind_tl.run.checks import load_train_data
    from explaind_tl.run.data import prepare_train_data

    ds = prepare_train_data(modular_addition(7))
    dest = tmp_path / "data"
    save_train_data(ds, dest)
    small = prepare_train_data({k: v[:5] for k, v in modular_addition(7).items()})
    files = save_train_data(small, dest)  # our own saved dataset is replaced
    assert len(load_train_data(dest, files)) == 5
    (dest / "README.md").write_text("user")
    with pytest.raises(TrajectoryError, match="README.md"):
        save_train_data(ds, dest)
    assert (dest / "README.md").read_text() == "user" and len(load_train_data(dest, files)) == 5
    assert not (tmp_path / ".data.tmp").exists()


# ------------------------------------------------------------------ 8. one writer per run directory


def test_second_recorder_on_a_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    first = _new_recorder(run)
    first.step(SCHEDULE[0])
    for attempt in (lambda: _new_recorder(run, overwrite=True), lambda: TrajectoryRecorder.resume(run, scheduler_factory=_make_sched)):
        with pytest.raises(TrajectoryError, match=rf"pid {os.getpid()} .*this process") as err:
            attempt()
        assert "recorder.lock" in str(err.value)
    # the first run was not touched and goes on
    for ids in SCHEDULE[1:]:
        first.step(ids)
    first.close()
    assert Trajectory.load(run).verify(progress=False).ok
    again = TrajectoryRecorder.resume(run, scheduler_factory=_make_sched)  # free after close
    assert again.num_steps == STEPS
    again.close()


def test_lock_is_released_when_a_with_block_fails(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyError), _new_recorder(run) as rec:
        for ids in SCHEDULE[:4]:
            rec.step(ids)
        raise KeyError("user code failed")
    with pytest.raises(RecordingError, match="released its lock"):
        rec.step(SCHEDULE[4])
    resumed = TrajectoryRecorder.resume(run, scheduler_factory=_make_sched)
    assert resumed.num_steps == 3  # valid up to the last checkpoint
    resumed.abort()


HOLDER = """
import sys, time, torch
sys.path[:0] = [{tests!r}, {conftest!r}, {root!r}]
torch.set_num_threads(1)
from test_recorder_misuse import _make_sched
from explaind_tl.run.recorder import TrajectoryRecorder
rec = TrajectoryRecorder.resume({run!r}, scheduler_factory=_make_sched)
print("LOCKED", flush=True)
time.sleep(600)
"""


def test_lock_across_processes_and_stale_lock_after_kill(tmp_path):
    run = tmp_path / "run"
    with _new_recorder(run) as rec:
        for ids in SCHEDULE[:4]:
            rec.step(ids)
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(HOLDER.format(tests=str(TESTS), conftest=str(TESTS.parent), root=str(TESTS.parents[1]), run=str(run))))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "LOCKED", proc.stderr.read()[-2000:] if proc.poll() is not None else line
        assert f'"pid": {proc.pid}' in (run / "recorder.lock").read_text()
        with pytest.raises(TrajectoryError, match=rf"pid {proc.pid} on host"):
            TrajectoryRecorder.resume(run, scheduler_factory=_make_sched)
        with pytest.raises(TrajectoryError, match=rf"pid {proc.pid}"):
            _new_recorder(run, overwrite=True)
        assert Trajectory.load(run).num_steps == 4  # reading is always allowed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert (run / "recorder.lock").exists()  # stale file left behind ...
    rec = TrajectoryRecorder.resume(run, scheduler_factory=_make_sched)  # ... does not block
    for ids in SCHEDULE[4:]:
        rec.step(ids)
    rec.close()
    assert f'"pid": {os.getpid()}' in (run / "recorder.lock").read_text()
    ref = _reference(tmp_path)
    assert _same_params(_params(rec.model), ref)


# ------------------------------------------------------------------ 10. disk full, permission denied


def _failing(monkeypatch, target: str, exc: OSError, times: int = 1):
    """Make storage writes whose destination contains ``target`` fail ``times`` times."""
    left = {"n": times}
    real_atomic = storage.atomic_path

    def atomic_path(dest):
        if target in str(dest) and left["n"] > 0:
            left["n"] -= 1
            raise exc
        return real_atomic(dest)

    monkeypatch.setattr(storage, "atomic_path", atomic_path)
    return left


@pytest.mark.parametrize(
    "target,exc",
    [
        ("step_00000006.safetensors", OSError(errno.ENOSPC, "No space left on device")),
        ("steps_00000003_00000006.parquet", PermissionError(errno.EACCES, "Permission denied")),
        ("manifest.json", OSError(errno.ENOSPC, "No space left on device")),
    ],
    ids=["checkpoint_enospc", "records_eacces", "manifest_enospc"],
)
def test_write_error_then_resume_matches_uninterrupted_run(tmp_path, monkeypatch, target, exc):
    ref = _reference(tmp_path)
    run = tmp_path / "run"
    rec = _new_recorder(run)
    for ids in SCHEDULE[:5]:
        rec.step(ids)
    before = _snapshot(rec)
    _failing(monkeypatch, target, exc, times=10)
    with pytest.raises(StorageError) as err:
        with rec:
            rec.step(SCHEDULE[5])  # the 6th step writes the checkpoint at step 6
    e = err.value
    assert isinstance(e, OSError) and isinstance(e, TrajectoryError) and isinstance(e, ExplaindError)
    assert e.errno == exc.errno and target in e.filename
    msg = str(e)
    assert target in msg and errno.errorcode[exc.errno] in msg and "the run is valid up to step 3" in msg
    assert "step 5 was not recorded" in msg
    _assert_unchanged(rec, before)  # the failed step was undone
    monkeypatch.undo()
    traj = Trajectory.load(run)  # valid up to its last complete checkpoint
    assert traj.num_steps == 3 and traj.checkpoint_steps == [0, 3] and traj.verify(progress=False).ok
    rec = TrajectoryRecorder.resume(run, scheduler_factory=_make_sched)
    assert rec.num_steps == 3
    for ids in SCHEDULE[3:]:
        rec.step(ids)
    rec.close()
    assert _same_params(_params(rec.model), ref)
    traj = Trajectory.load(run)
    assert traj.num_steps == STEPS and traj.checkpoint_steps == [0, 3, 6, 8] and traj.verify(progress=False).ok


def test_write_error_then_retry_in_the_same_recorder(tmp_path, monkeypatch):
    ref = _reference(tmp_path)
    run = tmp_path / "run"
    rec = _new_recorder(run)
    left = _failing(monkeypatch, "steps_00000003_00000006.parquet", PermissionError(errno.EACCES, "Permission denied"), times=1)
    for s, ids in enumerate(SCHEDULE):
        if s == 5:
            with pytest.raises(StorageError, match="EACCES"):
                rec.step(ids)
            assert left["n"] == 0 and rec.num_steps == 5
        rec.step(ids)  # (again, at step 5: the permission problem is gone)
    rec.close()
    assert _same_params(_params(rec.model), ref)
    traj = Trajectory.load(run)
    assert traj.checkpoint_steps == [0, 3, 6, 8] and traj.verify(progress=False).ok


def test_write_error_at_close_keeps_the_recorder_open(tmp_path, monkeypatch):
    run = tmp_path / "run"
    rec = _new_recorder(run)
    for ids in SCHEDULE[:4]:
        rec.step(ids)
    _failing(monkeypatch, "step_00000004.safetensors", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(StorageError, match="valid up to step 3"):
        rec.close()
    assert Trajectory.load(run).num_steps == 3
    rec.close()  # space is back
    traj = Trajectory.load(run)
    assert traj.num_steps == 4 and traj.manifest["complete"] and traj.verify(progress=False).ok


def test_write_error_while_creating_the_run(tmp_path, monkeypatch):
    _failing(monkeypatch, "step_00000000.safetensors", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(StorageError, match="nothing was recorded yet"):
        _new_recorder(tmp_path / "run")
    monkeypatch.undo()
    with _new_recorder(tmp_path / "run", overwrite=True) as rec:  # not locked by the failed attempt
        rec.step(SCHEDULE[0])
    assert Trajectory.load(tmp_path / "run").verify(progress=False).ok


def test_stale_temp_files_are_ours_only(tmp_path):
    """resume() removes the temp files of our interrupted writes, never the user's hidden files."""
    run = tmp_path / "run"
    with _new_recorder(run) as rec:
        for ids in SCHEDULE[:3]:
            rec.step(ids)
    ours = run / "checkpoints" / ".step_00000006.safetensors.abc123.tmp"
    theirs = run / ".my_editor_swap.tmp"
    ours.write_text("half a checkpoint")
    theirs.write_text("user")
    TrajectoryRecorder.resume(run, scheduler_factory=_make_sched).abort()
    assert not ours.exists() and theirs.read_text() == "user"


def test_run_dir_that_cannot_be_created_is_a_storage_error(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(StorageError, match="afile") as err:
        _new_recorder(tmp_path / "afile" / "run")
    assert err.value.errno in (errno.ENOTDIR, errno.EEXIST) and (tmp_path / "afile").read_text() == "not a directory"
    with pytest.raises(TrajectoryError, match="is a file"):
        _new_recorder(tmp_path / "afile")
