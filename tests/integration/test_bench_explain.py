"""Smoke test of analyses/bench_explain.py on a tiny config (seconds; no timing assertions)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import max_abs

TINY = [
    "--p", "7", "--train-fraction", "0.6", "--d-model", "16", "--n-heads", "2", "--d-head", "8", "--d-mlp", "32",
    "--steps", "3", "--late-steps", "6", "--queries", "2", "--naive-steps", "3", "--midpoints", "4",
    "--agg-queries", "3", "--threads", "1",
]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _positive(x) -> bool:
    return _finite(x) and x > 0


def check_bench_explain(res: dict, agree: float) -> None:
    """Properties of a ``bench_explain.main`` result that hold on any CPU (never timings).

    Time ratios are only required to be finite and positive. The engine's entries must agree
    with the naive implementation to ``agree`` (relative to the largest naive entry: the naive
    side is a midpoint rule, so this depends on its point count), its completeness residual must
    be smaller than the naive one's, and both sides must measure the same change ``q(w_b) -
    q(w_a)`` in float64 (to 1e-9 of the largest change: float64 forwards of the same model).

    Args:
        res: The dict ``analyses.bench_explain.main`` returns (run without ``--skip-naive``).
        agree: Largest accepted relative difference between the engine and the naive entries.
    """
    assert len(res["ratio"]) == 2  # early and late window
    for row in res["ratio"]:
        assert _positive(row["ratio_wall"]) and _positive(row["ratio_cpu"])
        s = row["summary"]
        assert _finite(s["total_rel"]) and s["max_nodes"] >= 1 and row["kinks"] >= 0
    modes = [r["mode"] for r in res["naive"]]
    n_mid = modes.count("logits")
    assert n_mid >= 1 and modes == ["logits", "marginal step x head"] * n_mid + ["mean_logprob"] * n_mid
    most = max(r["midpoints"] for r in res["naive"] if "midpoints" in r)
    for i in range(n_mid):
        marginal = res["naive"][2 * i + 1]
        assert _positive(marginal["speedup_wall"])
        if res["naive"][2 * i]["midpoints"] == most:
            assert marginal["total_diff_rel"] < agree
    for row in [res["naive"][2 * i] for i in range(n_mid)] + res["naive"][2 * n_mid :]:
        assert _positive(row["speedup_wall"]) and _positive(row["speedup_cpu"])
        ours, naive = row["ours_residual"]["total_rel"], row["naive_residual"]["total_rel"]
        assert _finite(ours) and _finite(naive) and ours < naive  # certified quadrature beats midpoints
        if row["midpoints"] == most:  # ``agree`` is set for the finest midpoint rule
            assert row["max_abs_diff_rel"] < agree
        assert row["measured_gap"] <= 1e-9 * max_abs(row["_naive"]["measured"])


def test_bench_explain_smoke(capsys):
    from analyses.bench_explain import main

    res = main([*TINY, "--skip-memory"])
    out = capsys.readouterr().out
    assert "RATIO explain/train" in out and "SPEED-UP naive/ours" in out
    assert "completeness" in out and "kinks" in out and "load avg" in out
    check_bench_explain(res, agree=0.1)  # a 4-point midpoint rule: loose


def test_bench_explain_memory_table(capsys):
    from analyses.bench_explain import main

    res = main([*TINY, "--skip-naive", "--skip-plain", "--late-steps", "0", "--memory-sizes", "10,20",
                "--memory-steps", "1", "--memory-queries", "4"])
    out = capsys.readouterr().out
    assert "RATIO peak-over-baseline" in out
    rows = res["memory"]
    assert [r["n_train"] for r in rows] == [10, 20]
    for r in rows:
        assert r["peak_kb"] > 0 and _finite(r["delta_mb"]) and _finite(r["total_rel"])


def test_bench_explain_two_midpoint_rules_and_kernel_case(capsys, monkeypatch):
    """``--midpoints 2,4`` gives one naive comparison per rule; ``--case kernel`` runs the
    full-resolution kernel workload (shrunk here) and reports residuals and peak RSS."""
    from analyses import bench_kernel
    from analyses.bench_explain import main

    res = main([*TINY[:-8], "--naive-steps", "3", "--midpoints", "2,4", "--agg-queries", "3", "--threads", "1",
                "--skip-memory"])
    assert [r.get("midpoints") for r in res["naive"] if r["mode"] == "logits"] == [2, 4]
    check_bench_explain(res, agree=0.1)
    monkeypatch.setattr(bench_kernel, "STEPS", 3)
    monkeypatch.setattr(bench_kernel, "N_QUERIES", 2)
    monkeypatch.setattr(bench_kernel, "BIN", 2)
    out = main(["--case", "kernel", "--threads", "1,2"])
    text = capsys.readouterr().out
    assert "explain/train" in text and "peak RSS" in text
    rows = out["rows"]
    assert [(r["case"], r["threads"]) for r in rows] == [("kernel", 1), ("kernel", 2), ("lowmem", 1), ("binned", 1), ("binned", 2)]
    for r in rows:
        assert _positive(r["ratio"]) and r["peak_mb"] > 0 and r["anon_mb"] > 0 and r["ok"]
        assert r["total_rel"] < 1e-4 and r["mean_rel_per_query"] < 1e-4


def test_bench_distributed_smoke():
    """analyses/bench_distributed.py on a short run: two workers give one process's values."""
    from analyses import bench_distributed

    res = bench_distributed.main(["--steps", "32", "--workers", "2", "--threads", "1"])
    assert _positive(res["one_s"])
    (row,) = res["rows"]
    assert row["workers"] == 2 and _positive(row["ratio"])
    # the same float32 computations on each shard (a step split): equal up to summation order
    assert row["diff"] <= 1e-6


