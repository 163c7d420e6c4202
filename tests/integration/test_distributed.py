"""explain over several processes (torch.distributed, gloo) against one process, in float64.

One process is the oracle: with ``world_size=2`` the result must be the same Attribution (dims,
coords, values to 1e-12 of their scale, the certificate's records), on both clocks, for AdamW,
Adam+L2 and SGD-nesterov runs with a schedule, clipping and minibatches. Also: a worker that
dies, a rerun that continues from the finished shard, and ``torchrun``'s already-initialised
process group. The shard planning and merging are tested as pure functions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_close_scaled, modular_data, tiny_model

from explaind_tl import Trajectory, TrajectoryRecorder, explain
from explaind_tl.engine.certify import RESTART_EVERY
from explaind_tl.engine.distributed import (
    Shard,
    merge_parts,
    plan_shards,
    shard_chunk,
    start_method,
)
from explaind_tl.errors import ExplainWorkerError
from explaind_tl.losses import last_token_cross_entropy
from explaind_tl.metrics import resolve_metric
from explaind_tl.run import codec
from explaind_tl.run.format import EXPLAIN_STATE

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-2, weight_decay=0.5, betas=(0.9, 0.98)),
    "adam_l2": lambda ps: torch.optim.Adam(ps, lr=3e-2, weight_decay=0.05),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.8, nesterov=True, weight_decay=0.01),
}
STEPS = 40


def record(root: Path, opt_name: str) -> Trajectory:
    """A float64 run: minibatches of 10 of 30 examples, a decaying schedule, clipping."""
    model = tiny_model(7, dtype=torch.float64)
    train, _ = modular_data(7, 30, 8)
    opt = OPTIMIZERS[opt_name](model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.05 * s))
    rec = TrajectoryRecorder(model, opt, root / opt_name, train, last_token_cross_entropy, checkpoint_every=10,
                             scheduler=sched, clip_grad_norm=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        rec.step(torch.randperm(30, generator=g)[:10])
    rec.close()
    return Trajectory.load(root / opt_name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return {name: record(root, name) for name in OPTIMIZERS}


@pytest.fixture(scope="module")
def queries():
    return modular_data(7, 30, 8)[1]


def assert_same(one, two):
    assert two.dims == one.dims and two.coords == one.coords
    assert_close_scaled(two.values, one.values, 1e-12)
    c1, c2 = one.completeness, two.completeness
    assert_close_scaled(c2.step_measured, c1.step_measured, 1e-12)
    assert_close_scaled(c2.step_residual, c1.step_residual, 1e-12, scale=float(c1.step_measured.abs().max()))
    assert torch.equal(c2.nodes, c1.nodes)
    assert c2.ok == c1.ok and c2.failed_steps == c1.failed_steps
    assert_close_scaled(c2.step_bound, c1.step_bound, 1e-12)


CASES = [
    ("adamw", dict(by=("step", "component", "query"), components="head"), "steps"),
    ("sgd_nesterov", dict(by=("step", "component", "query"), components="head"), "steps"),
    ("adamw", dict(by=("train", "query"), query_chunk=4), "queries"),
    ("adam_l2", dict(by=("train",), reduce="mean", query_chunk=4), "queries"),
    ("sgd_nesterov", dict(by=("step", "source"), reduce="mean", query_chunk=4), "queries"),
]


@pytest.mark.parametrize("opt_name,kw,split", CASES, ids=[f"{o}-{'-'.join(k['by'])}" for o, k, _ in CASES])
def test_two_processes_equal_one(runs, queries, opt_name, kw, split):
    traj = runs[opt_name]
    one = explain(traj, queries, progress=False, **kw)
    two = explain(traj, queries, progress=False, world_size=2, **kw)
    assert two.meta["world_size"] == 2 and two.meta["split"] == split
    assert len(two.meta["shard_seconds"]) == 2 and min(two.meta["shard_seconds"]) > 0
    assert one.completeness.ok
    assert_same(one, two)


def test_workers_fork_only_where_safe():
    linux = sys.platform.startswith("linux")
    assert start_method(1, "cpu") == ("fork" if linux else "spawn")
    assert start_method(2, "cpu") == "spawn"  # OpenMP with 2 threads hangs in a forked child
    assert start_method(1, "cuda") == "spawn"  # CUDA cannot run in a forked child


@pytest.mark.skipif(start_method(1, "cpu") != "fork", reason="workers are forked on Linux only")
def test_forked_workers_take_a_closure_metric(runs, queries):
    traj, target = runs["adamw"], 3
    kw = dict(metric=lambda logits, batch: logits[:, -1, target], by=("step", "component"), components="head",
              progress=False)
    assert_same(explain(traj, queries, **kw), explain(traj, queries, world_size=2, **kw))


def test_spawned_workers_equal_one(runs, queries):
    """Two threads per worker: spawned interpreters that load the run from its directory."""
    traj = runs["sgd_nesterov"]
    kw = dict(by=("step", "component", "query"), components="head", progress=False)
    two = explain(traj, queries, world_size=2, threads_per_worker=2, **kw)
    assert two.meta["world_size"] == 2
    assert_same(explain(traj, queries, **kw), two)


def test_arguments_are_checked_before_any_worker_starts(runs, queries):
    traj = runs["adamw"]
    with pytest.raises(ValueError, match="world_size"):
        explain(traj, queries, world_size=0, progress=False)
    with pytest.raises(TypeError, match="world_size"):
        explain(traj, queries, world_size=2.0, progress=False)
    with pytest.raises(ValueError, match="split"):
        explain(traj, queries, world_size=2, split="layers", progress=False)
    with pytest.raises(ValueError, match="gather"):
        explain(traj, queries, world_size=2, gather="rank1", progress=False)
    with pytest.raises(TypeError, match="cannot be sent to worker processes"):  # spawned: 2 threads each
        explain(traj, queries, metric=lambda logits, batch: logits[:, -1, 0], world_size=2, threads_per_worker=2,
                progress=False)
    with pytest.raises(ValueError, match="split='steps'"):
        explain(traj, queries, by=("train",), world_size=2, split="steps", progress=False)
    with pytest.raises(ValueError, match="cannot split 8 query chunks|cannot split"):
        explain(traj, queries, by=("train", "query"), world_size=9, progress=False)


# ----------------------------------------------------------------------------- faults
def lp_or_die(logits, batch):
    """``correct_logprob`` at the last position; rank 1 of a group dies when asked to (env)."""
    import torch.distributed as dist

    if os.environ.get("EXPLAIND_TEST_KILL") and dist.is_initialized() and dist.get_rank() == 1:
        state, end = Path(os.environ["EXPLAIND_TEST_KILL"]), 16  # rank 0's resume state, its last step + 1
        t0 = time.monotonic()
        while not (state.exists() and codec.load_state(state)["next_step"] == end) and time.monotonic() - t0 < 120:
            time.sleep(0.1)  # let rank 0 finish its shard first
        os._exit(7)
    return resolve_metric("correct_logprob", -1)[0](logits, batch)


def test_dead_worker_names_its_rank_and_a_rerun_resumes(runs, queries, tmp_path, monkeypatch):
    traj = runs["adamw"]
    kw = dict(by=("step", "component"), components="head", metric=lp_or_die, progress=False)
    resume = tmp_path / "resume"
    state0 = resume / "shard-0-of-2" / EXPLAIN_STATE
    monkeypatch.setenv("EXPLAIND_TEST_KILL", str(state0))
    with pytest.raises(ExplainWorkerError, match=r"rank 1 of 2 \(steps 16\.\.39\) died \(exit code 7\)"):
        explain(traj, queries, world_size=2, resume_dir=resume, **kw)
    assert codec.load_state(state0)["next_step"] == 16 and not (resume / "shard-1-of-2" / EXPLAIN_STATE).exists()
    mtime = state0.stat().st_mtime_ns
    monkeypatch.delenv("EXPLAIND_TEST_KILL")
    two = explain(traj, queries, world_size=2, resume_dir=resume, **kw)
    assert state0.stat().st_mtime_ns == mtime  # rank 0's finished shard was not swept again
    assert_same(explain(traj, queries, **kw), two)


# ----------------------------------------------------------------------------- torchrun
TORCHRUN_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import modular_data
from explaind_tl import Trajectory, explain
dist.init_process_group("gloo")
traj = Trajectory.load({run!r})
q = modular_data(7, 30, 8)[1]
attr = explain(traj, q, by=("step", "component", "query"), components="head", progress=False, gather="rank0")
if dist.get_rank() == 0:
    torch.save({{"values": attr.values, "world": attr.meta["world_size"]}}, {out!r})
else:
    assert attr is None
dist.destroy_process_group()
"""


