"""The induction study: its data, its progress measures on constructed patterns, and the tiny
config end to end through the command line (seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_close_scaled

from analyses.induction.pipeline import phase_change_window
from analyses.induction.report import _spearman
from analyses.induction.scores import (
    icl_score,
    induction_score,
    previous_token_score,
    repeated_random,
)
from analyses.induction.task import get_config, make_sequences


def test_sequences_copy_a_segment_and_mark_what_induction_can_predict():
    cfg = get_config("default")
    d = make_sequences(cfg, 400, seed=3)
    assert d["tokens"].shape == (400, cfg.n_ctx) and d["tokens"].max() < cfg.d_vocab
    for i in range(400):
        L, m = int(d["copy_len"][i]), d["copy_mask"][i]
        if not d["is_repeat"][i]:
            assert L == 0 and not m.any()
            continue
        assert cfg.seg_min <= L <= cfg.seg_max and int(m.sum()) == L - 1
        b = int(m.nonzero()[0]) - 1  # the copy starts one before its first marked token
        seg = d["tokens"][i, b: b + L]
        sources = [a for a in range(0, b - L + 1) if torch.equal(d["tokens"][i, a: a + L], seg)]
        assert sources, f"row {i}: no earlier occurrence of its copied segment"
    assert 0.6 < float(d["is_repeat"].double().mean()) < 0.9  # 75% repeats
    again = make_sequences(cfg, 400, seed=3)
    assert all(torch.equal(d[k], again[k]) for k in d)
    assert not torch.equal(make_sequences(cfg, 400, seed=4)["tokens"], d["tokens"])
    with pytest.raises(ValueError, match="repeat_fraction"):
        make_sequences(cfg, 4, seed=0, repeat_fraction=1.5)
    with pytest.raises(ValueError, match="seg_min"):
        make_sequences(cfg.replace(seg_max=20), 4, seed=0)


def _causal_uniform(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]


def test_scores_on_constructed_patterns():
    n, half = 12, 6
    prev = torch.zeros(n, n)
    prev[0, 0] = 1.0
    prev[torch.arange(1, n), torch.arange(n - 1)] = 1.0
    ind = torch.zeros(n, n)
    ind[torch.arange(n), torch.arange(n)] = 1.0
    ind[torch.arange(half, n), torch.arange(1, half + 1)] = 1.0  # q -> q - half + 1
    ind[torch.arange(half, n), torch.arange(half, n)] = 0.0
    pattern = torch.stack([prev, ind, _causal_uniform(n)])[None].repeat(2, 1, 1, 1)  # [batch, head, q, k]
    p = previous_token_score(pattern)
    s = induction_score(pattern, half)
    assert_close_scaled(p[:2], torch.tensor([1.0, 0.0]), 1e-12)
    assert_close_scaled(s[:2], torch.tensor([0.0, 1.0]), 1e-12)
    assert_close_scaled(p[2], torch.tensor(sum(1 / (q + 1) for q in range(1, n)) / (n - 1)), 1e-12)
    assert_close_scaled(s[2], torch.tensor(sum(1 / (q + 1) for q in range(half, n)) / half), 1e-12)
    losses = torch.tensor([[3.0, 3.0, 2.0, 1.0], [3.0, 1.0, 2.0, 1.0]])
    assert icl_score(losses, slice(0, 2), slice(2, 4)) == pytest.approx(1.5 - 2.5)
    r = repeated_random(5, 4, 10, seed=0)
    assert torch.equal(r[:, :4], r[:, 4:])


def test_phase_change_window_and_rank_correlation():
    steps = [0, 100, 200, 300, 400]
    loss = [3.0, 2.9, 1.0, 0.9, 0.8]  # the fall is between 100 and 200
    assert phase_change_window(steps, loss, 100, 400) == (100, 200)
    assert phase_change_window(steps, loss, 1000, 400) == (0, 400)  # clipped to the run
    assert _spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert _spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert _spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties: mean ranks
    assert math.isnan(_spearman([1, 2], [1, 2]))


def test_tiny_study_end_to_end_through_the_command_line(tmp_path, capsys):
    from analyses.cli import main
    from explaind_tl import Attribution

    out = tmp_path / "induction"
    assert main(["induction", "--config", "tiny", "--out", str(out), "--quiet", "--threads", "1"]) == 0
    assert "report:" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["explain"]) == {"logprob", "icl", "train", "train_tokens"}
    for name, e in summary["explain"].items():
        assert e["certificate_ok"], name
        assert abs(e["total"] - e["measured"]) <= 1e-4 * max(abs(e["measured"]), 1e-3), name
    lp = Attribution.load(out / "attr_logprob.safetensors")
    assert lp.dims == ("component", "step", "source") and "L1H0" in lp.coords["component"]
    assert "data" in lp.coords["source"] and "history" in lp.coords["source"]
    assert len(lp.coords["step"]) == summary["num_steps"]
    tr = Attribution.load(out / "attr_train.safetensors")
    assert tr.dims == ("component", "train")
    import pandas as pd

    top = pd.read_csv(out / "top_tokens.csv")
    assert len(top) == get_config("tiny").top_k and top["value"].abs().is_monotonic_decreasing
    assert summary["top_tokens_head"].startswith("L")
    a, b = summary["window"]
    assert 0 <= a < b <= summary["num_steps"]
    report = (out / "report.md").read_text()
    for section in ("## Progress measures", "## ExPLAIND", "### Heads", "### Where the window's attribution",
                    "### Training sequences", "### Training tokens"):
        assert section in report
    for fig in ("curves.png", "heatmap_logprob.png", "cumulative_logprob.png"):
        assert (out / fig).stat().st_size > 1000 and f"({fig})" in report


def test_tiny_study_on_a_transformer_bridge(tmp_path, capsys):
    """`--backend bridge`: the same study on a TransformerBridge initialised as the
    HookedTransformer is; where TransformerLens still has HookedTransformer, the two runs' curves
    agree (same numbers at initialisation, the same forward up to rounding)."""
    pytest.importorskip("transformer_lens.model_bridge")
    import pandas as pd

    from analyses.cli import main

    out = tmp_path / "bridge"
    assert main(["induction", "--config", "tiny", "--out", str(out), "--quiet", "--threads", "1", "--backend", "bridge"]) == 0
    assert "backend bridge" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["backend"] == "bridge"
    for name, e in summary["explain"].items():
        assert e["certificate_ok"], name
        assert e["forward"] == "model", name  # no read-out forward for bridges
    bridge_curve = pd.read_csv(out / "metrics.csv")
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return
    assert main(["induction", "--config", "tiny", "--out", str(tmp_path / "hooked"), "--quiet", "--threads", "1",
                 "--backend", "hooked", "--no-explain"]) == 0
    hooked_curve = pd.read_csv(tmp_path / "hooked" / "metrics.csv")
    for col in ("eval_loss", "copy_loss", "ind_L1H0"):
        assert_close_scaled(torch.tensor(bridge_curve[col].values), torch.tensor(hooked_curve[col].values), 1e-4)
