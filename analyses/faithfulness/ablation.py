"""Component ablation: do the components a ranking puts first matter most to the final model?

Units, labelled as the component axis labels them: attention heads (``L{l}H{h}``, through
``blocks.{l}.attn.hook_z``), MLP neurons (``L{l}N{n}``, through ``blocks.{l}.mlp.hook_post``) and
the token and positional embeddings (``embed``, ``pos_embed``, through ``hook_embed`` /
``hook_pos_embed``). The unembedding is not ablated: zeroing it sets every logit to its bias,
which says nothing about what the model computes. Each ranking orders the units; the top ``k``
are ablated in the final model through TransformerLens hooks (zero: the unit's output set to 0;
mean: set to its mean over the queries and positions), for every ``k``, and the query metric (mean
over queries) is measured. A ranking that finds the units the output depends on makes the metric
fall fastest: its score is the mean, over ``k = 1..K``, of the fall ``m(0) - m(k)`` (higher is
better; "area under the ablation curve").

Rankings: ``explaind_tl`` (|attribution of the query metric over the run| per unit, the
component axis at neuron granularity), ``attribution_patching`` (|gradient x (0 - activation)|
per unit at the final model: the first-order estimate of zero-ablation), ``weight_norm``
(Frobenius norm of the unit's weights: a head's Q, K, V, O; a neuron's ``W_in`` column, ``b_in``
entry and ``W_out`` row; an embedding matrix), ``random`` (mean curve over seeds).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

RANKINGS = ("explaind_tl", "attribution_patching", "weight_norm", "random")
_UNIT = re.compile(r"^L(\d+)([HN])(\d+)$")


def units_of(model) -> list[str]:
    """Every ablatable unit of the model, in a fixed order: embeddings, then per layer its heads
    and (with MLPs) its neurons."""
    cfg = model.cfg
    out = ["embed"] + (["pos_embed"] if cfg.positional_embedding_type == "standard" else [])
    for layer in range(cfg.n_layers):
        out += [f"L{layer}H{h}" for h in range(cfg.n_heads)]
        if not cfg.attn_only:
            out += [f"L{layer}N{n}" for n in range(cfg.d_mlp)]
    return out


def heads_of(model) -> list[str]:
    return [u for u in units_of(model) if "H" in u]


def _hook(unit: str) -> tuple[str, int | None]:
    """``(hook name, index along the unit axis or None for the whole activation)``."""
    if unit in ("embed", "pos_embed"):
        return f"hook_{unit}", None
    m = _UNIT.match(unit)
    if m is None:
        raise ValueError(f"not an ablatable unit: {unit!r}")
    layer, kind, i = int(m[1]), m[2], int(m[3])
    return (f"blocks.{layer}.attn.hook_z" if kind == "H" else f"blocks.{layer}.mlp.hook_post"), i


def unit_key(unit: str) -> tuple:
    """Sort key of :func:`units_of`'s order (ties of a ranking are broken by it)."""
    if unit in ("embed", "pos_embed"):
        return (-1, 0 if unit == "embed" else 1, 0)
    m = _UNIT.match(unit)
    return (int(m[1]), 0 if m[2] == "H" else 1, int(m[3]))


def _metric(metric: str, position: Any):
    from explaind_tl.metrics import resolve_metric

    return resolve_metric(metric, position)[0]


def _by_hook(units: list[str]) -> dict[str, list[int | None]]:
    out: dict[str, list[int | None]] = {}
    for u in units:
        name, i = _hook(u)
        out.setdefault(name, []).append(i)
    return out


def ablated_metric(model, queries: dict, metric: str, position: Any, units: list[str], mode: str,
                   means: dict[str, Tensor] | None = None) -> float:
    """Mean metric over the queries with ``units`` ablated (``mode`` ``"zero"`` or ``"mean"``;
    ``means``: :func:`unit_means`)."""
    fn = _metric(metric, position)

    def replace(act: Tensor, name: str, idx: list[int | None]) -> Tensor:
        act = act.clone()
        fill = 0.0 if mode == "zero" else means[name].to(act.dtype)
        if None in idx:
            act[...] = fill
        elif name.endswith("hook_z"):  # [batch, pos, head, d_head]
            act[:, :, idx] = fill if mode == "zero" else fill[idx]
        else:  # hook_post [batch, pos, d_mlp]
            act[..., idx] = fill if mode == "zero" else fill[idx]
        return act

    hooks = [(name, lambda a, hook, name=name, idx=idx: replace(a, name, idx)) for name, idx in _by_hook(units).items()]
    with torch.no_grad():
        logits = model.run_with_hooks(queries["tokens"], fwd_hooks=hooks)
    return float(fn(logits.double(), queries).double().mean())


