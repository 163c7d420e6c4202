"""Query metrics: scalars read off the model's logits (docs/design.md §1).

A metric maps ``(logits, batch) -> [Q]`` (one scalar per query) or ``[Q, O]`` (a stack of
outputs). The classifier built-ins read the logits at one position (the last by default); the
language-model built-ins (``next_token_logprob``, ``next_token_loss``) score each query's own
next token at one or several positions (all that have a next token by default) and average over
them. Every built-in is written with ``gather``/``index_select`` rather than Python indexing so
it works under ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import QueryError

MetricFn = Callable[[Tensor, dict], Tensor]

LM_METRICS = ("next_token_logprob", "next_token_loss")
BUILTIN_METRICS = ("correct_logit", "correct_logprob", "loss", "logit_diff", "logits", *LM_METRICS)
Position = int | slice | Sequence[int] | str  # int, slice, list of ints or "all"
LOSS_MASK = "loss_mask"  # optional [Q, pos] bool column: which tokens' predictions count


def read_positions(position: Position | None, n_pos: int) -> list[int]:
    """The positions (``0 <= p < n_pos - 1``, sorted, distinct) at which a next-token metric
    predicts the following token: ``position`` an int, a slice, a list of ints, or ``"all"``
    (``None``: all). Negative ints count from the end, as in Python; a slice selects among the
    ``n_pos - 1`` positions that have a next token (``slice(-4, None)``: the last four).

    Raises:
        QueryError: a position outside ``[-n_pos, n_pos)``, or the last one (nothing follows it),
            or a slice or list that selects nothing.
    """
    if position is None or position == "all":
        out = list(range(n_pos - 1))
    elif isinstance(position, slice):  # over the positions that predict a token
        out = list(range(n_pos - 1))[position]
    else:
        items = [position] if isinstance(position, int) else list(position)
        for p in items:
            if not -n_pos <= p < n_pos:
                raise QueryError(f"position {p} is outside the queries' {n_pos} positions ({-n_pos} .. {n_pos - 1})")
        out = [p % n_pos for p in items]
    out = sorted(set(out))
    if not out:
        raise QueryError(f"position={position!r} selects no position of the queries' {n_pos}")
    if out[-1] == n_pos - 1:
        raise QueryError(
            f"position {out[-1]} is the queries' last position: no next token follows it (next-token metrics "
            f"read positions 0 .. {n_pos - 2}; position=-2 is the last one that predicts a token)"
        )
    return out


def _next_token_logprobs(logits: Tensor, batch: dict, position: Position | None) -> tuple[Tensor, Tensor | None]:
    if logits.ndim != 3:
        raise QueryError(f"next-token metrics need logits [query, pos, vocab], got {tuple(logits.shape)}")
    if "tokens" not in batch:
        raise QueryError(f"next-token metrics need a 'tokens' column in the queries (have {sorted(batch)})")
    pos = torch.tensor(read_positions(position, logits.shape[1]), device=logits.device)
    lp = torch.log_softmax(logits.index_select(1, pos), dim=-1)  # [Q, k, vocab]
    target = batch["tokens"].index_select(1, pos + 1).long()  # [Q, k]: the token each position predicts
    got = lp.gather(2, target.unsqueeze(-1))[..., 0]
    mask = batch[LOSS_MASK].index_select(1, pos + 1).to(got.dtype) if LOSS_MASK in batch else None
    return got, mask


def next_token_logprob(logits: Tensor, batch: dict, position: Position | None = None) -> Float[Tensor, "query"]:
    """Mean over the read positions ``p`` of ``log P(tokens[p + 1] | tokens[: p + 1])``.

    Args:
        logits: ``[Q, pos, vocab]``.
        batch: ``"tokens"`` ``[Q, pos]``; optionally ``"loss_mask"`` ``[Q, pos]`` (bool): only the
            positions whose *predicted* token is marked count (the mean is over those).
        position: an int, a slice, a list of ints or ``"all"`` (``None``: all positions that
            have a next token), as :func:`read_positions`.
    """
    got, mask = _next_token_logprobs(logits, batch, position)
    if mask is None:
        return got.mean(1)
    return (got * mask).sum(1) / mask.sum(1)


def next_token_logprob_by_position(logits: Tensor, batch: dict, position: Position | None = None) -> Float[Tensor, "query position"]:
    """Each read position's share of :func:`next_token_logprob`: ``[Q, k]`` entries that add up
    to it (``log P / k``, or with a ``"loss_mask"`` ``mask · log P / Σ mask``, 0 where unmarked).
    What ``by=(..., "position")`` keeps."""
    got, mask = _next_token_logprobs(logits, batch, position)
    if mask is None:
        return got / got.shape[1]
    return got * mask / mask.sum(1, keepdim=True)


def next_token_loss(logits: Tensor, batch: dict, position: Position | None = None) -> Float[Tensor, "query"]:
    """Mean next-token cross-entropy at the read positions (``-next_token_logprob``)."""
    return -next_token_logprob(logits, batch, position)


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


def check_position(metric: Any, position: Any) -> Position | None:
    """``position`` checked for type and fitted to ``metric`` (before any work): ``None`` means
    the metric's default (the last position; all positions for the next-token metrics).

    Raises:
        TypeError: not an int, slice, list/tuple of ints or ``"all"``.
        ValueError: several positions (or ``"all"``) for a metric that reads one.
    """
    if position is None or (isinstance(position, int) and not isinstance(position, bool)):
        return position
    if isinstance(position, slice):
        for part in (position.start, position.stop, position.step):
            if part is not None and (not isinstance(part, int) or isinstance(part, bool)):
                raise TypeError(f"position slice bounds must be ints or None, got {position!r}")
        if position.step is not None and position.step < 1:
            raise ValueError(f"position slice step must be >= 1, got {position.step}")
    elif isinstance(position, (list, tuple)):
        if not position or not all(isinstance(p, int) and not isinstance(p, bool) for p in position):
            raise TypeError(f"position as a list must hold ints (at least one), got {position!r}")
        position = tuple(position)
    elif position != "all":
        raise TypeError(f"position must be an int, a slice, a list of ints or 'all', got {type(position).__name__}")
    if isinstance(metric, str) and metric not in LM_METRICS:
        raise ValueError(
            f"metric {metric!r} reads one position; position={position!r} (several positions) is for "
            f"{LM_METRICS} or a callable metric"
        )
    if callable(metric):
        raise ValueError("a callable metric reads the logits itself: position applies to the built-in metrics")
    return position


def resolve_metric(metric: str | MetricFn, position: Position | None = -1, by_position: bool = False) -> tuple[MetricFn, bool]:
    """Turn a metric name or callable into ``fn(logits, batch)``.

    ``position``: the classifier metrics' read position (an int; ``None``: -1), or the next-token
    metrics' positions (any :data:`Position`; ``None``: all). ``by_position``: a next-token
    metric returns each position's share ``[Q, k]`` instead of the mean ``[Q]`` (negated for
    ``next_token_loss``).

    Returns:
        ``(fn, needs_label)``.

    Raises:
        ValueError: ``by_position`` with a metric that is not a next-token one.
    """
    if by_position:
        if metric not in LM_METRICS:
            raise ValueError(f"by=(..., 'position') needs a next-token metric {LM_METRICS}, got {metric!r}")
        sign = -1.0 if metric == "next_token_loss" else 1.0

        def shares(logits: Tensor, batch: dict) -> Tensor:
            return sign * next_token_logprob_by_position(logits, batch, position)

        shares.__name__ = metric
        return shares, False
    table = {
        "next_token_logprob": (next_token_logprob, False),
        "next_token_loss": (next_token_loss, False),
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
    if position is None and metric not in LM_METRICS:
        position = -1

    def bound(logits: Tensor, batch: dict) -> Tensor:
        return fn(logits, batch, position)

    bound.__name__ = metric
    return bound, needs
