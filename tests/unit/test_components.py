"""ComponentMap: partitions of HookedTransformer parameters, reductions, custom maps."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close_scaled, tiny_model
from torch import nn

from explaind_tl.model.components import ComponentMap

CONFIGS = {
    "plain": {},
    "two_layers_ln": dict(n_layers=2, normalization_type="LN"),
    "attn_only": dict(attn_only=True, n_layers=2),
    "rotary_rms": dict(positional_embedding_type="rotary", rotary_dim=4, normalization_type="RMS"),
    "gqa": dict(n_key_value_heads=2),
}


def _model(**extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_model(7, **extra)


@pytest.fixture(scope="module")
def models():
    return {k: _model(**v) for k, v in CONFIGS.items()}


@pytest.fixture(scope="module")
def frozen_model():
    m = _model(normalization_type="LN")
    for n, p in m.named_parameters():
        if n.endswith(("b_Q", "b_K", "b_V", "ln1.b")):
            p.requires_grad_(False)
    return m


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _rand_like(params, seed, lead=()):
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(*lead, *p.shape, generator=g, dtype=torch.float64) for n, p in params.items()
    }


def _check_partition(cmap, params):
    """Every coordinate of every trainable param in exactly one component; sums match."""
    assert cmap.param_names == list(params)
    for n, p in params.items():
        ids = cmap.index[n]
        assert ids.shape == p.shape and ids.dtype == torch.long
        assert int(ids.min()) >= 0 and int(ids.max()) < len(cmap)
    counts = torch.bincount(cmap.flat_index, minlength=len(cmap))
    assert int(counts.sum()) == sum(p.numel() for p in params.values())
    assert bool((counts > 0).all()), "empty component"
    x, y = _rand_like(params, 1, lead=(3,)), _rand_like(params, 2)
    out = cmap.reduce(x, y)
    assert out.shape == (3, len(cmap)) and out.dtype == torch.float64
    total = sum((x[n] * y[n]).reshape(3, -1).sum(-1) for n in params)
    flat = torch.cat([(x[n] * y[n]).reshape(3, -1) for n in params], dim=-1)
    # sums of signed products in different orders: rounding is relative to sum |x * y| (thousands
    # of O(1) terms); 1e-13 of it is ~1e-10 absolute, a misassigned coordinate is off by O(1)
    scale = float(flat.abs().sum(-1).max())
    assert_close_scaled(out.sum(-1), total, 1e-13, scale=scale)
    # reduce(x) without y, and reduce_flat agree with the general path
    assert_close_scaled(cmap.reduce_flat(flat), out, 1e-13, scale=scale)
    prod = {n: x[n] * y[n] for n in params}
    assert_close_scaled(cmap.reduce(prod), out, 1e-13, scale=scale)
    # an index_add over the flat index is the reference
    ref = torch.zeros(3, len(cmap), dtype=torch.float64).index_add_(1, cmap.flat_index, flat)
    assert_close_scaled(out, ref, 1e-13, scale=scale)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("granularity", ["head", "block", "neuron", "parameter"])
def test_partition(models, config, granularity):
    model = models[config]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warnings on standard TL models
        cmap = ComponentMap.from_model(model, granularity)
    _check_partition(cmap, _trainable(model))
    assert set(cmap.hook_points) == set(cmap.labels)
    hooks = set(model.hook_dict) | {"logits"}
    if granularity != "parameter":
        assert set(cmap.hook_points.values()) <= hooks, set(cmap.hook_points.values()) - hooks


def test_labels_head(models):
    cfg = models["two_layers_ln"].cfg
    cmap = ComponentMap.from_model(models["two_layers_ln"], "head")
    heads = [lbl for lbl in cmap.labels if "H" in lbl]
    assert heads == models["two_layers_ln"].all_head_labels()
    assert heads == [f"L{i}H{h}" for i in range(cfg.n_layers) for h in range(cfg.n_heads)]
    assert cmap.labels == [
        "embed", "pos_embed",
        "L0.ln1", "L0H0", "L0H1", "L0H2", "L0H3", "L0.attn.b_O", "L0.ln2", "L0.mlp",
        "L1.ln1", "L1H0", "L1H1", "L1H2", "L1H3", "L1.attn.b_O", "L1.ln2", "L1.mlp",
        "ln_final", "unembed",
    ]  # fmt: skip
    assert cmap.hook_points["L1H2"] == "blocks.1.attn.hook_z"
    assert cmap.hook_points["L0.ln2"] == "blocks.0.ln2.hook_scale"
    assert cmap.hook_points["L0.mlp"] == "blocks.0.mlp.hook_post"
    # head 2 of layer 1 owns exactly axis-0 slice 2 of its attention weights
    assert bool((cmap.index["blocks.1.attn.W_V"][2] == cmap.labels.index("L1H2")).all())


def test_granularity_sizes(models):
    m = models["two_layers_ln"]
    cfg = m.cfg
    neuron = ComponentMap.from_model(m, "neuron")
    # embed, pos_embed, ln_final, unembed + per layer: ln1, ln2, heads, b_O, neurons, b_out
    assert len(neuron) == 4 + cfg.n_layers * (2 + cfg.n_heads + 1 + cfg.d_mlp + 1)
    assert neuron.sizes["L1N5"] == 2 * cfg.d_model + 1
    assert bool((neuron.index["blocks.0.mlp.W_in"][:, 17] == neuron.labels.index("L0N17")).all())
    block = ComponentMap.from_model(m, "block")
    assert block.labels == [
        "embed", "pos_embed", "L0.ln1", "L0.attn", "L0.ln2", "L0.mlp",
        "L1.ln1", "L1.attn", "L1.ln2", "L1.mlp", "ln_final", "unembed",
    ]  # fmt: skip
    param = ComponentMap.from_model(m, "parameter")
    assert param.labels == [n for n, _ in m.named_parameters()]
    assert "pos_embed" not in ComponentMap.from_model(models["rotary_rms"], "head").labels
    attn_only = ComponentMap.from_model(models["attn_only"], "head")
    assert not any("mlp" in lbl for lbl in attn_only.labels)
    gqa = ComponentMap.from_model(models["gqa"], "head")
    assert {"L0KV0", "L0KV1"} <= set(gqa.labels)


def test_frozen_and_param_names(frozen_model):
    cmap = ComponentMap.from_model(frozen_model, "head")
    frozen = [n for n, p in frozen_model.named_parameters() if not p.requires_grad]
    assert cmap.frozen == frozen and len(frozen) == 4
    assert not set(frozen) & set(cmap.index)
    _check_partition(cmap, _trainable(frozen_model))
    sub = ComponentMap.from_model(
        frozen_model, "head", param_names=["embed.W_E", "blocks.0.attn.W_Q"]
    )
    assert sub.labels == ["embed", "L0H0", "L0H1", "L0H2", "L0H3"]
    assert sub.flat_index.numel() == 8 * 16 + 4 * 16 * 4
    with pytest.raises(ValueError, match="not found"):
        ComponentMap.from_model(frozen_model, "head", param_names=["nope"])


def test_unknown_granularity_and_generic_module():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="unknown component granularity"):
        ComponentMap.from_model(net, "heads")
    with pytest.raises(ValueError, match="needs a HookedTransformer"):
        ComponentMap.from_model(net, "head")
    cmap = ComponentMap.from_model(net, "parameter")
    assert cmap.labels == ["0.weight", "0.bias", "2.weight", "2.bias"]
    _check_partition(cmap, dict(net.named_parameters()))


def test_unknown_tl_params_fall_back_with_warning(models):
    m = _model()
    m.register_parameter("extra", nn.Parameter(torch.zeros(3)))
    with pytest.warns(UserWarning, match="extra"):
        cmap = ComponentMap.from_model(m, "head")
    assert cmap.labels[-1] == "extra"
    _check_partition(cmap, _trainable(m))


def test_one_head_share_by_hand(models):
    """One head's share equals a hand-computed sum over its slices of gradient * update."""
    model = models["plain"]
    params = _trainable(model)
    grad, upd = _rand_like(params, 3), _rand_like(params, 4)
    h, pre = 2, "blocks.0.attn."
    expected = sum(
        (grad[pre + w][h] * upd[pre + w][h]).sum()
        for w in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
    )
    expected_mlp = sum(
        (grad[f"blocks.0.mlp.{w}"] * upd[f"blocks.0.mlp.{w}"]).sum()
        for w in ("W_in", "b_in", "W_out", "b_out")
    )
    neuron_7 = (
        (grad["blocks.0.mlp.W_in"][:, 7] * upd["blocks.0.mlp.W_in"][:, 7]).sum()
        + grad["blocks.0.mlp.b_in"][7] * upd["blocks.0.mlp.b_in"][7]
        + (grad["blocks.0.mlp.W_out"][7] * upd["blocks.0.mlp.W_out"][7]).sum()
    )
    cmap = ComponentMap.from_model(model, "head")
    out = cmap.reduce(grad, upd)
    # each share is a sum of signed products: rounding relative to sum |grad * upd| of the model
    scale = sum(float((grad[n] * upd[n]).abs().sum()) for n in params)
    assert_close_scaled(out[cmap.labels.index("L0H2")], expected, 1e-13, scale=scale)
    assert_close_scaled(out[cmap.labels.index("L0.mlp")], expected_mlp, 1e-13, scale=scale)
    nmap = ComponentMap.from_model(model, "neuron")
    assert_close_scaled(nmap.reduce(grad, upd)[nmap.labels.index("L0N7")], neuron_7, 1e-13, scale=scale)


