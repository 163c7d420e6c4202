"""The read-out forward against TransformerLens's own forward, in float64.

TransformerLens is the oracle: logits at the read-out position, gradients of a metric, ReLU
pre-activations and forced ReLU states (via TransformerLens hooks) must agree to rounding.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close_scaled, modular_addition, tiny_model
from torch.func import grad

from explaind_tl import Trajectory, TrajectoryRecorder, explain
from explaind_tl.metrics import resolve_metric
from explaind_tl.model.functional import KINK_MASK, KINK_ON, QueryFunction
from explaind_tl.model.readout import Readout, readout_units, unsupported_reason

CONFIGS = {
    "1L_relu": dict(),
    "2L_gelu_LN": dict(n_layers=2, act_fn="gelu", normalization_type="LN"),
    "2L_relu_LNPre": dict(n_layers=2, normalization_type="LNPre", n_ctx=4),
    "attn_only_2L": dict(n_layers=2, attn_only=True),
    "gelu_new_no_scale": dict(act_fn="gelu_new", use_attn_scale=False),
}


def randomised(overrides: dict, seed: int = 0):
    """A float64 tiny model whose every parameter (biases and LayerNorm too) is random."""
    model = tiny_model(**overrides).double()
    model.cfg.dtype = torch.float64  # TransformerLens's LayerNorm casts to cfg.dtype
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def tokens_for(model, n: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n, model.cfg.n_ctx), generator=g)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("position", [-1, 1])
@pytest.mark.parametrize("n_tokens", [2, 40])  # layer 0 computed directly / from the (token, position) table
def test_logits_and_gradients_match_transformer_lens(name, position, n_tokens):
    model = randomised(CONFIGS[name])
    assert unsupported_reason(model) is None
    tok = tokens_for(model, n=n_tokens)
    label = torch.arange(len(tok)) % model.cfg.d_vocab_out
    batch = {"tokens": tok, "label": label}
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    ro = Readout(model, position)
    ours, _ = ro.logits(params, tok)
    with torch.no_grad():
        ref = model(tok)[:, position]
    assert ours.shape == ref.shape
    assert_close_scaled(ours, ref, 1e-12)  # float64 rounding relative to the largest logit

    metric, _ = resolve_metric("correct_logprob", position)
    fast = QueryFunction(model, list(params), metric, dtype=torch.float64, position=position)
    slow = QueryFunction(model, list(params), metric, dtype=torch.float64)
    assert fast.readout is not None and slow.readout is None
    w = torch.linspace(0.5, 1.5, len(tok), dtype=torch.float64)
    g_fast = fast.aggregate_grad(params, batch, w, False)
    g_slow = slow.aggregate_grad(params, batch, w, False)
    # gradients are compared as a family: rounding is relative to the largest gradient, and some
    # (e.g. attention key biases: softmax is shift-invariant) are analytically zero
    assert_close_scaled(g_fast, g_slow, 1e-12)
    pq_fast = fast.per_query_grad(params, batch, False)
    pq_slow = slow.per_query_grad(params, batch, False)
    assert_close_scaled(pq_fast, pq_slow, 1e-12)
    # an independent gradient: plain autograd through TransformerLens
    m = randomised(CONFIGS[name])
    lp = torch.log_softmax(m(tok)[:, position], -1).gather(1, label[:, None])[:, 0]
    (lp * w).sum().backward()
    assert_close_scaled({k: g[0] for k, g in g_fast.items()}, {k: p.grad for k, p in m.named_parameters()}, 1e-12)


@pytest.mark.parametrize("position", [-1, 1])
def test_preacts_and_forced_relus_match_hooks(position):
    model = randomised(dict(n_layers=2, n_ctx=4))
    tok = tokens_for(model, n=6)
    batch = {"tokens": tok, "label": torch.arange(6) % model.cfg.d_vocab_out}
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    metric, _ = resolve_metric("correct_logit", position)
    fast = QueryFunction(model, list(params), metric, dtype=torch.float64, position=position)
    slow = QueryFunction(model, list(params), metric, dtype=torch.float64)
    _, z_fast = fast.values_and_preacts(params, batch, cert=False)
    _, z_slow = slow.values_and_preacts(params, batch, cert=False)
    keep = readout_units(model.cfg, tok.shape[1], position)
    assert z_fast.shape == z_slow.shape
    assert 0 < int(keep.sum()) < keep.numel()
    assert_close_scaled(z_fast[:, keep], z_slow[:, keep], 1e-12)
    assert bool((z_fast[:, ~keep] == 0).all())
    # force a random set of relevant units on or off (against their natural state too)
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(z_fast.shape, generator=g) < 0.3) & keep
    on = torch.rand(z_fast.shape, generator=g) < 0.5
    forced = {**batch, KINK_MASK: mask, KINK_ON: on}
    w = torch.ones(6, dtype=torch.float64)
    g_fast = fast.aggregate_grad(params, forced, w, False)
    g_slow = slow.aggregate_grad(params, forced, w, False)
    g_free = slow.aggregate_grad(params, batch, w, False)
    assert max(float((g_slow[k] - g_free[k]).abs().max()) for k in params) > 1e-3  # forcing matters
    # blocks.0.attn.b_K's gradient is analytically zero: both paths leave rounding noise relative
    # to the largest gradient (~9e3 here), so the family's scale is the right one; forcing units
    # through a 2-layer model amplifies rounding (~2e-13 of the largest seen), hence 1e-11
    assert_close_scaled(g_fast, g_slow, 1e-11)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("position", [-1, 1])
def test_path_forward_and_node_stacked_quadrature(name, position):
    """Rows at ``params + t_i delta`` (the linear path form) equal TransformerLens at those
    parameters, and the node-stacked per-query quadrature equals the node-by-node one."""
    model = randomised(CONFIGS[name])
    tok = tokens_for(model, n=5)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(7)
    delta = {k: 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    t = torch.tensor([0.1, 0.9, 0.5, 0.0, 1.0], dtype=torch.float64)
    ours, _ = Readout(model, position).logits(params, tok, path=(delta, t))
    with torch.no_grad():
        ref = torch.stack([
            torch.func.functional_call(model, {k: params[k] + float(t[i]) * delta[k] for k in params}, (tok[i : i + 1],))[0, position]
            for i in range(len(tok))
        ])
    assert_close_scaled(ours, ref, 1e-12)
    assert float((ours - Readout(model, position).logits(params, tok)[0]).abs().max()) > 1e-3  # the path matters

    metric, _ = resolve_metric("logits", position)
    fast = QueryFunction(model, list(params), metric, dtype=torch.float64, position=position)
    slow = QueryFunction(model, list(params), metric, dtype=torch.float64)
    nodes = [0.2, 0.5, 0.8]
    weights = torch.rand(len(tok), len(nodes), generator=g, dtype=torch.float64)
    batch = {"tokens": tok}
    if fast.has_kinks:  # forced ReLU states travel with their query's stacked nodes
        _, z = fast.values_and_preacts(params, batch, cert=False)
        keep = readout_units(model.cfg, tok.shape[1], position)
        batch = {**batch, KINK_MASK: (torch.rand(z.shape, generator=g) < 0.3) & keep, KINK_ON: torch.rand(z.shape, generator=g) < 0.5}
    q_fast = fast.per_query_quadrature(params, delta, nodes, weights, batch, True)
    q_slow = slow.per_query_quadrature(params, delta, nodes, weights, batch, True)
    assert_close_scaled(q_fast, q_slow, 1e-11)
    if not fast.has_kinks:
        return
    # pieces: each query evaluated with 3 forced patterns and their own weights, the last piece
    # of every other query padded (weight 0), equal the sum of one-piece calls on both paths
    k = 3
    masks = [(torch.rand(z.shape, generator=g) < 0.3) & keep for _ in range(k)]
    ons = [torch.rand(z.shape, generator=g) < 0.5 for _ in range(k)]
    pw = torch.rand(len(tok), k, len(nodes), generator=g, dtype=torch.float64)
    pw[::2, -1] = 0.0
    pieces = {"tokens": tok[:, None].expand(-1, k, -1), KINK_MASK: torch.stack(masks, 1), KINK_ON: torch.stack(ons, 1)}
    oracle = {}
    for j in range(k):
        one = slow.per_query_quadrature(params, delta, nodes, pw[:, j], {"tokens": tok, KINK_MASK: masks[j], KINK_ON: ons[j]}, True)
        oracle = {n: oracle.get(n, 0) + v for n, v in one.items()}
    for qf in (fast, slow):
        assert_close_scaled(qf.per_query_quadrature(params, delta, nodes, pw, pieces, True), oracle, 1e-11)
    first = slow.per_query_quadrature(params, delta, nodes, pw[:, 0], {"tokens": tok, KINK_MASK: masks[0], KINK_ON: ons[0]}, True)
    assert max(float((oracle[n] - first[n]).abs().max()) for n in oracle) > 1e-3  # the other pieces matter


def test_unsupported_models_fall_back():
    assert "positional_embedding_type" in unsupported_reason(tiny_model(positional_embedding_type="rotary", rotary_dim=4))
    assert unsupported_reason(tiny_model(gated_mlp=True)) is not None
    assert unsupported_reason(torch.nn.Linear(2, 2)) == "not a HookedTransformer"
    with pytest.raises(ValueError, match="does not support"):
        Readout(tiny_model(act_fn="solu_ln"), -1)
    metric, _ = resolve_metric("correct_logit", -1)
    qf = QueryFunction(tiny_model(gated_mlp=True), [], metric, position=-1)
    assert qf.readout is None


@pytest.fixture
def relu_run(tmp_path):
    data = modular_addition(7)
    train = {k: v[:30] for k, v in data.items()}
    test = {k: v[30:40] for k, v in data.items()}
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    from explaind_tl.losses import last_token_cross_entropy

    with TrajectoryRecorder(model, opt, tmp_path / "run", train, last_token_cross_entropy, checkpoint_every=4) as rec:
        for _ in range(6):
            rec.step(None)
    return Trajectory.load(tmp_path / "run"), test


def test_explain_same_with_and_without_readout(relu_run):
    traj, test = relu_run
    kw = dict(by=("step", "component", "query"), components="head", progress=False, dtype=torch.float64, tol=1e-10)
    fast = explain(traj, test, **kw)
    slow = explain(traj, test, fast_forward=False, **kw)
    assert fast.meta["forward"] == "readout" and slow.meta["forward"] == "model"
    assert fast.meta["readout_error"] < 1e-12
    assert fast.meta["kinks"] > 0
    assert_close_scaled(fast.values, slow.values, 1e-9)  # both certified to tol=1e-10 per step
    assert fast.completeness.summary()["total_rel"] < 1e-10


def test_mismatching_readout_is_detected_and_switched_off(relu_run, monkeypatch):
    traj, test = relu_run
    real = Readout.__init__

    def broken(self, model, position):
        real(self, model, position)
        self.attn_scale = [s * 1.5 for s in self.attn_scale]

    monkeypatch.setattr(Readout, "__init__", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attr = explain(traj, test, by=("step",), progress=False, dtype=torch.float64, tol=1e-10)
    assert any("read-out forward differs" in str(w.message) for w in caught)
    assert attr.meta["forward"] == "model" and attr.meta["readout_error"] > 1e-6
    assert attr.completeness.summary()["total_rel"] < 1e-10
    # inside a run (checkpoints, window ends) a disagreement is an error, not a silent switch
    model = traj.model()
    metric, _ = resolve_metric("correct_logprob", -1)
    qf = QueryFunction(model, list(traj.param_names), metric, position=-1)
    with pytest.raises(RuntimeError, match="fast_forward=False"):
        qf.check_readout(test["tokens"], dict(model.named_parameters()), strict=True)


def test_certificate_is_checked_at_checkpoints(relu_run, monkeypatch):
    """The read-out forward is compared with TransformerLens at the window ends and checkpoints."""
    traj, test = relu_run
    seen = []
    real = QueryFunction.check_readout

    def spy(self, tokens, params=None, tol=1e-9, strict=False):
        seen.append((strict, None if params is None else float(params["unembed.W_U"].double().sum())))
        return real(self, tokens, params, tol, strict)

    monkeypatch.setattr(QueryFunction, "check_readout", spy)
    attr = explain(traj, test, by=("step",), progress=False, steps=(1, 6))
    assert attr.meta["forward"] == "readout" and attr.meta["readout_error"] < 1e-12
    checked = {round(v, 9) for strict, v in seen if strict}
    # window ends 1 and 6, checkpoint 4 (checkpoint_every=4): three distinct parameter points
    expected = {round(float(traj.params_at(s)["unembed.W_U"].double().sum()), 9) for s in (1, 4, 6)}
    assert expected <= checked


def test_readout_check_uses_grad_free_reference():
    model = randomised({})
    ro = Readout(model, -1)
    assert ro.check(model, tokens_for(model)) < 1e-12
    # the metric's gradient through the read-out forward is finite and nonzero
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tok = tokens_for(model)
    gr = grad(lambda p: ro.logits(p, tok)[0].sum())(params)
    assert all(bool(torch.isfinite(v).all()) for v in gr.values())
    assert float(gr["unembed.W_U"].abs().sum()) > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_taped_per_example_training_gradients_match_autograd(name):
    """The built-in loss's per-example gradients through the read-out forward's tape (one
    backward for the batch, ``Σ_rows xᵀ δ`` per example) against plain autograd through
    TransformerLens, one example at a time, in float64, on every supported architecture."""
    from explaind_tl.losses import last_token_cross_entropy
    from explaind_tl.model.training_loss import LossFunction

    model = randomised(CONFIGS[name])
    tok = tokens_for(model, n=7)
    batch = {"tokens": tok, "label": torch.arange(len(tok)) % model.cfg.d_vocab_out}
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    fast = LossFunction(model, last_token_cross_entropy, torch.float64, "cpu", fast_forward=True)
    assert fast.readout is not None
    got = fast.per_example_grad(params, batch)
    for i in [0, 3, 6]:
        m = randomised(CONFIGS[name])
        last_token_cross_entropy(m, {k: v[i : i + 1] for k, v in batch.items()}).sum().backward()
        assert_close_scaled({k: v[i] for k, v in got.items()}, {k: p.grad for k, p in m.named_parameters()}, 1e-12)
    # the examples are told apart: example 0's gradient is not example 3's
    assert float((got["unembed.W_U"][0] - got["unembed.W_U"][3]).abs().max()) > 1e-3


def test_training_loss_through_readout_matches(relu_run):
    """The built-in last-token cross entropy through the read-out forward: same data entries."""
    from explaind_tl.losses import last_token_cross_entropy
    from explaind_tl.model.training_loss import LossFunction

    traj, test = relu_run
    assert traj.loss_fn is last_token_cross_entropy
    model = traj.model(3)
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    batch = traj.batch(torch.arange(12))
    fast = LossFunction(model, last_token_cross_entropy, torch.float64, "cpu", fast_forward=True)
    slow = LossFunction(model, last_token_cross_entropy, torch.float64, "cpu")
    assert fast.readout is not None and slow.readout is None
    assert fast.check_readout(batch["tokens"]) < 1e-12
    assert_close_scaled(fast.losses(params, batch), slow.losses(params, batch), 1e-12)
    g_fast, g_slow = fast.per_example_grad(params, batch), slow.per_example_grad(params, batch)
    assert_close_scaled(g_fast, g_slow, 1e-12)
    g = torch.Generator().manual_seed(0)
    tangents = {k: torch.randn((3, *v.shape), generator=g, dtype=torch.float64) for k, v in params.items()}
    assert_close_scaled(fast.per_example_dots(params, batch, tangents), slow.per_example_dots(params, batch, tangents), 1e-12)
    # a custom loss function is never replaced
    custom = LossFunction(model, lambda m, b: last_token_cross_entropy(m, b) * 2, torch.float64, "cpu", fast_forward=True)
    assert custom.readout is None
    # explain on the train axis agrees with and without the read-out forward
    kw = dict(by=("component", "train"), components="head", dtype=torch.float64, tol=1e-10, progress=False)
    a, b = explain(traj, test, **kw), explain(traj, test, fast_forward=False, **kw)
    assert_close_scaled(a.values, b.values, 1e-9)  # both certified to tol=1e-10 per step


# ------------------------------------------------------------------ several read positions
READS = {"contiguous": [1, 2, 3], "gaps": [0, 2, 4], "one_early": [1], "all_but_last": None}  # of 6 positions


def _reads(name: str, n_ctx: int) -> list[int]:
    return list(range(n_ctx - 1)) if READS[name] is None else READS[name]


def lm_tokens(model, n: int) -> torch.Tensor:
    """Sequences whose every token is also a valid next-token label (``< d_vocab_out``)."""
    return tokens_for(model, n=n) % model.cfg.d_vocab_out


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("reads", list(READS))
@pytest.mark.parametrize("n_tokens", [2, 40])  # layer 0 computed directly / from the (token, position) table
def test_several_read_positions_match_transformer_lens(name, reads, n_tokens):
    """Logits at every read position equal TransformerLens's (0 elsewhere); next-token metric
    gradients through the read-out forward equal those through TransformerLens's forward."""
    model = randomised({**CONFIGS[name], "n_ctx": 6})
    tok = lm_tokens(model, n_tokens)
    read = _reads(reads, tok.shape[1])
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    ours, _ = Readout(model, read).logits(params, tok)
    with torch.no_grad():
        ref = model(tok)
    assert ours.shape == ref.shape
    assert_close_scaled(ours[:, read], ref[:, read], 1e-12)
    others = [p for p in range(tok.shape[1]) if p not in read]
    assert bool((ours[:, others] == 0).all())

    metric, _ = resolve_metric("next_token_logprob", read)
    fast = QueryFunction(model, list(params), metric, dtype=torch.float64, position=read)
    slow = QueryFunction(model, list(params), metric, dtype=torch.float64)
    assert fast.readout is not None and slow.readout is None
    batch = {"tokens": tok}
    assert_close_scaled(fast.values(params, batch), slow.values(params, batch), 1e-12)
    w = torch.linspace(0.5, 1.5, len(tok), dtype=torch.float64)
    assert_close_scaled(fast.aggregate_grad(params, batch, w, False), slow.aggregate_grad(params, batch, w, False), 1e-12)
    assert_close_scaled(fast.per_query_grad(params, batch, False), slow.per_query_grad(params, batch, False), 1e-12)