def unit_means(model, queries: dict) -> dict[str, Tensor]:
    """Each hooked activation averaged over queries and positions: ``hook_z`` ``[H, d_head]``,
    ``hook_post`` ``[d_mlp]``, the embeddings ``[d_model]``."""
    names = set(_by_hook(units_of(model)))
    with torch.no_grad():
        _, cache = model.run_with_cache(queries["tokens"], names_filter=lambda n: n in names)
    out = {}
    for n in names:
        a = cache[n]
        out[n] = a.mean(dim=tuple(range(a.dim() - (2 if n.endswith("hook_z") else 1))))
    return out


def attribution_patching(model, queries: dict, metric: str, position: Any) -> dict[str, float]:
    """``|Σ_{query, pos} ∂m/∂a · (0 - a)|`` per unit at the model's parameters (mean metric)."""
    fn = _metric(metric, position)
    store: dict[str, Tensor] = {}

    def keep(a: Tensor, name: str) -> Tensor:
        a.retain_grad()
        store[name] = a
        return a

    hooks = [(n, lambda a, hook, n=n: keep(a, n)) for n in _by_hook(units_of(model))]
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    logits = model.run_with_hooks(queries["tokens"], fwd_hooks=hooks)
    fn(logits, queries).mean().backward()
    out = {}
    for u in units_of(model):
        name, i = _hook(u)
        a = store[name]
        prod = -(a.grad * a).detach()
        if i is None:
            est = prod.sum()
        elif name.endswith("hook_z"):
            est = prod[:, :, i].sum()
        else:
            est = prod[..., i].sum()
        out[u] = abs(float(est))
    return out


def weight_norms(model) -> dict[str, float]:
    out = {}
    for u in units_of(model):
        if u == "embed":
            out[u] = float(model.embed.W_E.detach().double().norm())
            continue
        if u == "pos_embed":
            out[u] = float(model.pos_embed.W_pos.detach().double().norm())
            continue
        name, i = _hook(u)
        layer = int(_UNIT.match(u)[1])
        if name.endswith("hook_z"):
            attn = model.blocks[layer].attn
            sq = sum(float((getattr(attn, w)[i].detach().double() ** 2).sum()) for w in ("W_Q", "W_K", "W_V", "W_O"))
        else:
            mlp = model.blocks[layer].mlp
            sq = float((mlp.W_in[:, i].detach().double() ** 2).sum() + mlp.b_in[i].detach().double() ** 2
                       + (mlp.W_out[i].detach().double() ** 2).sum())
        out[u] = sq ** 0.5
    return out


def explaind_ranking(traj: Any, queries: dict, metric: str, position: Any) -> dict[str, float]:
    from explaind_tl import explain

    model = traj.model(0)
    granularity = "head" if model.cfg.attn_only else "neuron"
    attr = explain(traj, queries, metric=metric, position=position, by=("component",), components=granularity,
                   reduce="mean", progress=False)
    units = set(units_of(model))
    return {label: abs(v) for label, v in zip(attr.coords["component"], attr.values.tolist()) if label in units}


def order(scores: dict[str, float]) -> list[str]:
    """Units by decreasing score (ties: in :func:`units_of`'s order)."""
    return sorted(scores, key=lambda u: (-scores[u], unit_key(u)))


def curve(model, queries: dict, metric: str, position: Any, ranked: list[str], mode: str,
          means: dict[str, Tensor]) -> list[float]:
    """Metric with the top-``k`` units ablated, ``k = 0..len(ranked)``."""
    return [ablated_metric(model, queries, metric, position, ranked[:k], mode, means) for k in range(len(ranked) + 1)]


def fall_area(values: list[float]) -> float:
    """Mean over ``k >= 1`` of ``values[0] - values[k]``."""
    return sum(values[0] - v for v in values[1:]) / max(len(values) - 1, 1)


def run_ablation(traj: Any, queries: dict, metric: str, position: Any, seeds: int = 5) -> dict:
    """Every ranking's zero- and mean-ablation curve and fall area (see the module docstring)."""
    model = traj.model(traj.num_steps)
    means = unit_means(model, queries)
    rankings = {
        "explaind_tl": order(explaind_ranking(traj, queries, metric, position)),
        "attribution_patching": order(attribution_patching(traj.model(traj.num_steps), queries, metric, position)),
        "weight_norm": order(weight_norms(model)),
    }
    out: dict[str, dict] = {}
    for name, ranked in rankings.items():
        block: dict[str, Any] = {"order": ranked, "k": list(range(len(ranked) + 1))}
        for mode in ("zero", "mean"):
            c = curve(model, queries, metric, position, ranked, mode, means)
            block[mode], block[f"area_{mode}"] = c, fall_area(c)
        out[name] = block
    units = units_of(model)
    rand: dict[str, Any] = {"k": list(range(len(units) + 1)), "seeds": seeds}
    for mode in ("zero", "mean"):
        curves = []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            ranked = [units[i] for i in torch.randperm(len(units), generator=g).tolist()]
            curves.append(curve(model, queries, metric, position, ranked, mode, means))
        mean_curve = [sum(c[k] for c in curves) / seeds for k in range(len(units) + 1)]
        rand[mode], rand[f"area_{mode}"] = mean_curve, fall_area(mean_curve)
    out["random"] = rand
    return out