def test_bench_gpu_without_cuda_measures_nothing(capsys):
    """analyses/bench_gpu.py: on a machine without CUDA it says so and returns no numbers."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmark would run in full")
    from analyses import bench_gpu

    assert bench_gpu.main([]) == {}
    assert "no CUDA device" in capsys.readouterr().out


def test_kernel_bench_reads_a_childs_peak_anonymous_memory():
    """``watched`` polls a child's ``RssAnon``: a child that holds 96 MB of touched memory for a
    moment peaks at least 80 MB above one that holds none (both measured the same way)."""
    import sys

    from analyses import bench_kernel

    hold = "import time; b = bytearray(96 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.3); print('done')"
    idle = "import time; time.sleep(0.3); print('done')"
    big = bench_kernel.watched([sys.executable, "-c", hold], dict(os.environ))
    small = bench_kernel.watched([sys.executable, "-c", idle], dict(os.environ))
    assert big["stdout"].strip() == small["stdout"].strip() == "done"
    assert big["anon_kb"] - small["anon_kb"] > 80 * 1024
    with pytest.raises(RuntimeError, match="failed"):
        bench_kernel.watched([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))


def test_kernel_bench_parses_the_reference_output(monkeypatch):
    """The comparison reads the reference script's own lines (as analyses/bench_reference.py
    prints them) and refuses output without them."""
    from analyses import bench_kernel

    text = ("train_seconds   0.510\nexplain_seconds 28.574\nexplain/train   56.0\n"
            "rel_err mean over queries of ||pred_delta-actual_delta||/||actual_delta|| = 7.9640e-04\n"
            "peak RSS 577.8 MiB (after the imports: 220.8 MiB)\n")
    seen = {}

    def fake(cmd, env, interval=0.01):
        seen.update(cmd=cmd, env=env)
        return {"stdout": text, "anon_kb": 5000}

    monkeypatch.setattr(bench_kernel, "watched", fake)
    got = bench_kernel.reference_run("/somewhere/src", 2)
    assert got == {"seconds": 28.574, "train_s": 0.51, "rel": 7.964e-4, "peak_kb": 577.8 * 1024, "anon_kb": 5000}
    assert seen["cmd"][-3:] == ["analyses.bench_reference", "23", "2"]
    assert seen["env"]["PYTHONPATH"].split(os.pathsep)[0] == "/somewhere/src" and seen["env"]["OMP_NUM_THREADS"] == "2"
    text = "something else\n"
    with pytest.raises(RuntimeError, match="printed no"):
        bench_kernel.reference_run("/somewhere/src", 1)


def test_kernel_bench_refuses_a_missing_reference_before_any_work(tmp_path):
    from analyses import bench_kernel

    with pytest.raises(SystemExit, match="no explaind/epk_model.py"):
        bench_kernel.main(["--reference", str(tmp_path), "--work-dir", str(tmp_path / "never")])
    with pytest.raises(SystemExit, match="--repeats"):
        bench_kernel.main(["--repeats", "0", "--work-dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_kernel_bench_compares_medians_of_alternating_runs(monkeypatch, capsys, tmp_path):
    """``compare_reference`` alternates the two programs per thread count and takes medians."""
    from analyses import bench_kernel

    order, times = [], iter([3.0, 30.0, 2.0, 20.0, 5.0, 28.0, 1.0, 25.0, 4.0, 35.0, 9.0, 26.0])

    def run(who, t):
        order.append((who, t))
        return {"seconds": next(times), "peak_kb": 1024.0 * (500 if who == "ours" else 600), "anon_kb": 1024.0 * t}

    monkeypatch.setattr(bench_kernel, "peak_rss", lambda d, case, n, t: run("ours", t))
    monkeypatch.setattr(bench_kernel, "reference_run", lambda src, t: run("reference", t))
    got = bench_kernel.compare_reference(tmp_path, "src", [1, 2], 3)
    assert order == [("ours", 1), ("reference", 1), ("ours", 2), ("reference", 2)] * 3
    med = got["medians"]
    assert med["ours_1"]["seconds"] == 4.0 and med["reference_1"]["seconds"] == 30.0
    assert med["ours_2"]["seconds"] == 2.0 and med["reference_2"]["seconds"] == 25.0
    assert len(got["runs"]["reference_2"]) == 3
    text = capsys.readouterr().out
    assert "ratio 1/7.5" in text and "1/15.0 of its explain time" in text  # 30/4 at 1 thread; 30/2 across
