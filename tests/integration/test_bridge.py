"""TransformerLens's TransformerBridge behind the model seam (issue #14).

Runs on the pinned TransformerLens 3.x (which ships ``transformer_lens.model_bridge``) and, by
``make test-tl4``, on TransformerLens 4. The oracle for the head/neuron split of the bridge's
fused weights is a ``HookedTransformer`` holding the same weights (rearranged by hand here):
its forward gives the same logits, and its standard partition gives the same per-component
sums of any vector. On TransformerLens 4 (no ``HookedTransformer``) those two tests skip.
"""

from __future__ import annotations

import einops
import pytest
import torch

pytest.importorskip("transformer_lens.model_bridge")

from conftest import assert_close_scaled, modular_addition  # noqa: E402

from explaind_tl import ComponentMap, Trajectory, TrajectoryRecorder, explain  # noqa: E402
from explaind_tl.losses import last_token_cross_entropy  # noqa: E402
from explaind_tl.model.bridge import bridge_name, is_transformer_bridge  # noqa: E402

P_MOD = 7
DIMS = dict(d_model=16, d_head=4, n_heads=4, n_ctx=3, d_vocab=P_MOD + 1, d_vocab_out=P_MOD, d_mlp=32)


def make_bridge(n_layers: int = 1, act_fn: str = "relu", normalization_type: str | None = None, seed: int = 0):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(seed)
    cfg = TransformerBridgeConfig(n_layers=n_layers, act_fn=act_fn, normalization_type=normalization_type, **DIMS)
    return TransformerBridge.boot_native(cfg)


def make_default_bridge():
    """The importable zero-argument factory the recorder stores for a bridge run."""
    return make_bridge()


def hooked_twin(bridge):
    """A HookedTransformer with the bridge's weights, rearranged into TransformerLens 3 layout."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        pytest.skip("no HookedTransformer in this TransformerLens (4.x)")
    c = bridge.cfg
    kw = dict(n_layers=c.n_layers, act_fn=c.act_fn, normalization_type=c.normalization_type, attn_only=c.attn_only,
              **DIMS)
    h = HookedTransformer(HookedTransformerConfig(**kw))
    P = {bridge_name(n): p.detach() for n, p in bridge.named_parameters()}
    H = dict(h.named_parameters())
    nh = c.n_heads
    with torch.no_grad():
        H["embed.W_E"].copy_(P["tok_embed.weight"])
        H["pos_embed.W_pos"].copy_(P["pos.weight"])
        for layer in range(c.n_layers):
            a = f"layers.{layer}.attn."
            for x in "QKV":
                H[f"blocks.{layer}.attn.W_{x}"].copy_(einops.rearrange(P[a + f"{x.lower()}.weight"], "(h e) d -> h d e", h=nh))
                H[f"blocks.{layer}.attn.b_{x}"].copy_(einops.rearrange(P[a + f"{x.lower()}.bias"], "(h e) -> h e", h=nh))
            H[f"blocks.{layer}.attn.W_O"].copy_(einops.rearrange(P[a + "o.weight"], "d (h e) -> h e d", h=nh))
            H[f"blocks.{layer}.attn.b_O"].copy_(P[a + "o.bias"])
            m = f"layers.{layer}.mlp."
            if not c.attn_only:
                H[f"blocks.{layer}.mlp.W_in"].copy_(P[m + "fc_in.weight"].T)
                H[f"blocks.{layer}.mlp.b_in"].copy_(P[m + "fc_in.bias"])
                H[f"blocks.{layer}.mlp.W_out"].copy_(P[m + "fc_out.weight"].T)
                H[f"blocks.{layer}.mlp.b_out"].copy_(P[m + "fc_out.bias"])
            if c.normalization_type == "LN":
                for ln in ("ln1",) if c.attn_only else ("ln1", "ln2"):  # an attention-only bridge keeps an unused ln2
                    H[f"blocks.{layer}.{ln}.w"].copy_(P[f"layers.{layer}.{ln}.weight"])
                    H[f"blocks.{layer}.{ln}.b"].copy_(P[f"layers.{layer}.{ln}.bias"])
        if c.normalization_type == "LN":
            H["ln_final.w"].copy_(P["ln_out.weight"])
            H["ln_final.b"].copy_(P["ln_out.bias"])
        H["unembed.W_U"].copy_(P["head.weight"].T)
        if "head.bias" in P:
            H["unembed.b_U"].copy_(P["head.bias"])
        else:
            H["unembed.b_U"].zero_()
    return h


def hooked_twin_from(bridge, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The twin's parameters for the bridge parameters ``values`` (the bridge is left as it was)."""
    saved = {n: p.detach().clone() for n, p in bridge.named_parameters()}
    with torch.no_grad():
        for n, p in bridge.named_parameters():
            p.copy_(values[n])
        twin = hooked_twin(bridge)
        for n, p in bridge.named_parameters():
            p.copy_(saved[n])
    return {n: p.detach().clone() for n, p in twin.named_parameters()}


