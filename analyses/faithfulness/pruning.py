"""Parameter pruning (the ExPLAIND paper's test): keep the weights a ranking calls important.

Each ranking scores every trainable scalar of the final model; for each fraction ``f`` the
``floor(f * P)`` lowest-scoring scalars are set to 0 (ties broken by position, stable) and the
pruned model is evaluated on a held-out set: its mean query metric, its accuracy (top-1
prediction against the label, or against the next token at the metric's read positions, masked
by ``loss_mask`` when the set has one) and its agreement with the unpruned model (the fraction of
those predictions that are unchanged). A ranking that knows what the model's outputs depend on
keeps accuracy and agreement up longest.

Rankings:

* ``explaind_tl``: per scalar ``p``, ``Σ_q |A_{q,p}|``: ExPLAIND's attribution of query ``q``'s
  metric over the whole run to the single parameter entry ``p`` (``explain(..., by=("query",
  "component"))`` with one component per scalar, :func:`entry_map`: ``A_{q,p}`` is
  ``Σ_s φ̂_{s,p} Δ_{s,p}``, how much the updates of that entry moved the query);
* ``magnitude``: ``|w_p|`` at the final parameters (magnitude pruning);
* ``random``: uniform scores, the mean over seeds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

RANKINGS = ("explaind_tl", "magnitude", "random")
FRACTIONS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)


def entry_map(model: Any, names: list[str]):
    """A :class:`~explaind_tl.ComponentMap` with one component per trainable scalar, in
    ``names`` order (labels ``"<param>[<flat index>]"``)."""
    from explaind_tl import ComponentMap

    shapes = dict(model.named_parameters())
    labels, index, start = [], {}, 0
    for n in names:
        size = shapes[n].numel()
        labels += [f"{n}[{i}]" for i in range(size)]
        index[n] = torch.arange(start, start + size).reshape(shapes[n].shape)
        start += size
    return ComponentMap(labels, index, param_names=names)


def explaind_entry_scores(traj: Any, queries: dict, metric: str, position: Any) -> Tensor:
    """``[P]``: ``Σ_q |A_{q,p}|`` (see the module doc), flat in the trajectory's parameter order."""
    from explaind_tl import explain

    cmap = entry_map(traj.model(0), list(traj.param_names))
    attr = explain(traj, queries, metric=metric, position=position, by=("query", "component"), components=cmap,
                   progress=False)
    scores = attr.values.abs().sum(attr.dims.index("query")).to(torch.float64)  # the axes in the result's order
    if scores.shape != (len(cmap.labels),):
        raise RuntimeError(f"per-weight scores of shape {tuple(scores.shape)}, expected [{len(cmap.labels)}]")
    return scores


def flat_params(traj: Any) -> Tensor:
    w = traj.params_at(traj.num_steps)
    return torch.cat([w[n].reshape(-1).to(torch.float64) for n in traj.param_names])


def pruned(flat: Tensor, scores: Tensor, fraction: float) -> Tensor:
    """``flat`` with its ``floor(fraction * P)`` lowest-scoring entries set to 0."""
    k = int(fraction * flat.numel())
    out = flat.clone()
    if k:
        out[torch.argsort(scores, stable=True)[:k]] = 0.0
    return out


@torch.no_grad()
def predictions(traj: Any, flat: Tensor, data: dict, metric: str, position: Any) -> tuple[Tensor, Tensor, float]:
    """``(predicted, target, mean metric)`` of the model with parameters ``flat`` on ``data``:
    top-1 tokens and their targets at the scored positions (``[n]`` each)."""
    from explaind_tl.metrics import LM_METRICS, read_positions, resolve_metric

    model = traj.model(0).double()
    named = dict(model.named_parameters())
    start = 0
    for n in traj.param_names:
        size = named[n].numel()
        named[n].copy_(flat[start:start + size].reshape(named[n].shape))
        start += size
    logits = model(data["tokens"])
    value = float(resolve_metric(metric, position)[0](logits, data).double().mean())
    if metric in LM_METRICS:
        pos = torch.tensor(read_positions(position, data["tokens"].shape[1]))
        pred = logits[:, pos].argmax(-1)
        target = data["tokens"][:, pos + 1]
        if "loss_mask" in data:
            keep = data["loss_mask"][:, pos + 1].bool()
            return pred[keep], target[keep], value
        return pred.reshape(-1), target.reshape(-1), value
    at = -1 if position is None else position
    return logits[:, at].argmax(-1), data["label"], value


def run_pruning(traj: Any, queries: dict, evaluation: dict, metric: str, position: Any,
                fractions: tuple[float, ...] = FRACTIONS, seeds: int = 3) -> dict:
    """Every ranking's metric, accuracy and agreement at each pruning fraction (module doc)."""
    flat = flat_params(traj)
    base_pred, target, base_value = predictions(traj, flat, evaluation, metric, position)
    out: dict[str, Any] = {
        "fractions": list(fractions), "n_params": flat.numel(), "n_predictions": int(target.numel()),
        "unpruned": {"metric": base_value, "accuracy": float((base_pred == target).double().mean())},
    }
    rankings = {"explaind_tl": [explaind_entry_scores(traj, queries, metric, position)], "magnitude": [flat.abs()]}
    rankings["random"] = [torch.rand(flat.numel(), generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                          for s in range(seeds)]
    for name, score_list in rankings.items():
        rows = {"metric": [], "accuracy": [], "agreement": []}
        for f in fractions:
            got = []
            for sc in score_list:
                pred, _, value = predictions(traj, pruned(flat, sc, f), evaluation, metric, position)
                got.append((value, float((pred == target).double().mean()), float((pred == base_pred).double().mean())))
            for key, j in (("metric", 0), ("accuracy", 1), ("agreement", 2)):
                rows[key].append(sum(g[j] for g in got) / len(got))
        out[name] = rows
    out["random"]["seeds"] = seeds
    return out
