"""Counterfactual retraining and the linear datamodeling score (LDS) harness."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_close_scaled, modular_data, tiny_model

from analyses.faithfulness.lds import (
    bootstrap_mean_ci,
    fit_datamodel,
    lds,
    predictions,
    random_subsets,
    spearman_per_column,
)
from analyses.faithfulness.report import compare
from explaind_tl import Trajectory, TrajectoryRecorder
from explaind_tl.losses import last_token_cross_entropy
from explaind_tl.run.retrain import retrain


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A minibatch AdamW run with a schedule and clipping, and a full-batch SGD-momentum run."""
    root = tmp_path_factory.mktemp("retrain")
    train, _ = modular_data(7, 30, 8)
    out = {}
    model = tiny_model(7)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.05 * s))
    rec = TrajectoryRecorder(model, opt, root / "mini", train, last_token_cross_entropy, checkpoint_every=5,
                             scheduler=sched, clip_grad_norm=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        rec.step(torch.randperm(30, generator=g)[:10])
    rec.close()
    out["mini"] = Trajectory.load(root / "mini")
    model = tiny_model(7, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = TrajectoryRecorder(model, opt, root / "full", train, last_token_cross_entropy, checkpoint_every=4)
    for _ in range(8):
        rec.step()
    rec.close()
    out["full"] = Trajectory.load(root / "full")
    return out


@pytest.mark.parametrize("name", ["mini", "full"])
def test_retraining_on_every_example_reproduces_the_run_bit_for_bit(runs, name):
    traj = runs[name]
    w, want = retrain(traj), traj.params_at(traj.num_steps)
    assert all(torch.equal(w[k], want[k]) for k in want)
    keep = torch.ones(traj.num_train, dtype=torch.bool)
    keep[:3] = False
    w3 = retrain(traj, keep)
    assert any(not torch.equal(w3[k], want[k]) for k in want)  # leaving examples out changes the run


def test_a_step_whose_whole_batch_is_left_out_is_skipped(runs):
    traj = runs["mini"]
    keep = torch.ones(traj.num_train, dtype=torch.bool)
    keep[traj.batch_ids(0)] = False
    w = retrain(traj, keep, stop=1)
    w0 = traj.params_at(0)
    assert all(torch.equal(w[k], w0[k]) for k in w0)
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        retrain(traj, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        retrain(traj, torch.ones(traj.num_train))
    with pytest.raises(ValueError, match="stop must be"):
        retrain(traj, stop=traj.num_steps + 1)


def test_lds_on_constructed_outputs():
    n, m, q = 20, 12, 5
    keep = random_subsets(n, m, 0.5, seed=0)
    assert keep.shape == (m, n) and bool((keep.sum(1) == n - 10).all())
    assert not torch.equal(keep[0], keep[1])
    assert bool((random_subsets(n, m, 0.05, seed=0).sum(1) == n - 1).all())
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(n, q, generator=g, dtype=torch.float64)
    exact = predictions(scores, keep)
    assert torch.allclose(exact[:, 0], (keep.double() * scores[:, 0]).sum(1))
    monotone = torch.exp(exact)  # a monotone function of the prediction: rank correlation 1
    assert lds(scores, keep, monotone)["mean"] == pytest.approx(1.0)
    assert lds(scores, keep, -exact)["mean"] == pytest.approx(-1.0)
    noise = torch.randn(m, q, generator=g, dtype=torch.float64)
    r = lds(scores, keep, noise)
    assert abs(r["mean"]) < 0.5 and r["ci95"][0] <= r["mean"] <= r["ci95"][1]
    # Spearman with ties: mean ranks (hand-computed value)
    a = torch.tensor([[1.0], [2.0], [2.0], [3.0]])
    b = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    assert float(spearman_per_column(a, b)[0]) == pytest.approx(0.9486832980505138)
    assert torch.isnan(spearman_per_column(torch.ones(4, 1), b))[0]
    lo, hi = bootstrap_mean_ci(torch.tensor([0.1, 0.2, 0.3, float("nan")], dtype=torch.float64))
    assert 0.1 <= lo <= 0.2 <= hi <= 0.3
    with pytest.raises(ValueError, match="drop_fraction"):
        random_subsets(n, m, 1.0, seed=0)


def test_datamodel_recovers_an_additive_response_and_not_an_interaction():
    """The fitted datamodel, scored on held-out subsets: an additive response is recovered (its
    scores up to noise, LDS near 1); a response that is an interaction of pairs of examples
    (which pair is left out, not how many) has no additive part, and the ceiling says so."""
    n, q = 30, 4
    g = torch.Generator().manual_seed(3)
    truth = torch.randn(n, q, generator=g, dtype=torch.float64)
    fit, ev = random_subsets(n, 400, 0.1, seed=1), random_subsets(n, 64, 0.1, seed=2)
    y = predictions(truth, fit) + 1e-3 * torch.randn(400, q, generator=g, dtype=torch.float64)
    theta = fit_datamodel(fit, y)
    # every subset leaves the same number out, so scores are determined up to a constant per query
    assert_close_scaled(theta - theta.mean(0), truth - truth.mean(0), k=0.05)
    assert lds(theta, ev, predictions(truth, ev))["mean"] > 0.95
    # interaction: +1 when both examples of one of the pairs (0, 1), (2, 3), ... are left out together,
    # -1 when exactly one of them is: symmetric in the pair, so no single example carries it
    def pairs(keep):
        drop = (~keep).to(torch.float64)
        both = (drop[:, 0::2] * drop[:, 1::2]).sum(1)
        one = ((drop[:, 0::2] + drop[:, 1::2]) == 1).to(torch.float64).sum(1)
        return (both - 0.2 * one)[:, None].expand(-1, q) * torch.linspace(1, 2, q, dtype=torch.float64)
    theta_i = fit_datamodel(fit, pairs(fit))
    assert abs(lds(theta_i, ev, pairs(ev))["mean"]) < 0.3
    with pytest.raises(ValueError, match="same M"):
        fit_datamodel(fit, y[:10])
    with pytest.raises(ValueError, match="ridge"):
        fit_datamodel(fit, y, ridge=-1.0)


@pytest.mark.parametrize("bad", [2, True, 1.5, -1])
def test_faithfulness_refuses_a_bad_datamodel_count_before_any_work(tmp_path, bad):
    from analyses.faithfulness.harness import run_faithfulness

    with pytest.raises(ValueError, match="datamodel must be"):
        run_faithfulness("induction", "tiny", tmp_path / "never", datamodel=bad)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("study,bad", [("grokking", "next_token_logprob"), ("induction", "correct_logit"),
                                       ("grokking", "logit_diff")])
def test_faithfulness_refuses_a_metric_the_study_cannot_read_before_any_work(tmp_path, capsys, study, bad):
    from analyses.cli import main
    from analyses.faithfulness.harness import run_faithfulness

    with pytest.raises(ValueError, match="metric for the"):
        run_faithfulness(study, "tiny", tmp_path / "never", metric=bad)
    with pytest.raises(ValueError, match="unknown study"):
        run_faithfulness("bogus", "tiny", tmp_path / "never", metric=bad)
    assert main(["faithfulness", "--study", study, "--out", str(tmp_path / "never"), "--metric", bad]) == 2
    assert "--metric" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_query_outputs_read_the_chosen_metric(runs):
    """The retrained models' outputs follow ``metric``, against the model's own logits (float64): the
    correct logit is the gathered logit, the log-prob is it minus the logsumexp, the loss minus that."""
    from analyses.faithfulness.harness import query_outputs

    traj = runs["mini"]
    _, test = modular_data(7, 30, 8)
    w = retrain(traj)
    lp = query_outputs(traj, w, test, "correct_logprob", -1)
    assert_close_scaled(query_outputs(traj, w, test, "loss", -1), -lp, k=1e-12)
    model = traj.model(0).double()
    assert not model.load_state_dict({k: v.double() for k, v in w.items()}, strict=False).unexpected_keys
    with torch.no_grad():
        logits = model(test["tokens"])[:, -1]
    want = logits.gather(1, test["label"][:, None])[:, 0]
    assert_close_scaled(query_outputs(traj, w, test, "correct_logit", -1), want, k=1e-12)
    assert_close_scaled(lp, want - logits.logsumexp(-1), k=1e-12)


def test_compare_uses_interval_overlap():
    assert compare({"ci95": [0.5, 0.7]}, {"ci95": [0.1, 0.4]}) == "wins"
    assert compare({"ci95": [0.1, 0.4]}, {"ci95": [0.5, 0.7]}) == "loses"
    assert compare({"ci95": [0.1, 0.6]}, {"ci95": [0.5, 0.7]}) == "ties"


def test_faithfulness_command_on_the_tiny_induction_study(tmp_path, capsys):
    from analyses.cli import main

    out = tmp_path / "faith"
    assert main(["faithfulness", "--study", "induction", "--out", str(out), "--subsets", "5", "--queries", "4",
                 "--datamodel", "6", "--quiet"]) == 0
    assert "LDS" in capsys.readouterr().out
    res = json.loads((out / "faithfulness.json").read_text())
    assert set(res["lds_by_fraction"]) == {"0.5", "0.05"} and res["lds"] == res["lds_by_fraction"]["0.5"]
    for block in res["lds_by_fraction"].values():
        assert set(block) == {"explaind_tl", "tracin", "grad_dot", "metagradient", "datamodel"}
        assert block["datamodel"]["n_fit"] == 6
        for b in block.values():
            assert b["n_subsets"] == 5 and b["n_queries"] == 4 and len(b["ci95"]) == 2
            assert -1.0 <= b["mean"] <= 1.0
    report = (out / "report.md").read_text()
    assert "| 0.05 | ExPLAIND train axis |" in report and (out / "lds.png").stat().st_size > 1000
    assert "| 0.05 | exact metagradient |" in report and "Where the exact metagradient stands" in report
    assert "**Ceiling.**" in report and "6 at drop 0.05" in report and "datamodel" in res["seconds"]
    abl = res["ablation"]
    assert set(abl) == {"explaind_tl", "attribution_patching", "weight_norm", "random"}
    units = ["L0H0", "L0H1", "L1H0", "L1H1", "embed", "pos_embed"]  # tiny induction: attention-only, 2 x 2 heads
    for name, b in abl.items():
        assert len(b["zero"]) == len(b["mean"]) == len(units) + 1
        if name != "random":
            assert sorted(b["order"]) == units
        assert b["zero"][0] == pytest.approx(abl["random"]["zero"][0])  # k = 0: nothing ablated
        assert b["zero"][-1] == pytest.approx(abl["random"]["zero"][-1])  # k = K: every unit ablated
    assert "## Component ablation" in report and (out / "ablation.png").stat().st_size > 1000
    pr = res["pruning"]
    assert pr["fractions"] == [0.001, 0.003, 0.01, 0.03, 0.1, 0.3] and pr["n_predictions"] > 100
    for name in ("explaind_tl", "magnitude", "random"):
        assert len(pr[name]["accuracy"]) == len(pr[name]["agreement"]) == 6
    assert "## Parameter pruning" in report and (out / "pruning.png").stat().st_size > 1000
    assert main(["faithfulness", "--study", "induction", "--out", str(out), "--subsets", "2"]) == 2
    assert main(["faithfulness", "--study", "induction", "--out", str(out), "--datamodel", "2"]) == 2


def _flat_grad(model, scalar):
    grads = torch.autograd.grad(scalar, [p for p in model.parameters() if p.requires_grad])
    return torch.cat([g.reshape(-1) for g in grads]).double()


def test_tracin_and_grad_dot_against_autograd_loops(runs):
    """Independent oracle: plain autograd, one example and one query at a time."""
    from analyses.faithfulness.methods import grad_dot_scores, tracin_scores
    from explaind_tl.metrics import resolve_metric

    traj = runs["mini"]
    _, test = modular_data(7, 30, 8)
    q = {k: v[:3] for k, v in test.items()}
    fn, _ = resolve_metric("correct_logprob", -1)

    def grads_at(step):
        model = traj.model(step).double()
        for p in model.parameters():
            p.requires_grad_(True)
        gq = [_flat_grad(model, fn(model(q["tokens"][j: j + 1]), {k: v[j: j + 1] for k, v in q.items()})[0])
              for j in range(3)]
        gl = {i: _flat_grad(model, last_token_cross_entropy(model, traj.batch(torch.tensor([i])))[0])
              for i in range(traj.num_train)}
        return torch.stack(gq), gl

    want = torch.zeros(traj.num_train, 3, dtype=torch.float64)
    for s in range(traj.num_steps):
        gq, gl = grads_at(s)
        for i in traj.batch_ids(s).tolist():
            want[i] -= traj.lr(s) * (gq @ gl[i])
    got = tracin_scores(traj, q, "correct_logprob", -1)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    gq, gl = grads_at(traj.num_steps)
    want_gd = -torch.stack([gq @ gl[i] for i in range(traj.num_train)])
    for chunk in (7, 512):
        got_gd = grad_dot_scores(traj, q, "correct_logprob", -1, chunk=chunk)
        assert torch.allclose(got_gd, want_gd, rtol=1e-9, atol=1e-12 * float(want_gd.abs().max()))


# ----------------------------------------------------------------------------- head ablation
def _copy_with_w_o_scaled(model, heads, scale):
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer, h in heads:
            m.blocks[layer].attn.W_O[h] *= scale
    return m


def test_zero_ablation_equals_zeroing_the_units_output_weights():
    """Oracles: z_h = 0 is the same as W_O[h] = 0 (the head then adds nothing but b_O); a
    neuron's post-activation 0 is the same as its W_out row 0; the embedding 0 as W_E = 0."""
    from analyses.faithfulness.ablation import ablated_metric, unit_means, units_of
    from explaind_tl.metrics import resolve_metric

    model = tiny_model(7)
    _, test = modular_data(7, 30, 8)
    heads = [(0, 1), (0, 3)]
    fn, _ = resolve_metric("correct_logprob", -1)
    with torch.no_grad():
        want = float(fn(_copy_with_w_o_scaled(model, heads, 0.0)(test["tokens"]).double(), test).mean())
        plain = float(fn(model(test["tokens"]).double(), test).mean())
        m2 = copy.deepcopy(model)
        m2.blocks[0].mlp.W_out[[3, 17]] = 0.0
        m2.embed.W_E.zero_()
        want_n = float(fn(m2(test["tokens"]).double(), test).mean())
    assert ablated_metric(model, test, "correct_logprob", -1, ["L0H1", "L0H3"], "zero") == pytest.approx(want, rel=1e-6)
    assert ablated_metric(model, test, "correct_logprob", -1, ["L0N3", "L0N17", "embed"], "zero") == pytest.approx(
        want_n, rel=1e-6)
    assert ablated_metric(model, test, "correct_logprob", -1, [], "zero") == pytest.approx(plain, rel=1e-9)
    means = unit_means(model, test)
    assert means["blocks.0.attn.hook_z"].shape == (model.cfg.n_heads, model.cfg.d_head)
    assert means["blocks.0.mlp.hook_post"].shape == (model.cfg.d_mlp,)
    assert ablated_metric(model, test, "correct_logprob", -1, ["L0H1", "L0H3"], "mean", means) != pytest.approx(want, rel=1e-6)
    assert len(units_of(model)) == 2 + model.cfg.n_heads + model.cfg.d_mlp


def test_attribution_patching_is_the_derivative_along_each_heads_output():
    """Oracle: |d m / d α| at α = 1 with the head's W_O scaled by α (autograd on α)."""
    from analyses.faithfulness.ablation import attribution_patching
    from explaind_tl.metrics import resolve_metric

    model = tiny_model(7, dtype=torch.float64)
    _, test = modular_data(7, 30, 8)
    fn, _ = resolve_metric("correct_logprob", -1)
    got = attribution_patching(model, test, "correct_logprob", -1)
    got = {(0, int(u[3:])): v for u, v in got.items() if u.startswith("L0H")}
    from torch.func import functional_call

    base = {n: p.detach() for n, p in model.named_parameters()}
    for h in range(model.cfg.n_heads):
        alpha = torch.ones((), dtype=torch.float64, requires_grad=True)
        w_o = base["blocks.0.attn.W_O"].clone()
        scaled = torch.cat([w_o[:h], (alpha * w_o[h])[None], w_o[h + 1:]])
        logits = functional_call(model, {**base, "blocks.0.attn.W_O": scaled}, (test["tokens"],))
        (d,) = torch.autograd.grad(fn(logits, test).mean(), alpha)
        assert got[(0, h)] == pytest.approx(abs(float(d)), rel=1e-8)
    # a neuron: its W_out row scaled by α
    neurons = attribution_patching(model, test, "correct_logprob", -1)
    for n in (0, 5, 17):
        alpha = torch.ones((), dtype=torch.float64, requires_grad=True)
        w_out = base["blocks.0.mlp.W_out"].clone()
        scaled = torch.cat([w_out[:n], (alpha * w_out[n])[None], w_out[n + 1:]])
        logits = functional_call(model, {**base, "blocks.0.mlp.W_out": scaled}, (test["tokens"],))
        (d,) = torch.autograd.grad(fn(logits, test).mean(), alpha)
        assert neurons[f"L0N{n}"] == pytest.approx(abs(float(d)), rel=1e-8, abs=1e-14)


def test_fall_area_and_order():
    from analyses.faithfulness.ablation import fall_area, order

    assert fall_area([1.0, 0.5, 0.0]) == pytest.approx(0.75)
    assert order({"L0H1": 1.0, "L0H0": 1.0, "L1H0": 2.0}) == ["L1H0", "L0H0", "L0H1"]
    assert order({"L0N2": 1.0, "embed": 1.0, "L0H3": 1.0, "L0N10": 1.0}) == ["embed", "L0H3", "L0N2", "L0N10"]


def test_entry_map_splits_the_parameter_attribution_exactly(runs):
    """One component per scalar: the entries of a parameter add up to that parameter's
    attribution (granularity "parameter", an independent map), and every scalar is covered once."""
    from analyses.faithfulness.pruning import entry_map
    from explaind_tl import explain

    traj = runs["mini"]
    _, test = modular_data(7, 30, 8)
    q = {k: v[:3] for k, v in test.items()}
    cmap = entry_map(traj.model(0), list(traj.param_names))
    n_params = sum(p.numel() for p in traj.model(0).parameters())
    assert len(cmap.labels) == n_params and sorted(cmap.flat_index.tolist()) == list(range(n_params))
    kw = dict(metric="correct_logprob", reduce="sum", progress=False, dtype=torch.float64)
    entries = explain(traj, q, by=("component",), components=cmap, **kw)
    per_param = explain(traj, q, by=("component",), components="parameter", **kw)
    start = 0
    for name in traj.param_names:
        size = dict(traj.model(0).named_parameters())[name].numel()
        got = float(entries.values[start:start + size].sum())
        want = float(per_param.sel(component=name).values)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12 * float(per_param.values.abs().max()))
        start += size


def test_explaind_entry_scores_sum_each_querys_entries(runs):
    """``[P]`` scores, each ``Σ_q |A_{q,p}|``: against one explain per query (an independent
    split of the same sum), whatever order the result's axes come in."""
    from analyses.faithfulness.pruning import entry_map, explaind_entry_scores
    from explaind_tl import explain

    traj = runs["mini"]
    _, test = modular_data(7, 30, 8)
    q = {k: v[:3] for k, v in test.items()}
    got = explaind_entry_scores(traj, q, "correct_logprob", -1)
    cmap = entry_map(traj.model(0), list(traj.param_names))
    assert got.shape == (len(cmap.labels),)
    want = sum(explain(traj, {k: v[j:j + 1] for k, v in q.items()}, metric="correct_logprob", by=("component",),
                       components=cmap, progress=False).values.abs() for j in range(3))
    assert torch.allclose(got, want.to(torch.float64), rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_pruning_zeroes_the_lowest_scores_and_tells_rankings_apart(runs):
    from analyses.faithfulness.pruning import flat_params, predictions, pruned, run_pruning

    flat = torch.tensor([5.0, -1.0, 3.0, 0.5, -2.0], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.1, 0.5, 0.1, 0.7], dtype=torch.float64)
    assert pruned(flat, scores, 0.4).tolist() == [5.0, 0.0, 3.0, 0.0, -2.0]  # ties: the earlier entry first
    assert pruned(flat, scores, 0.1).tolist() == flat.tolist()  # floor(0.5) = 0 entries
    traj = runs["mini"]
    train, test = modular_data(7, 30, 8)
    q = {k: v[:3] for k, v in test.items()}
    evaluation = {k: torch.cat([train[k], test[k]]) for k in test}
    res = run_pruning(traj, q, evaluation, "correct_logprob", -1, fractions=(0.01, 0.3, 0.9), seeds=2)
    assert set(res) >= {"explaind_tl", "magnitude", "random", "unpruned", "fractions"}
    # the unpruned accuracy against an independent forward through TransformerLens
    model = traj.model(traj.num_steps)
    with torch.no_grad():
        want = float((model(evaluation["tokens"])[:, -1].argmax(-1) == evaluation["label"]).double().mean())
    assert res["unpruned"]["accuracy"] == pytest.approx(want)
    for name in ("explaind_tl", "magnitude", "random"):
        assert all(0.0 <= a <= 1.0 for a in res[name]["accuracy"] + res[name]["agreement"])
    # the evaluation discriminates: pruning the *largest* weights first (the reverse of magnitude)
    # destroys agreement where magnitude pruning keeps it
    flat = flat_params(traj)
    base, _, _ = predictions(traj, flat, evaluation, "correct_logprob", -1)
    worst, _, _ = predictions(traj, pruned(flat, -flat.abs(), 0.3), evaluation, "correct_logprob", -1)
    assert float((worst == base).double().mean()) < res["magnitude"]["agreement"][1]