@pytest.mark.parametrize("n_layers,norm", [(1, None), (2, "LN")])
def test_twin_has_the_same_forward(n_layers, norm):
    bridge = make_bridge(n_layers, normalization_type=norm)
    assert is_transformer_bridge(bridge)
    twin = hooked_twin(bridge)
    x = torch.randint(0, P_MOD + 1, (5, 3))
    with torch.no_grad():
        assert_close_scaled(bridge(x), twin(x), 1e-6)


@pytest.mark.parametrize("granularity", ["head", "neuron", "block"])
@pytest.mark.parametrize("n_layers,norm", [(1, None), (2, "LN")])
def test_partition_matches_the_hooked_transformers(granularity, n_layers, norm):
    """Same labels, and the same per-component sums of a random vector laid out either way."""
    bridge = make_bridge(n_layers, normalization_type=norm)
    twin = hooked_twin(bridge)
    cb = ComponentMap.from_model(bridge, granularity)
    ch = ComponentMap.from_model(twin, granularity)
    labels_b = set(cb.labels)
    labels_h = set(ch.labels) - ({"unembed"} if "head.bias" not in {bridge_name(n) for n, _ in bridge.named_parameters()} else set())
    assert labels_b == labels_h | ({"unembed"} & labels_b)
    assert cb.labels == [lbl for lbl in ch.labels if lbl in labels_b]  # canonical order
    g = torch.Generator().manual_seed(3)
    v = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in bridge.named_parameters()}
    vh = hooked_twin_from(bridge, {n: x.float() for n, x in v.items()})
    flat_b = torch.cat([v[n].float().reshape(-1) for n in cb.param_names]).double()
    flat_h = torch.cat([vh[n].reshape(-1) for n in ch.param_names]).double()
    sums_b = dict(zip(cb.labels, cb.reduce_flat(flat_b).tolist()))
    sums_h = dict(zip(ch.labels, ch.reduce_flat(flat_h).tolist()))
    for label in cb.labels:
        assert sums_b[label] == pytest.approx(sums_h[label], rel=1e-5, abs=1e-5)


@pytest.fixture(scope="module")
def bridge_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge")
    data = modular_addition(P_MOD)
    train = {k: v[:30] for k, v in data.items()}
    test = {k: v[30:40] for k, v in data.items()}
    model = make_default_bridge()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    g = torch.Generator().manual_seed(0)
    with TrajectoryRecorder(model, opt, root / "run", train, last_token_cross_entropy, checkpoint_every=3,
                            model_factory=make_default_bridge) as rec:
        for _ in range(6):
            rec.step(torch.randperm(30, generator=g)[:12])
    return Trajectory.load(root / "run", model_factory=make_default_bridge), test


