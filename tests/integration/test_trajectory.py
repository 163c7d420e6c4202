"""Exact replay of recorded runs and validation of run directories."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import modular_addition, tiny_model

from explaind_tl.errors import ChecksumError, ModelMismatchError, TrajectoryError
from explaind_tl.losses import last_token_cross_entropy
from explaind_tl.optim import buffer_after, reconstruct_update, update_coefficients
from explaind_tl.run.recorder import TrajectoryRecorder
from explaind_tl.run.training import batch_schedule, train
from explaind_tl.run.trajectory import Trajectory

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.98), weight_decay=1.0),
    "adam_l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd_dampening": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, dampening=0.3),
}
STEPS, K = 8, 3


def _live(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_replay_is_bitwise_exact(tmp_path, name):
    model = tiny_model()
    opt = OPTIMIZERS[name](model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))
    data = modular_addition(7)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", data, last_token_cross_entropy, checkpoint_every=K, scheduler=sched, clip_grad_norm=0.3)
    live = [_live(model)]
    for ids in batch_schedule(rec.num_train, STEPS, 16, shuffle=True, seed=1):
        rec.step(ids)
        live.append(_live(model))
    rec.close()

    traj = Trajectory.load(tmp_path / "run")
    assert traj.num_steps == STEPS and traj.checkpoint_steps == [0, 3, 6, 8]
    assert min(traj.clip_factor(s) for s in range(STEPS)) < 1.0  # clipping did happen
    assert len({traj.lr(s) for s in range(STEPS)}) == STEPS  # the schedule changed the lr
    for s in range(STEPS + 1):
        got = traj.params_at(s)
        assert max(float((got[n] - live[s][n]).abs().max()) for n in got) == 0.0, f"step {s}"
    report = traj.verify(progress=False)
    assert report.ok and report.max_abs_diff == 0.0 and sorted(report.per_checkpoint) == [3, 6, 8]

    # StepRecords: consistent with live params, and the optimizer algebra reconstructs Δ_s
    spec = traj.optimizer_spec
    seen = []
    for seg in traj.segments(reverse=True):
        for r in seg:
            seen.append(r.step)
            assert all(torch.equal(r.params[n], live[r.step][n]) for n in r.params)
            assert all(torch.equal(r.next_params[n], live[r.step + 1][n]) for n in r.params)
            assert r.step_count == r.step + 1 and (r.state_before == {}) == (r.step == 0)
            coeffs = update_coefficients(spec, r.lr, r.step_count, r.state_after, r.first_step)
            delta = reconstruct_update(spec, coeffs, r.params, r.grad, buffer_after(spec, r.state_after, r.grad, r.params))
            for n in r.params:
                true = r.next_params[n].double() - r.params[n].double()
                assert bool(((delta[n] - true).abs() <= 1e-6 * (r.params[n].double().abs() + true.abs())).all())
    assert seen == [6, 7, 3, 4, 5, 0, 1, 2]
    steps = list(traj.steps(2, 5))
    assert [r.step for r in steps] == [2, 3, 4]
    assert torch.equal(steps[0].batch_ids, traj.batch_ids(2)) and steps[0].loss == traj.loss(2)
    opt_state = traj.optimizer_state_at(4)
    assert opt_state and all(torch.equal(opt_state[k][n], steps[1].state_after[k][n]) for k in opt_state for n in opt_state[k])


def _recorded(tmp_path, opt_name: str, steps: int, checkpoint_every: int, seed: int) -> Trajectory:
    """A tiny model trained ``steps`` minibatch steps with ``OPTIMIZERS[opt_name]``, loaded."""
    model = tiny_model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", modular_addition(7), last_token_cross_entropy,
                             checkpoint_every=checkpoint_every)
    for ids in batch_schedule(rec.num_train, steps, 16, shuffle=True, seed=seed):
        rec.step(ids)
    rec.close()
    return Trajectory.load(tmp_path / "run")


def test_segment_records_share_tensors_and_may_skip_grads(tmp_path):
    """Consecutive records share w and the optimizer state (held once per step); ``grads=False``
    leaves ``grad`` empty and changes nothing else."""
    traj = _recorded(tmp_path, "adamw", steps=6, checkpoint_every=4, seed=2)
    full = [r for seg in traj.segments() for r in seg]
    lean = [r for seg in traj.segments(grads=False) for r in seg]
    assert [r.step for r in full] == [r.step for r in lean] == list(range(6))
    for seg in traj.segments():
        for prev, nxt in zip(seg, seg[1:]):
            assert all(nxt.params[n] is prev.next_params[n] for n in nxt.params)
            assert all(nxt.state_before[k][n] is prev.state_after[k][n] for k in nxt.state_before for n in nxt.state_before[k])
    for a, b in zip(full, lean):
        assert a.grad and b.grad == {}
        assert all(torch.equal(a.params[n], b.params[n]) and torch.equal(a.next_params[n], b.next_params[n]) for n in a.params)
        assert a.state_after.keys() == b.state_after.keys()
        assert all(torch.equal(a.state_after[k][n], b.state_after[k][n]) for k in a.state_after for n in a.state_after[k])
    # the shared tensors are copies: the live model and later replays do not change them
    w3 = {n: t.clone() for n, t in full[3].params.items()}
    list(traj.segments())
    assert all(torch.equal(full[3].params[n], w3[n]) for n in w3)


def test_train_full_batch_and_model(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1.0)
    calls = []

    def cb(step, m):
        calls.append(step)
        return {"acc": 0.5}

    traj = train(model, opt, modular_addition(7), last_token_cross_entropy, steps=5, run_dir=tmp_path / "run", checkpoint_every=2, callback=cb, callback_every=2, progress=False)
    assert calls == [2, 4, 5] and (tmp_path / "run" / "metrics.csv").exists()
    assert traj.checkpoint_steps == [0, 2, 4, 5] and len(traj.batch_ids(3)) == 49
    rebuilt = traj.model(3)
    assert not rebuilt.training
    assert all(torch.equal(p, traj.params_at(3)[n]) for n, p in rebuilt.named_parameters())
    assert traj.verify(progress=False).ok
    batch = traj.batch([3, 1])
    assert batch["id"].tolist() == [3, 1] and batch["tokens"].shape == (2, 3)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, opt, modular_addition(7), last_token_cross_entropy, steps=4, batch_size=8, run_dir=run, checkpoint_every=2, progress=False)
    return run


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupted_checkpoint_raises_checksum_error(recorded, tmp_path):
    run = _copy(recorded, tmp_path / "run")
    f = run / "checkpoints" / "step_00000002.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="step_00000002"):
        Trajectory.load(run)
    Trajectory.load(run, check=False)  # checksums skipped


def test_truncated_or_missing_files(recorded, tmp_path):
    run = _copy(recorded, tmp_path / "a")
    f = run / "checkpoints" / "step_00000004.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ChecksumError, match="step_00000004"):
        Trajectory.load(run)
    with pytest.raises(TrajectoryError, match="step_00000004"):
        Trajectory.load(run, check=False).params_at(4)
    run = _copy(recorded, tmp_path / "b")
    seg = next((run / "records").glob("*.parquet"))
    seg.unlink()
    with pytest.raises(TrajectoryError, match=seg.name):
        Trajectory.load(run)
    run = _copy(recorded, tmp_path / "c")
    (run / "manifest.json").unlink()
    with pytest.raises(TrajectoryError, match="manifest.json"):
        Trajectory.load(run)


def test_model_mismatch(recorded, tmp_path):
    run = _copy(recorded, tmp_path / "run")
    man = json.loads((run / "manifest.json").read_text())
    man["model"]["config"]["d_model"] = 32  # rebuilt model no longer matches the stored params
    (run / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ModelMismatchError, match="d_model|shape|param"):
        Trajectory.load(run)
    with pytest.raises(ModelMismatchError):
        TrajectoryRecorder.resume(recorded, model=tiny_model(d_model=32))


def test_unimportable_loss_fn_needs_loss_fn(tmp_path):
    model = tiny_model()

    def local_loss(m, b):
        return last_token_cross_entropy(m, b)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, opt, modular_addition(7), local_loss, steps=2, run_dir=tmp_path / "run", checkpoint_every=1, progress=False)
    with pytest.raises(TrajectoryError, match="loss_fn"):
        Trajectory.load(tmp_path / "run")
    assert Trajectory.load(tmp_path / "run", loss_fn=local_loss).verify(progress=False).ok


def test_plain_sgd_step_records_reconstruct(recorded):
    traj = Trajectory.load(recorded)
    spec = traj.optimizer_spec
    for r in traj.steps():
        assert r.state_before == {} and r.state_after == {}
        coeffs = update_coefficients(spec, r.lr, r.step_count, r.state_after, r.first_step)
        assert not coeffs.has_buffer
        delta = reconstruct_update(spec, coeffs, r.params, r.grad, None)
        for n in r.params:
            true = r.next_params[n].double() - r.params[n].double()
            assert bool(((delta[n] - true).abs() <= 1e-6 * (r.params[n].double().abs() + true.abs())).all())


def test_hooked_transformer_config_roundtrip():
    from conftest import tiny_config

    from explaind_tl.model.spec import (
        hooked_transformer_config_from_dict,
        hooked_transformer_config_to_dict,
    )

    cfg = tiny_config(11, d_model=32, dtype=torch.float64)
    d = hooked_transformer_config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d and d["dtype"] == "torch.float64"
    again = hooked_transformer_config_from_dict(d)
    assert again.dtype == torch.float64 and hooked_transformer_config_to_dict(again) == d


def test_sub_segments_are_the_same_records_last_first(tmp_path):
    """``segments(reverse=True, hold=k)``: a segment of more than ``k`` steps comes as lists of
    ``ceil(sqrt(n))`` steps, last first, replayed from states a first replay kept; every record
    is bitwise the one a whole-segment replay gives, the replay is still checked against the
    stored checkpoint, and a window starting inside a segment starts the first list there."""
    traj = _recorded(tmp_path, "adam_l2", steps=13, checkpoint_every=10, seed=3)
    assert traj.checkpoint_steps == [0, 10, 13]

    def flat(segs):
        return [r for seg in segs for r in seg]

    for start in (0, 2):
        whole = flat(traj.segments(start, reverse=True))
        traj.replay_mismatch.clear()
        lists = list(traj.segments(start, reverse=True, hold=3))
        # segment [start, 10) of n steps: lists of ceil(sqrt(n)); segment [10, 13): 3 steps, whole
        n = 10 - start
        size = math.isqrt(n - 1) + 1
        want = [list(range(10, 13))] + [list(range(t, min(t + size, 10))) for t in reversed(range(start, 10, size))]
        assert [[r.step for r in seg] for seg in lists] == want
        assert sorted(traj.replay_mismatch) == [10, 13] and max(traj.replay_mismatch.values()) == 0.0
        by_step = sorted(flat(lists), key=lambda r: r.step)
        for a, b in zip(sorted(whole, key=lambda r: r.step), by_step, strict=True):
            assert a.step == b.step and a.step_count == b.step_count and a.lr == b.lr
            assert torch.equal(a.batch_ids, b.batch_ids)
            for n_ in a.params:
                assert torch.equal(a.params[n_], b.params[n_]) and torch.equal(a.next_params[n_], b.next_params[n_])
                assert torch.equal(a.grad[n_], b.grad[n_])
            assert a.state_before.keys() == b.state_before.keys() and a.state_after.keys() == b.state_after.keys()
            for k in a.state_after:
                assert all(torch.equal(a.state_after[k][n_], b.state_after[k][n_]) for n_ in a.state_after[k])
            for k in a.state_before:
                assert all(torch.equal(a.state_before[k][n_], b.state_before[k][n_]) for n_ in a.state_before[k])
    # forward iteration and a hold the segments fit in are not split
    assert [len(s) for s in traj.segments(hold=3)] == [10, 3]
    assert [len(s) for s in traj.segments(reverse=True, hold=10)] == [3, 10]
