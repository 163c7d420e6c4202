"""Query metrics: scalars read off the model's logits (docs/design.md §1).

A metric maps ``(logits, batch) -> [Q]`` (one scalar per query) or ``[Q, O]`` (a stack of
outputs). Built-ins read the logits at one position (the last by default). Every built-in is
written with ``gather`` rather than Python indexing so it works under ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import QueryError

MetricFn = Callable[[Tensor, dict], Tensor]

BUILTIN_METRICS = ("correct_logit", "correct_logprob", "loss", "logit_diff", "logits")


def _at_position(logits: Tensor, position: int) -> Float[Tensor, "query vocab"]:
    if logits.ndim == 3:
        return logits[:, position, :]
    if logits.ndim == 2:
        return logits
    raise QueryError(f"expected logits [query, pos, vocab] or [query, vocab], got {tuple(logits.shape)}")


def _label(batch: dict, key: str) -> Tensor:
    if key not in batch:
        raise QueryError(f"this metric needs a {key!r} column in the queries (have {sorted(batch)})")
    return batch[key].reshape(-1, 1).long()


def correct_logit(logits: Tensor, batch: dict, position: int = -1) -> Float[Tensor, "query"]:
    """Logit of the correct token ``batch["label"]`` at ``position``."""
    return _at_position(logits, position).gather(1, _label(batch, "label"))[:, 0]


def correct_logprob(logits: Tensor, batch: dict, position: int = -1) -> Float[Tensor, "query"]:
    """Log-probability of the correct token ``batch["label"]`` at ``position``."""
    lp = torch.log_softmax(_at_position(logits, position), dim=-1)
    return lp.gather(1, _label(batch, "label"))[:, 0]


def loss(logits: Tensor, batch: dict, position: int = -1) -> Float[Tensor, "query"]:
    """Cross-entropy loss of the correct token (``-correct_logprob``)."""
    return -correct_logprob(logits, batch, position)


def logit_diff(logits: Tensor, batch: dict, position: int = -1) -> Float[Tensor, "query"]:
    """``logit[label] - logit[alt_label]``: the usual TransformerLens logit difference."""
    at = _at_position(logits, position)
    return at.gather(1, _label(batch, "label"))[:, 0] - at.gather(1, _label(batch, "alt_label"))[:, 0]


def all_logits(logits: Tensor, batch: dict, position: int = -1) -> Float[Tensor, "query output"]:
    """Every logit at ``position``: one output per vocabulary entry."""
    return _at_position(logits, position)


def resolve_metric(metric: str | MetricFn, position: int = -1) -> tuple[MetricFn, bool]:
    """Turn a metric name or callable into ``fn(logits, batch)``.

    Returns:
        ``(fn, needs_label)``.
    """
    table = {
        "correct_logit": (correct_logit, True),
        "correct_logprob": (correct_logprob, True),
        "loss": (loss, True),
        "logit_diff": (logit_diff, True),
        "logits": (all_logits, False),
    }
    if callable(metric):
        return metric, False
    if metric not in table:
        raise QueryError(f"unknown metric {metric!r}; choose one of {BUILTIN_METRICS} or pass a callable")
    fn, needs = table[metric]

    def bound(logits: Tensor, batch: dict) -> Tensor:
        return fn(logits, batch, position)

    bound.__name__ = metric
    return bound, needs
