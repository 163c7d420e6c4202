"""Recording: crash safety and resume, and one test per kind of bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import modular_addition, tiny_model
from torch import nn

from explaind_tl.errors import (
    NondeterministicTrainingError,
    RecordingError,
    TrajectoryError,
    UnsupportedOptimizerError,
)
from explaind_tl.losses import last_token_cross_entropy
from explaind_tl.run.recorder import TrajectoryRecorder
from explaind_tl.run.training import batch_schedule
from explaind_tl.run.trajectory import Trajectory

TESTS = Path(__file__).parent
STEPS, K, BS = 11, 3, 16


def _make_opt(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)


def _make_sched(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)


def _record(run, upto=STEPS):
    model = tiny_model()
    opt = _make_opt(model.parameters())
    rec = TrajectoryRecorder(model, opt, run, modular_addition(7), last_token_cross_entropy, checkpoint_every=K, scheduler=_make_sched(opt), clip_grad_norm=0.5)
    for ids in batch_schedule(rec.num_train, STEPS, BS, seed=3)[:upto]:
        rec.step(ids)
    return rec, model


CHILD = """
import os, signal, sys, torch
sys.path[:0] = [{tests!r}, {conftest!r}, {root!r}]
torch.set_num_threads(1)
import explaind_tl.run.storage as storage
from test_recorder import _record
real_replace = storage.os.replace
def dying_replace(src, dst, *a, **kw):
    if "step_00000009" in str(dst):  # die while writing the checkpoint at step 9
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **kw)
storage.os.replace = dying_replace
_record({run!r})
raise SystemExit("not killed")
"""


def test_crash_then_resume_matches_uninterrupted_run(tmp_path):
    run = tmp_path / "crashed"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(tests=str(TESTS), conftest=str(TESTS.parent), root=str(TESTS.parents[1]), run=str(run))))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]

    traj = Trajectory.load(run)  # valid up to the last complete checkpoint
    assert traj.num_steps == 6 and traj.checkpoint_steps == [0, 3, 6]
    assert not traj.manifest["complete"]

    rec = TrajectoryRecorder.resume(run, scheduler_factory=_make_sched)
    assert rec.num_steps == 6
    assert not list(run.rglob(".*.tmp"))
    for ids in batch_schedule(rec.num_train, STEPS, BS, seed=3)[6:]:
        rec.step(ids)
    rec.close()
    resumed = {n: p.detach().clone() for n, p in rec.model.named_parameters()}

    ref_rec, ref_model = _record(tmp_path / "reference")
    ref_rec.close()
    for n, p in ref_model.named_parameters():
        assert torch.equal(p.detach(), resumed[n]), n
    traj = Trajectory.load(run)
    assert traj.num_steps == STEPS and traj.checkpoint_steps == [0, 3, 6, 9, 11]
    assert traj.verify(progress=False).ok
    ref = Trajectory.load(tmp_path / "reference")
    assert [traj.lr(s) for s in range(STEPS)] == [ref.lr(s) for s in range(STEPS)]


# ------------------------------------------------------------------------ bad input


def _recorder(tmp_path, model=None, opt=None, loss_fn=last_token_cross_entropy, **kw):
    model = model if model is not None else tiny_model()
    opt = opt if opt is not None else torch.optim.SGD(model.parameters(), lr=0.1)
    return TrajectoryRecorder(model, opt, tmp_path / "run", modular_addition(7), loss_fn, **kw)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.optim.Adagrad(m.parameters()),
        lambda m: torch.optim.AdamW(m.parameters(), amsgrad=True),
        lambda m: torch.optim.SGD([{"params": [m.embed.W_E]}, {"params": [p for n, p in m.named_parameters() if n != "embed.W_E"]}], lr=0.1),
    ],
    ids=["adagrad", "amsgrad", "two_groups"],
)
def test_unsupported_optimizer(tmp_path, make):
    model = tiny_model()
    with pytest.raises(UnsupportedOptimizerError, match="Supported|supported"):
        _recorder(tmp_path, model, make(model))


class DropoutMLP(nn.Module):
    def __init__(self, p: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(8, 8)
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(8, 7)

    def forward(self, tokens):
        return self.out(self.drop(self.embed(tokens)))


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return DropoutMLP(p=0.0)


def test_dropout_active_is_refused(tmp_path):
    model = DropoutMLP(p=0.1)
    with pytest.raises(NondeterministicTrainingError, match="drop"):
        _recorder(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), model_factory=make_mlp)


def test_non_transformer_model_needs_factory(tmp_path):
    model = make_mlp()
    with pytest.raises(TrajectoryError, match="model_factory"):
        _recorder(tmp_path, model)
    rec = _recorder(tmp_path, model, model_factory=make_mlp, checkpoint_every=2)
    for _ in range(3):
        rec.step([0, 1, 2])
    traj = rec.trajectory()
    assert traj.manifest["model"]["factory"].endswith(":make_mlp") and traj.verify(progress=False).ok


def noisy_loss(model, batch):
    return last_token_cross_entropy(model, batch) + torch.rand(len(batch["label"]))


def test_nondeterministic_loss_is_refused(tmp_path):
    rec = _recorder(tmp_path, loss_fn=noisy_loss)
    with pytest.raises(NondeterministicTrainingError, match="random|different"):
        rec.step([0, 1])


def test_non_finite_loss_loses_nothing(tmp_path):
    def bad_loss(model, batch):
        return last_token_cross_entropy(model, batch) * float("nan")

    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = _recorder(tmp_path, model, loss_fn=bad_loss)
    with pytest.raises(RecordingError, match="non-finite loss"):
        rec.step([0, 1])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert Trajectory.load(tmp_path / "run", loss_fn=bad_loss).num_steps == 0


def test_bad_loss_shape(tmp_path):
    rec = _recorder(tmp_path, loss_fn=lambda m, b: last_token_cross_entropy(m, b).mean())
    with pytest.raises(RecordingError, match="per-example"):
        rec.step([0, 1])


@pytest.mark.parametrize(
    "ids,match",
    [([], "empty"), ([0, 49], "out of range"), ([-1], "out of range"), ([0.5, 1.0], "integers"), ([[0, 1]], "1-d")],
)
def test_bad_batch_ids(tmp_path, ids, match):
    rec = _recorder(tmp_path)
    with pytest.raises(RecordingError, match=match):
        rec.step(ids)


def test_bad_id_column_and_nonempty_run_dir(tmp_path):
    data = modular_addition(7)
    data["id"] = torch.arange(49).flip(0)
    model = tiny_model()
    with pytest.raises(RecordingError, match="row indices"):
        TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "a", data, last_token_cross_entropy)
    _recorder(tmp_path)
    with pytest.raises(TrajectoryError, match="not empty"):
        _recorder(tmp_path)


# ------------------------------------------------------------------------ replay exactness guards

_THREADS_SEEN: list[int] = []


def _threads_seen_loss(model, batch):
    _THREADS_SEEN.append(torch.get_num_threads())
    return last_token_cross_entropy(model, batch)


def _drifting_loss(model, batch):
    return 1.001 * last_token_cross_entropy(model, batch)


def test_recorded_steps_are_single_threaded_by_default(tmp_path):
    # multi-threaded CPU kernels are not bitwise reproducible, so the recorder pins its steps
    _THREADS_SEEN.clear()
    torch.set_num_threads(2)
    try:
        rec = _recorder(tmp_path, loss_fn=_threads_seen_loss)
        rec.step(None)
        rec.close()
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(1)
    assert _THREADS_SEEN and set(_THREADS_SEEN) == {1}
    assert rec.manifest["torch_num_threads"] == 1
    with pytest.raises(RecordingError, match="num_threads"):
        _recorder(tmp_path / "other", num_threads=0)


def test_replay_drift_is_measured_warned_and_reported_by_explain(tmp_path):
    import warnings

    from explaind_tl import explain
    from explaind_tl.run.trajectory import ReplayMismatchWarning

    rec = _recorder(tmp_path, checkpoint_every=2)
    for _ in range(4):
        rec.step(None)
    rec.close()
    exact = Trajectory.load(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(exact.segments(0, 4))
    assert exact.replay_mismatch == {2: 0.0, 4: 0.0}

    # a replay that does not reproduce the run (here: a different loss) is caught at checkpoints
    drift = Trajectory.load(tmp_path / "run", loss_fn=_drifting_loss)
    # the warning names the real cause (recorded single-threaded: threads are not blamed)
    with pytest.warns(ReplayMismatchWarning, match="loss at step 0 differs") as caught:
        attr = explain(drift, modular_addition(7), metric="correct_logit", by=("step",), progress=False)
    assert not any("thread" in str(w.message) for w in caught if w.category is ReplayMismatchWarning)
    assert drift.replay_mismatch[2] > 0 and drift.replay_mismatch[4] > 0
    assert attr.meta["replay_mismatch"] == max(drift.replay_mismatch.values())
    clean = explain(exact, modular_addition(7), metric="correct_logit", by=("step",), progress=False)
    assert clean.meta["replay_mismatch"] == 0.0
