"""Component ablation: do the heads a ranking puts first matter most to the final model?

Each ranking orders the attention heads; the top ``k`` are ablated in the final model through
TransformerLens hooks on ``blocks.{l}.attn.hook_z`` (zero: the head's output set to 0; mean:
set to its mean over the queries and positions), for every ``k``, and the query metric (mean
over queries) is measured. A ranking that finds the heads the output depends on makes the metric
fall fastest: its score is the mean, over ``k = 1..K``, of the fall ``m(0) - m(k)`` (higher is
better; "area under the ablation curve").

Rankings: ``explaind_tl`` (|attribution of the query metric over the run| per head, the
component axis), ``attribution_patching`` (|gradient x (0 - activation)| per head at the final
model: the first-order estimate of zero-ablation), ``weight_norm`` (Frobenius norm of the head's
Q, K, V, O weights), ``random`` (mean curve over seeds).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

RANKINGS = ("explaind_tl", "attribution_patching", "weight_norm", "random")


def heads_of(model) -> list[tuple[int, int]]:
    return [(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def _metric(metric: str, position: Any):
    from explaind_tl.metrics import resolve_metric

    return resolve_metric(metric, position)[0]


def ablated_metric(model, queries: dict, metric: str, position: Any, heads: list[tuple[int, int]], mode: str,
                   means: dict[int, Tensor] | None = None) -> float:
    """Mean metric over the queries with ``heads`` ablated (``mode`` ``"zero"`` or ``"mean"``)."""
    fn = _metric(metric, position)
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)

    def replace(z: Tensor, layer: int) -> Tensor:
        z = z.clone()
        idx = by_layer[layer]
        z[:, :, idx] = 0.0 if mode == "zero" else means[layer][idx].to(z.dtype)
        return z

    hooks = [(f"blocks.{layer}.attn.hook_z", lambda z, hook, layer=layer: replace(z, layer)) for layer in by_layer]
    with torch.no_grad():
        logits = model.run_with_hooks(queries["tokens"], fwd_hooks=hooks)
    return float(fn(logits.double(), queries).double().mean())


def head_means(model, queries: dict) -> dict[int, Tensor]:
    """Per layer, each head's output ``z`` averaged over queries and positions (``[H, d_head]``)."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(queries["tokens"], names_filter=lambda n: n in names)
    return {layer: cache[n].mean(dim=(0, 1)) for layer, n in enumerate(names)}


def attribution_patching(model, queries: dict, metric: str, position: Any) -> dict[tuple[int, int], float]:
    """``|Σ_{query, pos} ∂m/∂z · (0 - z)|`` per head at the model's parameters (mean metric)."""
    fn = _metric(metric, position)
    store: dict[int, Tensor] = {}

    def keep(z: Tensor, layer: int) -> Tensor:
        z.retain_grad()
        store[layer] = z
        return z

    hooks = [(f"blocks.{layer}.attn.hook_z", lambda z, hook, layer=layer: keep(z, layer))
             for layer in range(model.cfg.n_layers)]
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    logits = model.run_with_hooks(queries["tokens"], fwd_hooks=hooks)
    fn(logits, queries).mean().backward()
    out = {}
    for layer, z in store.items():
        est = -(z.grad * z).sum(dim=(0, 1, 3)).detach()  # [H]
        for h in range(est.shape[0]):
            out[(layer, h)] = abs(float(est[h]))
    return out


def weight_norms(model) -> dict[tuple[int, int], float]:
    out = {}
    for layer, h in heads_of(model):
        attn = model.blocks[layer].attn
        sq = sum(float((getattr(attn, w)[h].detach().double() ** 2).sum()) for w in ("W_Q", "W_K", "W_V", "W_O"))
        out[(layer, h)] = sq ** 0.5
    return out


def explaind_ranking(traj: Any, queries: dict, metric: str, position: Any) -> dict[tuple[int, int], float]:
    from explaind_tl import explain

    attr = explain(traj, queries, metric=metric, position=position, by=("component",), components="head",
                   reduce="mean", progress=False)
    out = {}
    for label, v in zip(attr.coords["component"], attr.values.tolist()):
        if label.startswith("L") and "H" in label and "." not in label:
            layer, h = label[1:].split("H")
            out[(int(layer), int(h))] = abs(v)
    return out


def order(scores: dict[tuple[int, int], float]) -> list[tuple[int, int]]:
    """Heads by decreasing score (ties: by (layer, head))."""
    return sorted(scores, key=lambda lh: (-scores[lh], lh))


def curve(model, queries: dict, metric: str, position: Any, ranked: list[tuple[int, int]], mode: str,
          means: dict[int, Tensor]) -> list[float]:
    """Metric with the top-``k`` heads ablated, ``k = 0..len(ranked)``."""
    return [ablated_metric(model, queries, metric, position, ranked[:k], mode, means) for k in range(len(ranked) + 1)]


def fall_area(values: list[float]) -> float:
    """Mean over ``k >= 1`` of ``values[0] - values[k]``."""
    return sum(values[0] - v for v in values[1:]) / max(len(values) - 1, 1)


def run_ablation(traj: Any, queries: dict, metric: str, position: Any, seeds: int = 5) -> dict:
    """Every ranking's zero- and mean-ablation curve and fall area (see the module docstring)."""
    model = traj.model(traj.num_steps)
    means = head_means(model, queries)
    rankings = {
        "explaind_tl": order(explaind_ranking(traj, queries, metric, position)),
        "attribution_patching": order(attribution_patching(traj.model(traj.num_steps), queries, metric, position)),
        "weight_norm": order(weight_norms(model)),
    }
    out: dict[str, dict] = {}
    for name, ranked in rankings.items():
        block: dict[str, Any] = {"order": [f"L{layer}H{h}" for layer, h in ranked], "k": list(range(len(ranked) + 1))}
        for mode in ("zero", "mean"):
            c = curve(model, queries, metric, position, ranked, mode, means)
            block[mode], block[f"area_{mode}"] = c, fall_area(c)
        out[name] = block
    heads = heads_of(model)
    rand: dict[str, Any] = {"k": list(range(len(heads) + 1)), "seeds": seeds}
    for mode in ("zero", "mean"):
        curves = []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            ranked = [heads[i] for i in torch.randperm(len(heads), generator=g).tolist()]
            curves.append(curve(model, queries, metric, position, ranked, mode, means))
        mean_curve = [sum(c[k] for c in curves) / seeds for k in range(len(heads) + 1)]
        rand[mode], rand[f"area_{mode}"] = mean_curve, fall_area(mean_curve)
    out["random"] = rand
    return out