@pytest.mark.parametrize("reads", ["gaps", "contiguous"])
def test_several_read_positions_preacts_and_forcing(reads):
    model = randomised(dict(n_layers=2, n_ctx=6))
    tok = lm_tokens(model, 6)
    read = _reads(reads, tok.shape[1])
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    metric, _ = resolve_metric("next_token_logprob", read)
    fast = QueryFunction(model, list(params), metric, dtype=torch.float64, position=read)
    slow = QueryFunction(model, list(params), metric, dtype=torch.float64)
    batch = {"tokens": tok}
    _, z_fast = fast.values_and_preacts(params, batch, cert=False)
    _, z_slow = slow.values_and_preacts(params, batch, cert=False)
    keep = readout_units(model.cfg, tok.shape[1], read)
    # the last layer keeps only the read positions' units
    last = keep[-tok.shape[1] * model.cfg.d_mlp:].reshape(tok.shape[1], -1)
    assert last[read].all() and not last[[p for p in range(tok.shape[1]) if p not in read]].any()
    assert_close_scaled(z_fast[:, keep], z_slow[:, keep], 1e-12)
    assert bool((z_fast[:, ~keep] == 0).all())
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(z_fast.shape, generator=g) < 0.3) & keep
    on = torch.rand(z_fast.shape, generator=g) < 0.5
    forced = {**batch, KINK_MASK: mask, KINK_ON: on}
    w = torch.ones(6, dtype=torch.float64)
    g_fast = fast.aggregate_grad(params, forced, w, False)
    g_slow = slow.aggregate_grad(params, forced, w, False)
    assert max(float((g_slow[k] - slow.aggregate_grad(params, batch, w, False)[k]).abs().max()) for k in params) > 1e-3
    assert_close_scaled(g_fast, g_slow, 1e-11)