def test_torchrun_two_processes(runs, queries, tmp_path):
    traj = runs["adamw"]
    script, out = tmp_path / "run_explain.py", tmp_path / "out.pt"
    tests = str(Path(__file__).resolve().parents[1])
    script.write_text(TORCHRUN_SCRIPT.format(tests=tests, run=str(traj.run_dir), out=str(out)))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    one = explain(traj, queries, by=("step", "component", "query"), components="head", progress=False)
    assert got["world"] == 2
    assert_close_scaled(got["values"], one.values, 1e-12)


# ----------------------------------------------------------------------------- pure pieces
def test_step_shards_cut_at_restarts_and_balance():
    shards = plan_shards("steps", 2, (0, 300), 10, checkpoints=[0, 100, 200])
    assert [(s.lo, s.hi) for s in shards] == [(0, 144), (144, 300)]
    assert all(s.lo % RESTART_EVERY == 0 for s in shards)
    shards = plan_shards("steps", 3, (5, 95), 1, checkpoints=[0, 32, 64])
    assert shards[0].lo == 5 and shards[-1].hi == 95
    assert [s.lo for s in shards[1:]] == [32, 64]  # the checkpoints, which are also restarts
    with pytest.raises(ValueError, match="cannot split 3 steps"):
        plan_shards("steps", 4, (0, 3), 10, checkpoints=[0])


