"""The plan of an explain call: its queries, rows, axes and sizes (docs/design.md §0).

:func:`normalize_queries` checks and converts the queries; :func:`make_plan` fixes what is
computed (:class:`Plan`: the rows, the step bins, the clock, the labels of the source or train
axis) before the engine is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from explaind_tl.axes import PSEUDO, SOURCES
from explaind_tl.errors import QueryError
from explaind_tl.metrics import LM_METRICS, LOSS_MASK, read_positions, resolve_metric
from explaind_tl.model.functional import model_input


# --------------------------------------------------------------------------- queries
def _integer_column(name: str, v: Tensor) -> Tensor:
    """An integer query column (tokens, labels) as ``int64``; integer-valued floats are
    converted exactly, anything else is refused.

    Raises:
        QueryError: bool, complex, fractional, non-finite or too large (beyond 2**53) values.
    """
    if v.dtype == torch.bool:
        raise QueryError(f"query {name!r} must hold integers, got booleans (torch.bool)")
    if v.dtype.is_complex:
        raise QueryError(f"query {name!r} must hold integers, got {v.dtype}")
    if v.dtype.is_floating_point:
        bad = ~torch.isfinite(v) | (v != torch.round(v)) | (v.abs() > 2**53)
        if bool(bad.any()):
            first = float(v[bad].reshape(-1)[0])
            raise QueryError(
                f"query {name!r} must hold integers; it is {v.dtype} with {int(bad.sum())} "
                f"non-integer value(s) (e.g. {first!r}); pass an integer tensor"
            )
        return v.to(torch.int64)
    return v


def normalize_queries(
    queries: Any, model: torch.nn.Module | None = None, needs_label: bool = False, position: int | None = None
) -> dict[str, Tensor]:
    """Turn queries (tensor, dict of tensors, or ``datasets.Dataset``) into a dict of tensors.

    Args:
        queries: ``[Q, pos]`` token tensor, dict of ``[Q, ...]`` tensors or ``datasets.Dataset``.
        model: the model (its ``cfg`` bounds tokens, positions and labels when it has one).
        needs_label: a built-in metric reads ``"label"`` (and ``"alt_label"`` when present):
            they must be ``[Q]`` integers in ``[0, d_vocab_out)``; integer-valued floats are
            converted exactly.
        position: the position a built-in metric reads: must lie in ``[-pos, pos)`` of the
            ``[Q, pos]`` tokens.

    Raises:
        QueryError: empty query set, ragged columns, missing labels, out-of-vocabulary tokens,
            bool/fractional tokens or labels, a position outside the queries.
    """
    if isinstance(queries, Tensor):
        batch = {"tokens": queries}
    elif isinstance(queries, dict):
        batch = {k: torch.as_tensor(v) for k, v in queries.items()}
    elif hasattr(queries, "with_format") and hasattr(queries, "column_names"):
        if len(queries) == 0:
            raise QueryError("the query set is empty")
        batch = dict(queries.with_format("torch")[:])
        batch = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
    else:
        raise QueryError(f"queries must be a tensor, a dict of tensors or a datasets.Dataset, got {type(queries)}")
    if "tokens" not in batch and "input" not in batch:
        raise QueryError(f"queries need a 'tokens' (or 'input') column; got {sorted(batch)}")
    sizes = {k: v.shape[0] if v.ndim else -1 for k, v in batch.items()}
    n = next(iter(sizes.values()))
    if n <= 0:
        raise QueryError("the query set is empty")
    if any(s != n for s in sizes.values()):
        raise QueryError(f"query columns have different lengths: {sizes}")
    if needs_label and "label" not in batch:
        raise QueryError("this metric needs a 'label' column in the queries")
    if needs_label:
        for key in ("label", "alt_label"):
            if key in batch:
                batch[key] = _integer_column(key, batch[key])
                if batch[key].ndim != 1:
                    raise QueryError(f"query {key!r} must be [query], got shape {tuple(batch[key].shape)}")
    cfg = getattr(model, "cfg", None)
    if cfg is not None and "tokens" in batch:
        tok = batch["tokens"] = _integer_column("tokens", batch["tokens"])
        if tok.ndim != 2:
            raise QueryError(f"query tokens must be [query, pos], got shape {tuple(tok.shape)}")
        if tok.min() < 0 or tok.max() >= cfg.d_vocab:
            raise QueryError(
                f"query tokens out of vocabulary: range [{int(tok.min())}, {int(tok.max())}], d_vocab={cfg.d_vocab}"
            )
        if tok.shape[1] > cfg.n_ctx:
            raise QueryError(f"queries have {tok.shape[1]} positions but the model's n_ctx is {cfg.n_ctx}")
    if position is not None and "tokens" in batch and batch["tokens"].ndim == 2:
        n_pos = batch["tokens"].shape[1]
        if not -n_pos <= position < n_pos:
            raise QueryError(
                f"position={position} is outside the queries' {n_pos} positions (allowed: "
                f"{-n_pos} .. {n_pos - 1})"
            )
    if cfg is not None and needs_label:
        d_out = getattr(cfg, "d_vocab_out", None) or getattr(cfg, "d_vocab", None)
        for key in ("label", "alt_label"):
            if key in batch and d_out is not None and (batch[key].min() < 0 or batch[key].max() >= d_out):
                raise QueryError(f"query {key} out of range [0, {d_out}): [{int(batch[key].min())}, {int(batch[key].max())}]")
    return batch


def prepare_queries(
    queries: Any, model: torch.nn.Module, metric: Any, position: Any, by_position: bool = False
) -> tuple[Any, dict[str, Tensor], int | list[int] | None]:
    """The metric function, the normalised queries and the position(s) it reads, checked
    against the queries (``None`` for a callable metric): what ``explain`` and
    ``metagradient`` both start from.

    Raises:
        QueryError, ValueError: as :func:`normalize_queries`, :func:`check_lm_queries`.
    """
    metric_fn, needs_label = resolve_metric(metric, position, by_position=by_position)
    lm = isinstance(metric, str) and metric in LM_METRICS
    one = None if callable(metric) or lm else (-1 if position is None else position)
    batch = normalize_queries(queries, model, needs_label, position=one)
    # next-token metrics: the positions each query is scored at, checked against the queries now
    return metric_fn, batch, check_lm_queries(batch, metric, position) if lm else one


def check_lm_queries(batch: dict[str, Tensor], metric: str, position: Any) -> list[int]:
    """Queries for a next-token metric and the positions it reads (:func:`read_positions`).

    The queries need ``[Q, pos]`` tokens with ``pos >= 2``, and a ``"loss_mask"``, if present,
    must be bool ``[Q, pos]`` and mark, for every query, a token predicted from one of the read
    positions (else its mean would be 0/0).

    Raises:
        QueryError: naming what is wrong (and the queries concerned).
    """
    tok = batch.get("tokens")
    if tok is None or tok.ndim != 2 or tok.shape[1] < 2:
        shape = None if tok is None else tuple(tok.shape)
        raise QueryError(f"{metric} needs 'tokens' [query, pos] with pos >= 2 (a token and its successor), got {shape}")
    positions = read_positions(position, tok.shape[1])
    mask = batch.get(LOSS_MASK)
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(tok.shape):
            raise QueryError(f"queries' {LOSS_MASK!r} must be bool {tuple(tok.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        empty = torch.nonzero(~mask[:, [p + 1 for p in positions]].any(1)).flatten()
        if len(empty):
            raise QueryError(
                f"queries {empty[:5].tolist()} mark none of the tokens predicted at positions {positions[0]}.."
                f"{positions[-1]} in {LOSS_MASK!r}: widen position= or drop those queries"
            )
    return positions


def take(batch: dict[str, Tensor], idx: Tensor | slice) -> dict[str, Tensor]:
    return {k: v[idx] for k, v in batch.items()}



# --------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """What an explain call computes: the rows, the kept axes and their sizes, the window."""

    by: tuple[str, ...]
    resolve_query: bool
    resolve_output: bool
    n_query: int
    n_output: int
    weights: Tensor  # [Q] float64: weight of each query in the aggregate rows
    window: tuple[int, int]
    bin_width: int | None
    n_bins: int
    component_labels: list[str] | None
    x_labels: list[Any]  # source or train coords ([None] when summed)
    clock: str  # "realized" | "seen"
    output_name: str = "output"  # the metric's outputs are "position"s for by=(..., "position")
    output_labels: list[Any] | None = None  # their coords (default range(n_output))
    n_terms: int = 0  # token terms per training example for by=("train", "train_position"), else 0

    @property
    def rows_per_query(self) -> int:
        return self.n_output if self.resolve_output else 1

    @property
    def n_rows(self) -> int:
        return (self.n_query if self.resolve_query else 1) * self.rows_per_query

    def bin_of(self, s: int) -> int:
        if self.bin_width is None:
            return 0
        return (s - self.window[0]) // self.bin_width

    def rows(self, values: Float[Tensor, "query output"], q_index: Tensor | None = None) -> Float[Tensor, "row"]:
        """Metric values ``[q, O]`` of a query chunk -> that chunk's contribution to the rows."""
        v = values.to(torch.float64)
        if not self.resolve_output:
            v = v.sum(1, keepdim=True)
        if self.resolve_query:
            return v.reshape(-1)
        w = self.weights if q_index is None else self.weights[q_index.cpu()]
        w = w.to(v.device)
        return (v * w[:, None]).sum(0)


