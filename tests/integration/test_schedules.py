"""Per-step optimizer hyper-parameters: schedulers that cycle betas/momentum, hand edits, plateaus.

OneCycleLR / CyclicLR change ``lr`` and ``betas`` (Adam) or ``momentum`` (SGD) every step, and a
user may edit ``weight_decay``, ``betas``, ``eps``, ``momentum`` or ``dampening`` between steps.
The recorder stores what every step used; replay must be exact, ``explain`` complete to float64
rounding, and the train axis must match an oracle written independently of the engine: plain
autograd, one explicit momentum buffer per training example, unrolled forward in time with the
hyper-parameters read live from the optimizer while training (no adjoint recursion).
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import DiesAfterOneSegment, modular_data

from explaind_tl import Trajectory, TrajectoryRecorder, explain
from explaind_tl.run.trajectory import ReplayMismatchWarning

P_MOD = 7
STEPS, K, BS = 8, 3, 6


def tiny_transformer(seed: int = 0, p: int = P_MOD):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, d_head=4, n_heads=2, d_mlp=32, d_vocab=p + 1, d_vocab_out=p,
        n_ctx=3, act_fn="gelu", normalization_type=None, seed=seed,
    )
    return HookedTransformer(cfg)


def ce_loss(model, batch):
    logits = model(batch["tokens"])[:, -1]
    return torch.nn.functional.cross_entropy(logits, batch["label"], reduction="none")


def _edit(**values):
    def apply(group):
        group.update(values)

    return apply


# name -> (optimizer, scheduler or None, {step: edit of the param group before that step})
RUNS = {
    "adamw_onecycle": (
        lambda ps: torch.optim.AdamW(ps, lr=3e-2, weight_decay=0.5, betas=(0.9, 0.98)),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=5e-2, total_steps=STEPS, base_momentum=0.75, max_momentum=0.95),
        {},
    ),
    "sgd_momentum_onecycle": (
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, dampening=0.1, weight_decay=0.01),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.4, total_steps=STEPS, base_momentum=0.6, max_momentum=0.95),
        {},
    ),
    "sgd_nesterov_cyclic": (
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.05, max_lr=0.3, step_size_up=3, base_momentum=0.5, max_momentum=0.95),
        {},
    ),
    "adamw_cyclic": (
        lambda ps: torch.optim.AdamW(ps, lr=3e-2, weight_decay=0.3),
        lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-2, max_lr=5e-2, step_size_up=2, base_momentum=0.7, max_momentum=0.95),
        {},
    ),
    "adam_l2_hand_edits": (
        lambda ps: torch.optim.Adam(ps, lr=3e-2, weight_decay=0.05, betas=(0.9, 0.98)),
        None,
        {2: _edit(weight_decay=0.3, betas=(0.6, 0.9)), 4: _edit(eps=1e-3, lr=1e-2), 6: _edit(betas=(0.95, 0.999), weight_decay=0.0)},
    ),
    "sgd_hand_edits": (
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, weight_decay=0.02),
        None,
        {3: _edit(momentum=0.5, dampening=0.4, weight_decay=0.1), 5: _edit(momentum=0.97, dampening=0.0)},
    ),
    "adamw_plateau": (
        lambda ps: torch.optim.AdamW(ps, lr=3e-2, weight_decay=0.5),
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=0.5),
        {},
    ),
}


def _hparams_now(opt):
    g = opt.param_groups[0]
    return {k: (tuple(v) if isinstance(v, (tuple, list)) else v) for k, v in g.items() if k in ("lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov")}


def record(tmp_path, name, seed=0):
    """Record ``RUNS[name]``; keep live copies of what the oracle needs (read from torch directly)."""
    make_opt, make_sched, edits = RUNS[name]
    train, _ = modular_data()
    model = tiny_transformer(seed)
    model0 = copy.deepcopy(model)
    opt = make_opt(model.parameters())
    sched = make_sched(opt) if make_sched else None
    plateau = isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
    rec = TrajectoryRecorder(model, opt, tmp_path / name, train, ce_loss, checkpoint_every=K, scheduler=sched, clip_grad_norm=0.5)
    g = torch.Generator().manual_seed(seed)
    names = [k for k, _ in model.named_parameters()]
    live = {"params": [{k: v.detach().clone() for k, v in model.named_parameters()}], "hp": [], "batches": [], "v": []}
    for s in range(STEPS):
        if s in edits:
            edits[s](opt.param_groups[0])
        live["hp"].append(_hparams_now(opt))
        ids = torch.randperm(len(train["label"]), generator=g)[:BS]
        rec.step(ids, scheduler_metric="loss" if plateau else None)
        live["batches"].append(ids.clone())
        live["params"].append({k: v.detach().clone() for k, v in model.named_parameters()})
        by_id = {id(p): k for k, p in model.named_parameters()}
        live["v"].append({by_id[id(p)]: st["exp_avg_sq"].clone() for p, st in opt.state.items() if "exp_avg_sq" in st})
    rec.close()
    assert [k for k, _ in model.named_parameters()] == names
    return Trajectory.load(tmp_path / name, loss_fn=ce_loss), live, model0


def _gl(n):
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1) / 2, w / 2


def oracle(model0, live, train, queries, clip_factors, kind, nodes=12):
    """Per-example contributions to Σ_q log p(label_q) by brute force, forward in time.

    Returns ``(per-example [N], regularization, weight_decay, total)``; ``total`` is
    ``Σ_s <φ_s, Δ_s>`` with the live ``Δ_s``.
    """
    m64 = copy.deepcopy(model0).double()
    names = [k for k, _ in m64.named_parameters()]

    def load(w):
        with torch.no_grad():
            for k, p in m64.named_parameters():
                p.copy_(w[k])

    def grad_of(w, fn):
        load(w)
        m64.zero_grad()
        fn(m64).backward()
        return {k: p.grad.clone() for k, p in m64.named_parameters()}

    def q_sum(m):
        logits = m(queries["tokens"])[:, -1]
        return torch.log_softmax(logits, -1).gather(1, queries["label"][:, None]).sum()

    def dot(a, b):
        return sum(float((a[k] * b[k]).sum()) for k in names)

    n = len(train["label"])
    zero = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in live["params"][0].items()}
    buf = [copy.deepcopy(zero) for _ in range(n)]
    reg_buf = copy.deepcopy(zero)
    contrib, reg_total, wd_total, total = np.zeros(n), 0.0, 0.0, 0.0
    t_nodes, t_w = _gl(nodes)
    for s, hp in enumerate(live["hp"]):
        w = {k: v.double() for k, v in live["params"][s].items()}
        d = {k: live["params"][s + 1][k].double() - w[k] for k in names}
        phi = copy.deepcopy(zero)
        for t, wt in zip(t_nodes, t_w):
            g = grad_of({k: w[k] + t * d[k] for k in names}, q_sum)
            for k in names:
                phi[k] += wt * g[k]
        total += dot(phi, d)
        ids = live["batches"][s].tolist()
        scale = clip_factors[s] / len(ids)
        ex = {i: grad_of(w, lambda m, i=i: ce_loss(m, {"tokens": train["tokens"][i : i + 1], "label": train["label"][i : i + 1]}).sum()) for i in ids}
        gi = [{k: scale * ex[i][k] if i in ex else zero[k] for k in names} for i in range(n)]
        lr, lam = hp["lr"], hp["weight_decay"]
        if kind == "sgd":
            mu, c = hp["momentum"], (1.0 if s == 0 else 1.0 - hp["dampening"])
            nest = hp["nesterov"]
            for i in range(n):
                buf[i] = {k: mu * buf[i][k] + c * gi[i][k] for k in names}
                step_i = {k: -lr * (mu * buf[i][k] + gi[i][k]) if nest else -lr * buf[i][k] for k in names}
                contrib[i] += dot(phi, step_i)
            reg_buf = {k: mu * reg_buf[k] + c * lam * w[k] for k in names}
            reg_total += dot(phi, {k: -lr * (mu * reg_buf[k] + lam * w[k]) if nest else -lr * reg_buf[k] for k in names})
            continue
        b1, b2 = hp["betas"]
        t = s + 1
        v = live["v"][s]
        P = {k: -lr / (1 - b1**t) / (v[k].double().sqrt() / (1 - b2**t) ** 0.5 + hp["eps"]) for k in names}
        for i in range(n):
            buf[i] = {k: b1 * buf[i][k] + (1 - b1) * gi[i][k] for k in names}
            contrib[i] += dot(phi, {k: P[k] * buf[i][k] for k in names})
        if kind == "adamw":
            wd_total += dot(phi, {k: -lr * lam * w[k] for k in names})
        else:
            reg_buf = {k: b1 * reg_buf[k] + (1 - b1) * lam * w[k] for k in names}
            reg_total += dot(phi, {k: P[k] * reg_buf[k] for k in names})
    return contrib, reg_total, wd_total, total


def _q(traj, test, step):
    m = traj.model(step).double()
    with torch.no_grad():
        logits = m(test["tokens"])[:, -1]
    return float(torch.log_softmax(logits, -1).gather(1, test["label"][:, None]).sum())


def _assert_complete(attr, rel=1e-9):
    c = attr.completeness
    scale = float(c.measured.abs().max())
    assert scale > 1e-6
    assert float((c.measured - c.attributed).abs().max()) <= rel * scale
    assert float(c.step_residual.abs().max()) <= rel * float(c.step_measured.abs().max())


@pytest.mark.parametrize("name", list(RUNS))
def test_varying_hyperparameters_replay_and_explain_exactly(tmp_path, name):
    traj, live, model0 = record(tmp_path, name)
    train, test = modular_data()
    kind = traj.optimizer_spec.kind
    # what every step used is recorded, and it did change during the run
    varying = ("beta1",) if kind != "sgd" else ("momentum",)
    if name.endswith("hand_edits"):
        varying = ("weight_decay", "beta1", "eps") if kind == "adam" else ("weight_decay", "momentum", "dampening")
    if name.endswith("plateau"):
        varying = ("lr",)
    for s, hp in enumerate(live["hp"]):
        got = traj.hyperparameters(s)
        assert got["lr"] == hp["lr"] and got["weight_decay"] == hp["weight_decay"]
        if kind == "sgd":
            assert (got["momentum"], got["dampening"]) == (hp["momentum"], hp["dampening"])
        else:
            assert (got["beta1"], got["beta2"], got["eps"]) == (*hp["betas"], hp["eps"])
        spec = traj.optimizer_spec_at(s)
        assert spec.lr == hp["lr"] and spec.weight_decay == hp["weight_decay"]
    for col in varying:
        assert len({traj.hyperparameters(s)[col] for s in range(STEPS)}) > 1, col
    # replay is bitwise exact, and every StepRecord carries its step's spec
    assert traj.verify(progress=False).ok
    for r in traj.steps():
        assert r.spec == traj.optimizer_spec_at(r.step) and r.lr == live["hp"][r.step]["lr"]

    kw = dict(metric="correct_logprob", dtype=torch.float64, tol=1e-12, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReplayMismatchWarning)
        by_step = explain(traj, test, by=("step",), **kw)
        by_train = explain(traj, test, by=("train",), **kw)
        by_source = explain(traj, test, by=("source", "step"), **kw)
    measured = _q(traj, test, STEPS) - _q(traj, test, 0)
    for attr in (by_step, by_train, by_source):
        _assert_complete(attr)
        assert attr.meta["replay_mismatch"] == 0.0
        assert abs(attr.total() - measured) <= 1e-9 * abs(measured)
    # the algebra of each step (its own betas/momentum/eps/decay) reconstructs its update
    src = by_source.coords["source"]
    assert float(by_source.values[src.index("update_residual")].abs().max()) <= 1e-6 * float(by_source.values.abs().max())

    contrib, reg_total, wd_total, total = oracle(model0, live, train, test, [traj.clip_factor(s) for s in range(STEPS)], kind)
    n = len(train["label"])
    scale = float(np.abs(contrib).max())
    assert scale > 1e-6
    np.testing.assert_allclose(by_train.values[:n].numpy(), contrib, rtol=0, atol=1e-10 * scale)
    coords = by_train.coords["train"]
    assert abs(float(by_train.values[coords.index("regularization")]) - reg_total) <= 1e-10 * scale
    assert abs(float(by_train.values[coords.index("weight_decay")]) - wd_total) <= 1e-10 * scale
    assert abs(by_train.total() - total) <= 1e-9 * abs(total)


@pytest.mark.parametrize("name", ["sgd_momentum_onecycle", "adam_l2_hand_edits"])
def test_window_with_varying_beta_carries_history_consistently(tmp_path, name):
    """A window starting mid-run: the momentum carried in, on both clocks, with β changing."""
    traj, _, _ = record(tmp_path, name)
    _, test = modular_data()
    kw = dict(metric="correct_logprob", dtype=torch.float64, tol=1e-12, progress=False, steps=(4, STEPS))
    seen = explain(traj, test, by=("train",), **kw)
    realized = explain(traj, test, by=("source",), **kw)
    measured = _q(traj, test, STEPS) - _q(traj, test, 4)
    _assert_complete(seen)
    _assert_complete(realized)
    assert abs(seen.total() - measured) <= 1e-9 * abs(measured)
    # history (β_a Ã_a · b_a on the seen clock, Σ_s <φ_s, P_s Π β b_a> on the realized clock),
    # regularization and weight decay are the same sums computed two ways
    scale = float(seen.values.abs().max())
    tc, sc = seen.coords["train"], realized.coords["source"]
    hist = float(realized.values[sc.index("history")])
    assert abs(hist) > 1e-6 * scale
    for lbl in ("history", "regularization", "weight_decay"):
        assert abs(float(seen.values[tc.index(lbl)]) - float(realized.values[sc.index(lbl)])) <= 1e-10 * scale, lbl
    n = traj.num_train
    data_seen = float(seen.values[:n].sum() + seen.values[tc.index("update_residual")])
    data_realized = float(realized.values[sc.index("data")] + realized.values[sc.index("update_residual")])
    assert abs(data_seen - data_realized) <= 1e-9 * scale


def _strip_hparam_columns(run):
    """Rewrite a run directory as written before per-step hyper-parameters were stored."""
    import pyarrow.parquet as pq

    from explaind_tl.run import storage

    man = json.loads((run / "manifest.json").read_text())
    for seg in man["segments"]:
        path = run / seg["file"]
        table = pq.read_table(path)
        table = table.select(["step", "lr", "clip_factor", "loss", "batch_ids"])
        pq.write_table(table, path)
        seg["sha256"] = storage.sha256_file(path)
    (run / "manifest.json").write_text(json.dumps(man))
    return man


def test_old_run_without_hyperparameter_columns_loads_and_explains_identically(tmp_path):
    import shutil

    _, test = modular_data()
    model = tiny_transformer(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.5, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s))
    train, _ = modular_data()
    with TrajectoryRecorder(model, opt, tmp_path / "new", train, ce_loss, checkpoint_every=K, scheduler=sched) as rec:
        for s in range(STEPS):
            rec.step(torch.arange(s % 3, 14, 2))
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    _strip_hparam_columns(tmp_path / "old")
    new, old = Trajectory.load(tmp_path / "new", loss_fn=ce_loss), Trajectory.load(tmp_path / "old", loss_fn=ce_loss)
    spec = old.optimizer_spec
    for s in range(STEPS):
        assert old.hyperparameters(s) == new.hyperparameters(s)
        assert old.optimizer_spec_at(s) == new.optimizer_spec_at(s)
        assert old.hyperparameters(s)["beta1"] == spec.betas[0] and old.lr(s) == new.lr(s)
    assert len({old.lr(s) for s in range(STEPS)}) == STEPS
    assert old.verify(progress=False).ok
    kw = dict(metric="correct_logprob", dtype=torch.float64, progress=False)
    for by in (("step",), ("train",)):
        a, b = explain(old, test, by=by, **kw), explain(new, test, by=by, **kw)
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-13 * float(b.values.abs().max()))


def test_replay_warning_names_the_step_whose_loss_differs(tmp_path):
    """An old-format run (no hyper-parameter columns) whose weight decay was hand-edited mid-run
    cannot be replayed; the warning names the first step whose loss differs, not CPU threads."""
    import shutil

    _, test = modular_data()
    model = tiny_transformer(2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.5)
    train, _ = modular_data()
    with TrajectoryRecorder(model, opt, tmp_path / "new", train, ce_loss, checkpoint_every=K) as rec:
        for s in range(STEPS):
            if s == 4:
                opt.param_groups[0]["weight_decay"] = 3.0
            rec.step(None)
    assert Trajectory.load(tmp_path / "new", loss_fn=ce_loss).verify(progress=False).ok  # recorded: exact
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    man = _strip_hparam_columns(tmp_path / "old")
    old = Trajectory.load(tmp_path / "old", loss_fn=ce_loss)
    with pytest.warns(ReplayMismatchWarning, match="loss at step 5 differs from the recorded one") as caught:
        segs = list(old.segments())
    msg = str(next(w.message for w in caught if w.category is ReplayMismatchWarning))
    assert "changed outside the recorder" in msg and "thread" not in msg
    assert old.replay_mismatch[3] == 0.0 and old.replay_mismatch[6] > 0
    assert min(old.loss_mismatch) == 5 and len(segs) == 3
    # a run recorded with several threads: the warning mentions them as a possible cause
    man["torch_num_threads"] = 2
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(man))
    threaded = Trajectory.load(tmp_path / "old", loss_fn=ce_loss)
    with pytest.warns(ReplayMismatchWarning, match="2 CPU threads"):
        list(threaded.segments())


def test_reduce_lr_on_plateau_resume_matches_uninterrupted(tmp_path):
    """ReduceLROnPlateau's state (best, bad epochs) survives a resume: same parameters as one run."""
    make_opt, make_sched, _ = RUNS["adamw_plateau"]
    train, _ = modular_data()

    def run(dirname, stop_at=None):
        model = tiny_transformer(3)
        opt = make_opt(model.parameters())
        rec = TrajectoryRecorder(model, opt, tmp_path / dirname, train, ce_loss, checkpoint_every=K, scheduler=make_sched(opt))
        for s in range(STEPS):
            if s == stop_at:
                rec.abort()  # the process "dies" after the checkpoint at step 6
                rec = TrajectoryRecorder.resume(tmp_path / dirname, optimizer_factory=make_opt, scheduler_factory=make_sched, loss_fn=ce_loss)
                assert rec.num_steps == 6
            rec.step(torch.arange(s % 2, 14, 2), scheduler_metric="loss")
        rec.close()
        return rec.model

    ref, resumed = run("ref"), run("resumed", stop_at=6)
    for (n, p), (_, q) in zip(ref.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    traj = Trajectory.load(tmp_path / "resumed", loss_fn=ce_loss)
    assert len({traj.lr(s) for s in range(STEPS)}) > 1 and traj.verify(progress=False).ok


def test_interrupted_train_axis_resumes_with_the_right_beta(tmp_path):
    """The adjoint needs β_{s+1} of the step after a resumed segment: it comes from the records."""
    traj, _, _ = record(tmp_path, "sgd_momentum_onecycle")
    _, test = modular_data()
    kw = dict(by=("train",), metric="correct_logprob", dtype=torch.float64, tol=1e-12, progress=False)
    ref = explain(traj, test, **kw)
    with pytest.raises(RuntimeError, match="killed"):
        explain(DiesAfterOneSegment(traj), test, resume_dir=tmp_path / "part", **kw)
    resumed = explain(traj, test, resume_dir=tmp_path / "part", **kw)
    torch.testing.assert_close(resumed.values, ref.values, rtol=0, atol=1e-13 * float(ref.values.abs().max()))
    _assert_complete(resumed)