def test_from_dict_equals_from_model_and_errors(models):
    model = models["plain"]
    heads = {
        f"L0H{h}": [
            (f"blocks.0.attn.{w}", h) for w in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
        ]
        for h in range(4)
    }
    rest = {
        "embed": ["embed.W_E"],
        "pos_embed": [("pos_embed.W_pos", ...)],
        "L0.attn.b_O": [("blocks.0.attn.b_O", slice(None))],
        "L0.mlp": [(f"blocks.0.mlp.{w}", None) for w in ("W_in", "b_in", "W_out", "b_out")],
        "unembed": [("unembed.W_U", ...), ("unembed.b_U", ...)],
    }
    cmap = ComponentMap.from_dict(model, {**rest, **heads})
    ref = ComponentMap.from_model(model, "head")
    assert cmap.labels == list(rest) + list(heads)  # dict order
    for n in ref.param_names:
        mapped = torch.tensor([cmap.labels.index(ref.labels[i]) for i in ref.index[n].reshape(-1)])
        assert torch.equal(mapped.reshape(ref.index[n].shape), cmap.index[n])
    # overlap: column 17 of W_in in two components
    split = {**rest, **heads, "L0N17": [("blocks.0.mlp.W_in", (slice(None), 17))]}
    with pytest.raises(ValueError, match=r"overlap.*'L0N17'.*L0\.mlp"):
        ComponentMap.from_dict(model, split)
    # gap: leave out head 3 and the unembedding bias
    gappy = {**{k: v for k, v in heads.items() if k != "L0H3"}, **rest, "unembed": ["unembed.W_U"]}
    with pytest.raises(ValueError, match=r"gaps.*blocks\.0\.attn\.W_Q.*unembed\.b_U"):
        ComponentMap.from_dict(model, gappy)
    with pytest.raises(ValueError, match="not a parameter"):
        ComponentMap.from_dict(model, {"x": ["nope.W"]})