def test_query_shards_hold_whole_chunks():
    assert shard_chunk(10, 256, 2) == 5 and shard_chunk(10, 3, 2) == 3
    shards = plan_shards("queries", 2, (0, 9), 10, checkpoints=[0], query_chunk=3)
    assert [(s.lo, s.hi) for s in shards] == [(0, 6), (6, 10)]
    assert shards[1].describe() == "rank 1 of 2 (queries 6..9)"


def _part(acc, steps, rows, q):
    cert = {
        "nodes_used": {s: 2 + s % 2 for s in steps},
        "kinks_seen": {s: 1 for s in steps},
        "ends": {s: torch.full((q, 1), float(s)) for s in steps},
        "step_measured": {s: torch.full((rows,), 1.0 + s) for s in steps},
        "step_attributed": {s: torch.full((rows,), 0.5 + s) for s in steps},
        "step_bound": {s: torch.full((rows,), 0.1) for s in steps},
    }
    return {"acc": acc, "cert": cert, "facts": {"readout_error": 1e-15, "replay_mismatch": {10: 0.0}}}


def test_merge_parts_steps_and_queries():
    a, b = torch.ones(2, 3, 1, 1), 2 * torch.ones(2, 3, 1, 1)
    m = merge_parts([_part(a, [0, 1], 3, 2), _part(b, [2, 3], 3, 2)], "steps", True)
    assert torch.equal(m["acc"], 3 * torch.ones(2, 3, 1, 1)) and set(m["cert"]["step_measured"]) == {0, 1, 2, 3}
    # queries, per-query rows: concatenated in rank order; end values concatenated over queries
    m = merge_parts([_part(a, [0, 1], 3, 2), _part(b, [0, 1], 3, 2)], "queries", True)
    assert m["acc"].shape == (2, 6, 1, 1) and torch.equal(m["acc"][:, 3:], b)
    assert m["cert"]["step_measured"][1].shape == (6,) and m["cert"]["ends"][0].shape == (4, 1)
    assert m["cert"]["kinks_seen"][0] == 2 and m["cert"]["nodes_used"][1] == 3
    # queries, aggregated rows: summed (bounds too: the sum of bounds bounds the summed residual)
    m = merge_parts([_part(a, [0, 1], 3, 2), _part(b, [0, 1], 3, 2)], "queries", False)
    assert torch.equal(m["acc"], 3 * torch.ones(2, 3, 1, 1))
    assert torch.allclose(m["cert"]["step_bound"][0], torch.full((3,), 0.2))
    single = _part(a, [0], 3, 2)
    assert merge_parts([single], "queries", True) is single
    assert Shard("steps", 0, 2, 0, 16).describe() == "rank 0 of 2 (steps 0..15)"