@pytest.mark.parametrize("name", ["1L_relu", "attn_only_2L", "2L_gelu_LN"])
@pytest.mark.parametrize("metric_name,position", [("correct_logprob", -1), ("next_token_logprob", [0, 2])])
def test_node_stacked_aggregate_quadrature(name, metric_name, position):
    """Groups of rows along the path (node-major, several rows per node) equal TransformerLens at
    those parameters; the node-stacked aggregate quadrature equals one gradient per node."""
    model = randomised({**CONFIGS[name], "n_ctx": 4})
    tok = lm_tokens(model, 4)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(11)
    delta = {k: 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    stacked = torch.cat([tok, tok])  # node 0's rows, then node 1's
    ours, _ = Readout(model, position).logits(params, stacked, path=(delta, t))
    with torch.no_grad():
        ref = torch.cat([
            torch.func.functional_call(model, {k: params[k] + float(tj) * delta[k] for k in params}, (tok,)) for tj in t
        ])
    ref = ref[:, position] if isinstance(position, int) else ref
    if isinstance(position, int):
        assert_close_scaled(ours, ref, 1e-12)
    else:
        assert_close_scaled(ours[:, position], ref[:, position], 1e-12)
    assert float((ours[:4] - ours[4:]).abs().max()) > 1e-3  # the groups sit at different points
    with pytest.raises(ValueError, match="values of t"):  # neither one per row nor one per equal group
        Readout(model, position).logits(params, stacked, path=(delta, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)))

    label = {"label": torch.arange(len(tok)) % model.cfg.d_vocab_out} if metric_name == "correct_logprob" else {}
    batch = {"tokens": tok, **label}
    metric, _ = resolve_metric(metric_name, position)
    fast = QueryFunction(model, list(params), metric, dtype=torch.float64, position=position)
    slow = QueryFunction(model, list(params), metric, dtype=torch.float64)
    if fast.has_kinks:  # forced ReLU states travel with their query's rows in every node group
        _, z = fast.values_and_preacts(params, batch, cert=False)
        keep = readout_units(model.cfg, tok.shape[1], position)
        batch = {**batch, KINK_MASK: (torch.rand(z.shape, generator=g) < 0.3) & keep, KINK_ON: torch.rand(z.shape, generator=g) < 0.5}
    nodes = [0.2, 0.5, 0.8]
    weights = torch.rand(len(tok), len(nodes), generator=g, dtype=torch.float64)
    for resolve in (False, True):
        q_fast = fast.aggregate_quadrature(params, delta, nodes, weights, batch, resolve)
        q_slow = slow.aggregate_quadrature(params, delta, nodes, weights, batch, resolve)
        assert_close_scaled(q_fast, q_slow, 1e-11)