def test_record_replay_and_explain_a_bridge(bridge_run):
    traj, test = bridge_run
    assert traj.verify(progress=False).ok  # replay is bitwise
    attr = explain(traj, test, metric="correct_logprob", by=("step", "component"), components="head",
                   reduce="mean", progress=False, dtype=torch.float64, tol=1e-9)
    assert attr.meta["forward"] == "model"  # the read-out forward is HookedTransformer-only
    assert attr.meta["kinks"] > 0  # ReLU kinks seen through the bridge's MLP hook points
    assert attr.completeness.ok and attr.completeness.summary()["total_rel"] < 1e-9
    assert {"embed", "pos_embed", "L0H0", "L0H3", "L0.mlp", "unembed"} <= set(attr.coords["component"])
    # without the kink hooks the same call cannot meet the certificate: the counter-example
    loose = explain(traj, test, metric="correct_logprob", by=("step",), reduce="mean", progress=False,
                    dtype=torch.float64, tol=1e-9, kink_aware=False)
    assert not loose.completeness.ok


def test_train_axis_on_a_bridge(bridge_run):
    traj, test = bridge_run
    attr = explain(traj, test, metric="correct_logprob", by=("train",), reduce="mean", progress=False,
                   dtype=torch.float64, tol=1e-9)
    assert attr.completeness.ok
    ids = [t for t in attr.coords["train"] if isinstance(t, int)]
    assert len(ids) == 30 and float(attr.sel(train=ids).values.abs().sum()) > 0
    from explaind_tl import metagradient

    mg = metagradient(traj, test, metric="correct_logprob", reduce="mean", progress=False)
    assert mg.meta["ok"] and mg.values.shape == (30,) and float(mg.values.abs().sum()) > 0
    steps = metagradient(traj, test, metric="correct_logprob", wrt="component_step", reduce="mean", progress=False)
    assert "L0H2" in steps.coords["component"] and steps.meta["ok"]


def test_a_bridge_is_stored_by_its_config(tmp_path):
    """No factory: the run stores the TransformerBridgeConfig and boots the model again on load;
    a manifest whose config was tampered with is refused before anything is built."""
    import json

    from explaind_tl.errors import TrajectoryError

    data = modular_addition(P_MOD)
    model = make_bridge(2, act_fn="gelu", normalization_type="LN")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with TrajectoryRecorder(model, opt, tmp_path / "run", {k: v[:20] for k, v in data.items()},
                            last_token_cross_entropy) as rec:
        for _ in range(3):
            rec.step(None)
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["model"]["kind"] == "transformer_bridge" and man["model"]["config"]["n_layers"] == 2
    traj = Trajectory.load(tmp_path / "run")
    assert is_transformer_bridge(traj.model()) and traj.verify(progress=False).ok
    attr = explain(traj, {k: v[20:26] for k, v in data.items()}, by=("step", "component"), components="head",
                   progress=False, dtype=torch.float64, tol=1e-9)
    assert attr.completeness.ok and "L1H3" in attr.coords["component"]
    for key, bad in (("d_model", 1 << 20), ("num_experts", 8), ("n_heads", "4")):
        tampered = json.loads(json.dumps(man))
        tampered["model"]["config"][key] = bad
        (tmp_path / "run" / "manifest.json").write_text(json.dumps(tampered))
        with pytest.raises(TrajectoryError, match="model.config"):
            Trajectory.load(tmp_path / "run")


@pytest.mark.parametrize("kw", [dict(n_layers=2, attn_only=True, normalization_type="LN"),
                                dict(n_layers=1, act_fn="relu", normalization_type=None)])
def test_hooked_initialisation_on_a_bridge(kw):
    """With the same seed, the bridge gets exactly the numbers a HookedTransformer draws."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        pytest.skip("no HookedTransformer in this TransformerLens (4.x)")
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    from explaind_tl.model.bridge import init_like_hooked_transformer

    full = {**DIMS, **kw}
    torch.manual_seed(5)
    hooked = HookedTransformer(HookedTransformerConfig(seed=5, **full))
    bridge = init_like_hooked_transformer(TransformerBridge.boot_native(TransformerBridgeConfig(**full)), seed=5)
    want = hooked_twin_from(bridge, {n: p.detach() for n, p in bridge.named_parameters()})
    for n, p in hooked.named_parameters():
        assert torch.equal(want[n], p.detach()), n
    x = torch.randint(0, P_MOD + 1, (4, 3))
    with torch.no_grad():
        assert_close_scaled(bridge(x), hooked(x), 1e-6)
