"""Exact metagradients against finite differences of real retraining, in float64.

The oracle is the project's own training step rerun from the initialisation with one example's
loss weighted ``1 ± h`` (:func:`explaind_tl.run.retrain.retrain` with ``weights``): a central
difference of the query outputs after the run. Adam's update ``m / sqrt(v)`` is strongly curved
where gradients are small, so the differences need a small ``h`` (1e-7; float64 rounding then
contributes ~1e-9 of the scale).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close_scaled, modular_addition, tiny_model

from explaind_tl import Trajectory, TrajectoryRecorder, metagradient
from explaind_tl.errors import CertificateWarning
from explaind_tl.losses import last_token_cross_entropy
from explaind_tl.metrics import resolve_metric
from explaind_tl.run.retrain import retrain

OPTIMIZERS = {
    # AdamW with clipping and a step schedule, Adam with coupled L2 and a cosine schedule, SGD nesterov
    "adamw_clip_steplr": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5), 0.5,
                          lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5)),
    "adam_l2_cosine": (lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1), None,
                       lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10)),
    "sgd_nesterov": (lambda ps: torch.optim.SGD(ps, lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01), None,
                     None),
}


def record(root, name: str, steps: int = 10, rows: int = 30, **model_kw):
    data = modular_addition(7)
    train = {k: v[:rows] for k, v in data.items()}
    model = tiny_model(act_fn="gelu", dtype=torch.float64, **model_kw)
    make, clip, sched = OPTIMIZERS[name]
    opt = make(model.parameters())
    g = torch.Generator().manual_seed(0)
    with TrajectoryRecorder(model, opt, root / name, train, last_token_cross_entropy, checkpoint_every=4,
                            clip_grad_norm=clip, scheduler=sched(opt) if sched else None) as rec:
        for _ in range(steps):
            rec.step(torch.randperm(rows, generator=g)[:12])
    return Trajectory.load(root / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("metagrad")
    return {name: record(root, name) for name in OPTIMIZERS}


def queries():
    data = modular_addition(7)
    return {k: v[30:34] for k, v in data.items()}


def outputs(traj, params, q):
    fn, _ = resolve_metric("correct_logprob", -1)
    model = traj.model()
    with torch.no_grad():
        return fn(torch.func.functional_call(model, params, (q["tokens"],)), q)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_against_finite_differences_of_retraining(runs, name):
    traj, q = runs[name], queries()
    mg = metagradient(traj, q, metric="correct_logprob", progress=False)
    assert mg.dims == ("train", "query") and mg.values.shape == (30, 4)
    assert mg.completeness is None and mg.meta["ok"]
    # the differentiated step is the recorded one, to float64 rounding
    assert mg.meta["gradient_residual"] < 1e-10 and mg.meta["optimizer_residual"] < 1e-10
    assert mg.meta["step_residual"] < 1e-8
    h = 1e-7
    for i in range(0, 30, 4):
        up = torch.ones(30, dtype=torch.float64)
        down = up.clone()
        up[i] += h
        down[i] -= h
        fd = (outputs(traj, retrain(traj, weights=up), q) - outputs(traj, retrain(traj, weights=down), q)) / (2 * h)
        assert_close_scaled(mg.values[i], fd, 1e-6, scale=float(mg.values.abs().max()))
    assert float(mg.values.abs().max()) > 1e-3


def test_full_batch_weight_decay_run_against_finite_differences(tmp_path):
    """Full-batch AdamW with weight decay 1.0 (the grokking regime, where removing examples is
    far from linear): the metagradient is still the derivative of retraining."""
    data = modular_addition(7)
    train = {k: v[:30] for k, v in data.items()}
    model = tiny_model(act_fn="gelu", dtype=torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1.0, betas=(0.9, 0.98))
    with TrajectoryRecorder(model, opt, tmp_path / "full", train, last_token_cross_entropy, checkpoint_every=16) as rec:
        for _ in range(40):
            rec.step(None)
    traj, q = Trajectory.load(tmp_path / "full"), queries()
    mg = metagradient(traj, q, metric="correct_logprob", progress=False)
    assert mg.meta["ok"]
    h = 1e-7
    for i in (0, 13, 29):
        up, down = torch.ones(30, dtype=torch.float64), torch.ones(30, dtype=torch.float64)
        up[i] += h
        down[i] -= h
        fd = (outputs(traj, retrain(traj, weights=up), q) - outputs(traj, retrain(traj, weights=down), q)) / (2 * h)
        assert_close_scaled(mg.values[i], fd, 1e-6, scale=float(mg.values.abs().max()))


def test_reduce_window_and_unseen_examples(runs):
    traj, q = runs["adamw_clip_steplr"], queries()
    full = metagradient(traj, q, progress=False)
    mean = metagradient(traj, q, reduce="mean", progress=False)
    total = metagradient(traj, q, reduce="sum", progress=False)
    assert mean.dims == ("train",)
    assert_close_scaled(mean.values, full.values.mean(1), 1e-12)
    assert_close_scaled(total.values, full.values.sum(1), 1e-12)
    # q(w_6) through steps 3..5: examples in none of those batches get exactly 0, the others not
    part = metagradient(traj, q, steps=(3, 6), progress=False)
    seen = torch.zeros(30, dtype=torch.bool)
    for s in range(3, 6):
        seen[traj.batch_ids(s)] = True
    assert bool((part.values[~seen] == 0).all()) and bool((part.values[seen].abs().sum(1) > 0).all())
    # and q(w_6) through every step 0..5 against retraining that stops at step 6
    first = metagradient(traj, q, steps=(0, 6), progress=False)
    h, i = 1e-7, int(traj.batch_ids(5)[0])
    up, down = torch.ones(30, dtype=torch.float64), torch.ones(30, dtype=torch.float64)
    up[i] += h
    down[i] -= h
    fd = (outputs(traj, retrain(traj, stop=6, weights=up), q) - outputs(traj, retrain(traj, stop=6, weights=down), q)) / (2 * h)
    assert_close_scaled(first.values[i], fd, 1e-6, scale=float(first.values.abs().max()))


def test_unit_weights_reproduce_the_run_bit_for_bit(runs):
    traj = runs["adam_l2_cosine"]
    w, want = retrain(traj, weights=torch.ones(30, dtype=torch.float64)), traj.params_at(traj.num_steps)
    assert all(torch.equal(w[k], want[k]) for k in want)
    w2 = retrain(traj, weights=torch.full((30,), 2.0, dtype=torch.float64))
    assert any(not torch.equal(w2[k], want[k]) for k in want)


def test_unused_embedding_rows_give_finite_derivatives(tmp_path):
    """Tokens that never occur leave Adam's ``v = 0`` on their embedding rows; the metagradient
    stays finite (the guarded square root: ``tests/unit/test_optim.py`` has its counter-example)."""
    data = modular_addition(7)
    keep = (data["tokens"][:, 0] < 5) & (data["tokens"][:, 1] < 5)  # tokens 5 and 6 never seen
    train = {k: v[keep][:20] for k, v in data.items()}
    model = tiny_model(act_fn="gelu", dtype=torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with TrajectoryRecorder(model, opt, tmp_path / "run", train, last_token_cross_entropy) as rec:
        for _ in range(3):
            rec.step(None)
    traj = Trajectory.load(tmp_path / "run")
    q = {k: v[keep][20:24] for k, v in data.items()}
    assert float(traj.optimizer_state_at(3)["exp_avg_sq"]["embed.W_E"][5:7].abs().max()) == 0.0
    mg = metagradient(traj, q, progress=False)
    assert bool(torch.isfinite(mg.values).all()) and mg.meta["ok"]


def test_a_step_that_is_not_the_recorded_one_is_flagged(runs, monkeypatch):
    """The ok rule's counter-example: an optimizer algebra off by 1% fails it, with a warning."""
    import explaind_tl.engine.metagrad as mod

    traj, q = runs["sgd_nesterov"], queries()
    real = mod.functional_step
    monkeypatch.setattr(mod, "functional_step", lambda spec, lr, *a: real(spec, lr * 1.01, *a))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mg = metagradient(traj, q, progress=False)
    assert not mg.meta["ok"] and mg.meta["optimizer_residual"] > 1e-3
    assert any(issubclass(w.category, CertificateWarning) and "does not reproduce" in str(w.message) for w in caught)