def make_plan(
    by: tuple[str, ...],
    n_query: int,
    n_output: int,
    reduce: str,
    window: tuple[int, int],
    step_bins: int | None,
    component_labels: list[str] | None,
    num_train: int,
    output_labels: list[Any] | None = None,
    n_terms: int = 0,
) -> Plan:
    """The :class:`Plan` of a call keeping the axes ``by`` over the steps ``window``."""
    a, b = window
    clock = "seen" if "train" in by else "realized"
    if "train" in by:  # with token terms: column i * n_terms + t for term t of example i
        x_labels: list[Any] = list(range(num_train * max(n_terms, 1))) + list(PSEUDO)
    elif "source" in by:
        x_labels = list(SOURCES)
    else:
        x_labels = [None]
    width = step_bins if (step_bins is not None and "step" in by) else None
    n_bins = 1 if "step" not in by else (math.ceil((b - a) / width) if width else b - a)
    if "step" in by and width is None:
        width = 1
    weights = torch.full((n_query,), 1.0 / n_query if reduce == "mean" else 1.0, dtype=torch.float64)
    return Plan(
        by=by,
        resolve_query="query" in by,
        resolve_output="output" in by or "position" in by,
        n_query=n_query,
        n_output=n_output,
        weights=weights,
        window=(a, b),
        bin_width=width,
        n_bins=n_bins,
        component_labels=component_labels,
        x_labels=x_labels,
        clock=clock,
        output_name="position" if "position" in by else "output",
        output_labels=output_labels,
        n_terms=n_terms,
    )


def default_query_chunk(plan: Plan, directional: bool, n_params: int, dtype: torch.dtype) -> int:
    """Queries per chunk: 4096 aggregated, 256 with a query axis; with per-query gradients, which
    a chunk holds at once (``[queries, outputs, P]``, working dtype), as many as fit ~256 MB."""
    if not plan.resolve_query:
        return 4096
    if directional:
        return 256
    per_query = plan.rows_per_query * n_params * torch.finfo(dtype).bits // 8
    return max(1, min(256, (256 << 20) // per_query))


def probe_outputs(model, metric_fn, batch) -> int:
    with torch.no_grad():
        was = model.training
        model.eval()
        logits = model(model_input({k: v[:1] for k, v in batch.items()}))
        model.train(was)
        try:
            out = metric_fn(logits, {k: v[:1] for k, v in batch.items()})
        except IndexError as err:
            raise QueryError(
                f"the metric could not read the model's output of shape {tuple(logits.shape)} for one "
                f"query (position or label out of range?): {err}"
            ) from err
    if out.ndim not in (1, 2) or out.shape[0] != 1:
        raise QueryError(f"a metric must return [Q] or [Q, O]; got shape {tuple(out.shape)} for one query")
    return 1 if out.ndim == 1 else int(out.shape[1])