def test_explain_next_token_metric_through_the_readout(tmp_path):
    """A sequence model explained with a next-token metric at several positions: the read-out
    forward is used (checked against TransformerLens) and gives the values of the model's own."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from explaind_tl.losses import next_token_cross_entropy

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=10, act_fn="gelu",
                                  d_mlp=32, normalization_type="LN", seed=0, device="cpu")
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    half = torch.randint(0, 10, (40, 4), generator=g)
    data = {"tokens": torch.cat([half, half], 1)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with TrajectoryRecorder(model, opt, tmp_path / "run", data, next_token_cross_entropy, checkpoint_every=3) as rec:
        for _ in range(5):
            rec.step(torch.randperm(40, generator=g)[:16])
    traj = Trajectory.load(tmp_path / "run")
    q = {"tokens": data["tokens"][:6], "loss_mask": torch.zeros(6, 8, dtype=torch.bool)}
    q["loss_mask"][:, 5:] = True
    kw = dict(metric="next_token_logprob", components="head", progress=False, dtype=torch.float64, tol=1e-10)
    fast = explain(traj, q, by=("step", "component"), reduce="mean", **kw)
    slow = explain(traj, q, by=("step", "component"), reduce="mean", fast_forward=False, **kw)
    assert fast.meta["forward"] == "readout" and slow.meta["forward"] == "model"
    assert fast.meta["readout_error"] < 1e-12
    assert_close_scaled(fast.values, slow.values, 1e-9)
    assert fast.completeness.summary()["total_rel"] < 1e-10
    # per query and read position (the node-stacked per-query quadrature), against the model's forward
    kw = {**kw, "by": ("step", "query", "position"), "position": [4, 5, 6]}
    per_q = explain(traj, q, **kw)
    per_q_slow = explain(traj, q, fast_forward=False, **kw)
    assert per_q.meta["forward"] == "readout"
    assert_close_scaled(per_q.values, per_q_slow.values, 1e-9)
    assert per_q.completeness.summary()["total_rel"] < 1e-10


@pytest.mark.parametrize("name", ["1L_relu", "2L_relu_LNPre", "attn_only_2L", "2L_gelu_LN"])
@pytest.mark.parametrize("reads", ["gaps", "all_but_last"])
def test_taped_per_query_quadrature_at_several_read_positions(name, reads):
    """The per-query quadrature through the read-out forward's tape (pieces sharing their rows
    up to the first MLP, nodes stacked node-major) equals ``vmap(jacrev)`` through
    TransformerLens's forward, for a next-token metric read at several positions, per output
    (position) and summed."""
    model = randomised({**CONFIGS[name], "n_ctx": 6})
    tok = lm_tokens(model, 4)
    read = _reads(reads, tok.shape[1])
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(13)
    delta = {k: 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    metric, _ = resolve_metric("next_token_logprob", read, by_position=True)  # one output per read position
    fast = QueryFunction(model, list(params), metric, dtype=torch.float64, position=read)
    slow = QueryFunction(model, list(params), metric, dtype=torch.float64)
    k, nodes = 2, [0.25, 0.75]
    batch = {"tokens": tok[:, None].expand(-1, k, -1)}
    if fast.has_kinks:
        _, z = fast.values_and_preacts(params, {"tokens": tok}, cert=False)
        keep = readout_units(model.cfg, tok.shape[1], read)
        batch[KINK_MASK] = (torch.rand(len(tok), k, z.shape[1], generator=g) < 0.3) & keep
        batch[KINK_ON] = torch.rand(len(tok), k, z.shape[1], generator=g) < 0.5
    weights = torch.rand(len(tok), k, len(nodes), generator=g, dtype=torch.float64)
    for resolve in (True, False):
        q_fast = fast.per_query_quadrature(params, delta, nodes, weights, batch, resolve)
        q_slow = slow.per_query_quadrature(params, delta, nodes, weights, batch, resolve)
        assert next(iter(q_fast.values())).shape[:2] == (len(tok), len(read) if resolve else 1)
        assert_close_scaled(q_fast, q_slow, 1e-11)


def test_shared_rows_are_checked():
    """``shared=k`` needs runs of ``k`` rows with equal tokens and path point: refused otherwise,
    and equal to evaluating every row on its own when they are."""
    model = randomised(dict(n_layers=2))
    tok = tokens_for(model, n=3)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    delta = {k: 0.1 * torch.ones_like(v) for k, v in params.items()}
    readout = Readout(model, -1)
    runs = tok.repeat_interleave(2, 0)
    t = torch.tensor([0.1, 0.1, 0.5, 0.5, 0.9, 0.9], dtype=torch.float64)
    assert_close_scaled(readout.logits(params, runs, path=(delta, t), shared=2)[0],
                        readout.logits(params, runs, path=(delta, t))[0], 1e-13)
    with pytest.raises(ValueError, match="does not divide"):
        readout.logits(params, runs, shared=4)
    with pytest.raises(ValueError, match="different tokens"):
        readout.logits(params, torch.cat([tok, tok]), shared=2)
    with pytest.raises(ValueError, match="different points"):
        readout.logits(params, runs, path=(delta, t + torch.arange(6) % 2 * 0.1), shared=2)