def test_from_predicate(models):
    import numpy as np

    model = models["plain"]

    def fn(name, shape):
        if name.startswith("blocks.0.attn.") and not name.endswith("b_O"):
            return np.array([f"L0H{h}" for h in range(shape[0])], dtype=object).reshape(
                -1, *[1] * (len(shape) - 1)
            )
        return name.split(".")[0] if not name.startswith("blocks") else "rest"

    cmap = ComponentMap.from_predicate(model, fn)
    assert cmap.labels == ["embed", "pos_embed", "L0H0", "L0H1", "L0H2", "L0H3", "rest", "unembed"]
    _check_partition(cmap, _trainable(model))
    # arbitrary (non axis-aligned) labels take the general index_add path
    rng = np.random.default_rng(0)
    scattered = ComponentMap.from_predicate(
        model, lambda n, s: rng.choice(["a", "b", "c"], size=tuple(s))
    )
    assert sorted(scattered.labels) == ["a", "b", "c"]
    _check_partition(scattered, _trainable(model))
    with pytest.raises(ValueError, match="gaps"):
        ComponentMap.from_predicate(model, lambda n, s: None if n == "embed.W_E" else "x")


def test_reduce_device_dtype_and_missing(models):
    model = models["plain"]
    cmap = ComponentMap.from_model(model, "neuron")
    params = _trainable(model)
    x32 = {n: p.detach().float() for n, p in params.items()}
    y64 = _rand_like(params, 5)
    assert cmap.reduce(x32, y64).dtype == torch.float64
    assert cmap.reduce(x32).dtype == torch.float32
    with pytest.raises(KeyError, match="missing"):
        cmap.reduce({"embed.W_E": x32["embed.W_E"]})
    with pytest.raises(ValueError, match="last dim"):
        cmap.reduce_flat(torch.zeros(5))
    # expand is the adjoint of reduce on one-hot vectors
    v = torch.arange(len(cmap), dtype=torch.float64)
    ex = cmap.expand(v)
    assert torch.equal(ex["blocks.0.mlp.b_in"], v[cmap.index["blocks.0.mlp.b_in"]])
    assert cmap.mask("L0N3")["blocks.0.mlp.b_in"].sum() == 1
