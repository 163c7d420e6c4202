"""Slow checks (``make test-slow``, i.e. ``pytest -m slow``): the full default grokking study and
the benchmarks at full size.

They assert properties that hold on any CPU: the run groks by the config's own stopping rule,
every report file is written, every attribution meets its completeness certificate, replay is
bitwise, ratios are finite and positive. Never timings, exact steps or loss values: the
trajectory of a grokking run differs slightly between CPU vendors (BLAS summation order).
"""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import torch
from test_bench_explain import check_bench_explain
from test_grokking import check_certificates, check_report, check_test_attribution

from analyses.grokking.task import get_config

pytestmark = pytest.mark.slow


def test_default_grokking_study(tmp_path):
    """``make demo``'s study (``explaind-tl grokking``, config ``default``) end to end."""
    from analyses.cli import main

    cfg = get_config("default")
    out = tmp_path / "grokking-default"
    try:  # 2 threads: the analyses overlap replay with the quadrature, as in `make demo`
        assert main(["grokking", "--config", "default", "--out", str(out), "--quiet", "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(1)
    claims = check_report(out, "default")
    # it groks before the step cap and stops the config's extra steps after (step numbers vary by CPU)
    m = pd.read_csv(out / "metrics.csv")
    grokked = m.loc[m["test_acc"] >= cfg.stop_test_acc, "step"]
    assert len(grokked) > 0
    assert m["step"].iloc[-1] == grokked.iloc[0] + cfg.extra_steps < cfg.max_steps
    assert m["train_acc"].iloc[-1] == 1.0 and m["test_acc"].iloc[-1] >= cfg.stop_test_acc
    # the phases are ordered, and memorisation comes well before generalisation
    ph = json.loads((out / "phases.json").read_text())["phases"]
    assert 0 < ph["memorisation_end"] <= ph["cleanup_start"] <= ph["generalisation"] <= ph["end"]
    assert ph["generalisation"] == grokked.iloc[0] and ph["generalisation"] > 2 * ph["memorisation_end"]
    verdict = dict(zip(claims["claim"], claims["verdict"]))
    assert verdict["Memorisation precedes generalisation (grokking)"] == "reproduced"
    assert verdict["ExPLAIND is exact: the attribution sums to the output change"] == "reproduced"
    # every attribution is certified; the test-set one sums to the float64 change of the metric
    check_test_attribution(out, cfg)
    assert check_certificates(out) >= 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == m["step"].iloc[-1] and summary["completeness rel residual"] < 1e-5


def test_bench_explain_full_size(capsys):
    """``python -m analyses.bench_explain`` with its defaults: every part, properties only."""
    from analyses.bench_explain import main

    res = main([])
    out = capsys.readouterr().out
    assert "RATIO explain/train" in out and "SPEED-UP naive/ours" in out and "RATIO peak-over-baseline" in out
    check_bench_explain(res, agree=1e-2)  # 100 midpoints across ReLU kinks (~1e-4 seen)
    sizes = [r["n_train"] for r in res["memory"]]
    assert sizes == sorted(sizes) and len(sizes) >= 2
    for r in res["memory"]:
        # float32 train-axis runs: the residual is float32 rounding of sums over N_train examples
        # relative to a small 3-step change (7e-8 .. 2e-5 seen from 240 to 1,920 examples)
        assert r["peak_kb"] > 0 and math.isfinite(r["delta_mb"]) and 0 <= r["total_rel"] < 1e-3


def test_bench_recording_full_size(capsys):
    """``python -m analyses.bench_recording --verify`` with its defaults: replay is bitwise, and
    the recorded run is smaller on disk than storing every step's parameters and state."""
    from analyses.bench_recording import main

    main(["--verify"])
    out = capsys.readouterr().out
    assert "verify: VerifyReport(ok=True, max_abs_diff=0," in out
    per_step, every_step, smaller = re.search(r"bytes/step: ([\d,]+) .* vs ([\d,]+) storing .*-> ([\d.]+)x smaller", out).groups()
    assert 0 < int(per_step.replace(",", "")) < int(every_step.replace(",", "")) and float(smaller) > 1
    overheads = [float(x) for x in re.findall(r"overhead ([+-]?[\d.]+)%", out)]
    assert len(overheads) == 3 and all(math.isfinite(x) for x in overheads)  # reported, not bounded