def test_bad_arguments_fail_before_any_work(runs):
    traj, q = runs["sgd_nesterov"], queries()
    with pytest.raises(ValueError, match="wrt must be"):
        metagradient(traj, q, wrt="parameters", progress=False)
    with pytest.raises(ValueError, match="reduce must be"):
        metagradient(traj, q, reduce="max", progress=False)
    with pytest.raises(ValueError, match="steps window"):
        metagradient(traj, q, steps=(5, 3), progress=False)
    with pytest.raises(ValueError, match="steps must be"):
        metagradient(traj, q, steps=5, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        metagradient(traj, q, dtype=torch.float16, progress=False)
    with pytest.raises(ValueError, match="tol"):
        metagradient(traj, q, tol=0, progress=False)
    with pytest.raises(ValueError, match="weights must be"):
        retrain(traj, weights=torch.ones(29))
    with pytest.raises(ValueError, match="weights must be"):
        retrain(traj, weights=torch.ones(30, dtype=torch.long))


def _binned(v: torch.Tensor, width: int) -> torch.Tensor:
    """Per-step entries ``[steps, ...]`` summed into bins of ``width`` steps."""
    return torch.stack([v[i:i + width].sum(0) for i in range(0, v.shape[0], width)])


def _retrain_scaled(traj, label: str, cmap, steps: range, scale: float):
    """Retraining with component ``label``'s part of the updates of ``steps`` scaled by ``scale``
    (the optimizer state as the step left it): the oracle of ``wrt="component_step"``."""
    model, opt, params = traj.fresh_training()
    c = cmap.labels.index(label)
    masks = [cmap.index[n] == c for n in traj.param_names]
    for s in range(traj.num_steps):
        before = [p.detach().clone() for p in params]
        traj.train_step_at(s, model, opt, params, traj.batch(traj.batch_ids(s)))
        if s in steps:
            with torch.no_grad():
                for p, w0, m in zip(params, before, masks):
                    p.copy_(torch.where(m, w0 + scale * (p - w0), p))
    return {n: p.detach().clone() for n, p in zip(traj.param_names, params)}


@pytest.mark.parametrize("name", ["adamw_clip_steplr", "sgd_nesterov"])
def test_component_step_against_finite_differences(runs, name):
    from explaind_tl import ComponentMap

    traj, q = runs[name], queries()
    mg = metagradient(traj, q, wrt="component_step", components="head", step_bins=4, progress=False)
    cmap = ComponentMap.from_model(traj.model(0), "head", param_names=list(traj.param_names))
    assert mg.dims == ("step", "component", "query") and mg.coords["step"] == [0, 4, 8]
    assert mg.coords["component"] == cmap.labels and mg.meta["ok"]
    h = 1e-6
    for label, k in (("L0H1", 0), ("L0.mlp", 1), ("embed", 2), ("unembed", 0)):
        window = range(4 * k, min(4 * k + 4, traj.num_steps))
        up = outputs(traj, _retrain_scaled(traj, label, cmap, window, 1 + h), q)
        down = outputs(traj, _retrain_scaled(traj, label, cmap, window, 1 - h), q)
        got = mg.sel(component=label).values[k]
        assert_close_scaled(got, (up - down) / (2 * h), 1e-6, scale=float(mg.values.abs().max()))
    # the last step: its adjoint is the query gradient at w_b, so the entry is <∇q(w_b), Δ_{b-1}|_c>
    last = metagradient(traj, q, wrt="component_step", steps=(0, traj.num_steps), reduce="sum", progress=False)
    fn, _ = resolve_metric("correct_logprob", -1)
    m = traj.model()
    w_b = {k: v.detach().requires_grad_(True) for k, v in traj.params_at(traj.num_steps).items()}
    g = torch.autograd.grad(fn(torch.func.functional_call(m, w_b, (q["tokens"],)), q).sum(), list(w_b.values()))
    d = {k: traj.params_at(traj.num_steps)[k] - traj.params_at(traj.num_steps - 1)[k] for k in w_b}
    flat = torch.cat([(gi * d[k]).reshape(-1) for gi, k in zip(g, w_b) if k in cmap.param_names])
    assert_close_scaled(last.values[-1], cmap.reduce_flat(flat), 1e-10)
    per_query = metagradient(traj, q, wrt="component_step", progress=False)  # one bin per step
    assert_close_scaled(last.values, per_query.values.sum(-1), 1e-12)
    assert_close_scaled(mg.values, _binned(per_query.values, 4), 1e-12)  # bins are sums of steps


def test_component_step_arguments(runs):
    traj, q = runs["sgd_nesterov"], queries()
    with pytest.raises(ValueError, match="step_bins must be"):
        metagradient(traj, q, wrt="component_step", step_bins=0, progress=False)
    with pytest.raises(ValueError, match="step_bins applies"):
        metagradient(traj, q, step_bins=2, progress=False)
    with pytest.raises(ValueError, match="components applies"):
        metagradient(traj, q, components="neuron", progress=False)
    with pytest.raises(ValueError, match="granularity|components"):
        metagradient(traj, q, wrt="component_step", components="no-such", progress=False)
