"""Smoke test of analyses/bench_explain.py on a tiny config (seconds; no timing assertions)."""

from __future__ import annotations

import math

TINY = [
    "--p", "7", "--train-fraction", "0.6", "--d-model", "16", "--n-heads", "2", "--d-head", "8", "--d-mlp", "32",
    "--steps", "3", "--late-steps", "6", "--queries", "2", "--naive-steps", "3", "--midpoints", "4",
    "--agg-queries", "3", "--threads", "1",
]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_bench_explain_smoke(capsys):
    from analyses.bench_explain import main

    res = main([*TINY, "--skip-memory"])
    out = capsys.readouterr().out
    assert "RATIO explain/train" in out and "SPEED-UP naive/ours" in out
    assert "completeness" in out and "kinks" in out and "load avg" in out
    assert len(res["ratio"]) == 2  # early and late window
    for row in res["ratio"]:
        assert _finite(row["ratio_wall"]) and _finite(row["ratio_cpu"])
        s = row["summary"]
        assert _finite(s["total_rel"]) and s["max_nodes"] >= 1 and row["kinks"] >= 0
    assert [r["mode"] for r in res["naive"]] == ["logits", "marginal step x head", "mean_logprob"]
    marginal = res["naive"].pop(1)
    assert _finite(marginal["speedup_wall"]) and marginal["total_diff_rel"] < 0.1
    for row in res["naive"]:
        assert _finite(row["speedup_wall"]) and _finite(row["speedup_cpu"])
        assert _finite(row["ours_residual"]["total_rel"]) and _finite(row["naive_residual"]["total_rel"])
        # the naive oracle and the engine compute the same quantity (4-point midpoint rule: loose)
        assert row["max_abs_diff_rel"] < 0.1
        assert row["measured_gap"] < 1e-9


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
