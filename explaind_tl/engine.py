"""The ExPLAIND decomposition engine: ``explain(trajectory, queries, ...) -> Attribution``.

The trained model's output change over a window of steps ``[a, b)`` is rewritten exactly as

    q(w_b) - q(w_a) = Σ_s <φ_s, Δ_s> + (measured quadrature residual)

and each ``<φ_s, Δ_s>`` is split along the axes the user asks for (DESIGN §1-4):

* ``component``: a partition of the parameter coordinates (``ComponentMap``);
* ``source``: the update's pieces: ``data`` (gradients of training examples seen in the
  window), ``history`` (momentum carried into the window), ``weight_decay`` (AdamW's decoupled
  decay), ``regularization`` (coupled L2 as a pseudo-example) and ``update_residual`` (the
  floating-point gap between the stored update and its algebraic reconstruction);
* ``train``: per training example (seen clock, adjoint recursion of DESIGN §4, memory
  ``O(rows · P)``, never ``N_train · P``), plus the pseudo-entries of ``source``;
* ``step`` (realized clock by default; the seen clock when ``train`` is asked for), optionally
  binned; ``query`` and ``output``.

Every result carries its completeness certificate: per step, ``q(w_{s+1}) - q(w_s)`` measured
with two forward passes in float64 against the attributed change, and a bound per step
(``tol`` relative plus the working dtype's rounding floor). Steps whose residual exceeds it are
refined (more Gauss–Legendre nodes); on ReLU models the segment is first cut where
pre-activations change sign (kink-aware quadrature). A step that still misses its bound (at
``max_nodes``, or when refinement stops improving) is flagged: ``Completeness.ok`` is False,
``failed_steps`` lists it, and ``explain`` warns (``CertificateWarning``) or, with
``strict=True``, raises ``CertificateError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import operator
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from . import safe_format
from .errors import CertificateError, CertificateWarning, QueryError
from .functional import (
    KINK_MASK,
    KINK_ON,
    LossFunction,
    ParamLayout,
    Params,
    QueryFunction,
    model_input,
)
from .metrics import resolve_metric
from .quadrature import gauss_legendre, kink_pieces, kink_points, residual_tolerance
from .recorder import torch_threads

AXES = ("step", "component", "source", "query", "output", "train")
SOURCES = ("data", "history", "weight_decay", "regularization", "update_residual")
PSEUDO = ("history", "weight_decay", "regularization", "update_residual")
# train_grads -> the most tangents (rows x components) for which the train axis uses jvp
TRAIN_GRADS = {"auto": 12, "jvp": 2**62, "per_example": 0}
# query_grads -> the most tangents (sources x components) for which per-query rows use jvp
QUERY_GRADS = {"auto": 64, "jvp": 2**62, "grad": 0}
# adaptive refinement also stops once doubling the nodes changes every failing row's attributed
# total by less than this fraction of its residual (the quadrature has converged; the rest is
# rounding in the working dtype)
SETTLED = 0.1
# ... or once two doublings in a row shrink the worst residual/bound ratio by less than this factor
STALLED = 0.7
# a step whose worst residual is below this fraction of its bound lets the next start with fewer nodes
COMFORTABLE = 0.1


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


def _take(batch: dict[str, Tensor], idx: Tensor | slice) -> dict[str, Tensor]:
    return {k: v[idx] for k, v in batch.items()}


# --------------------------------------------------------------------------- plan
@dataclass
class _Plan:
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


# --------------------------------------------------------------------------- engine
class _Engine:
    def __init__(
        self,
        trajectory,
        batch: dict[str, Tensor],
        metric_fn: Callable,
        plan: _Plan,
        cmap,
        dtype: torch.dtype,
        device: torch.device,
        tol: float,
        nodes: int,
        max_nodes: int,
        kink_aware: bool,
        query_chunk: int,
        train_chunk: int,
        position: int | None = None,
        fast_forward: bool = True,
        jvp_tangents: int = 12,
        directional: bool = False,
        adaptive_nodes: bool = True,
    ) -> None:
        self.traj = trajectory
        self.plan = plan
        self.dtype = dtype
        self.device = device
        self.tol = tol
        self.nodes = nodes
        self.adaptive_nodes = adaptive_nodes
        self.start_nodes: dict[int, int] = {}  # query chunk -> nodes its next step starts with
        self.cooldown: dict[int, tuple[int, int]] = {}  # query chunk -> (steps to wait, next wait)
        self.max_nodes = max_nodes
        # replay the next segment in a background thread when there is a core to spare
        self.prefetch = torch.get_num_threads() > 1
        self.query_chunk = query_chunk
        self.train_chunk = train_chunk
        self.jvp_chunk = train_chunk  # activations of a chunk are what the jvp holds: memory flat in N_train
        self.batch = {k: v.to(device) for k, v in batch.items()}
        model = trajectory.model()
        self.names = list(trajectory.param_names)
        params0 = dict(model.named_parameters())
        self.layout = ParamLayout(tuple(self.names), tuple(params0[n].shape for n in self.names))
        self.fast_forward = fast_forward
        self.qf = QueryFunction(
            model, self.names, metric_fn, dtype=dtype, device=device, position=position if fast_forward else None
        )
        # the read-out forward is checked against TransformerLens on the queries before use
        self.readout_error = None
        self.checkpoints = set(trajectory.checkpoint_steps)
        if "tokens" in self.batch:
            self.readout_error = self.qf.check_readout(self.batch["tokens"][:64])
        else:
            self.qf.readout = self.qf.cert_readout = None
        self.kink_aware = kink_aware and self.qf.has_kinks
        self.unit_filter = self.unit_index = None
        if self.kink_aware and "tokens" in self.batch:
            self.unit_filter = self.qf.relevant_units(self.batch["tokens"].shape[1], position)
            if self.unit_filter is not None:
                self.unit_index = torch.nonzero(self.unit_filter).reshape(-1)
        self.spec = trajectory.optimizer_spec
        self.cmap = cmap
        if cmap is not None:
            self.flat_index = self._flat_component_index(cmap).to(device)
            self.n_comp = len(cmap.labels)
        else:
            self.flat_index = None
            self.n_comp = 1
        self.eps = torch.finfo(dtype).eps
        # per-query rows on the realized clock: forward-mode derivatives along each (update vector,
        # component) instead of per-query gradients
        self.directional = directional
        # train axis: data entries by forward-mode derivatives when rows x components are few
        self.train_jvp = plan.n_rows * self.n_comp <= jvp_tangents
        self._onehot: Tensor | None = None
        self._lossf: LossFunction | None = None
        self.nodes_used: dict[int, int] = {}
        self.kinks_seen: dict[int, int] = {}
        self.ends: dict[int, Tensor] = {}
        self.n_units = 0
        self.step_measured: dict[int, Tensor] = {}
        self.step_attributed: dict[int, Tensor] = {}
        # per step, the bound its residual was compared against ([rows], summed over chunks)
        self.step_bound: dict[int, Tensor] = {}

    # ---------------------------------------------------------------- helpers
    def _flat_component_index(self, cmap) -> Tensor:
        parts = []
        for name in self.names:
            if name not in cmap.index:
                raise ValueError(f"component map does not cover trainable parameter {name!r}")
            parts.append(cmap.index[name].reshape(-1).long())
        return torch.cat(parts)

    def reduce(self, prod: Float[Tensor, "... param"]) -> Float[Tensor, "... component"]:
        """Per-component sums of a flat product (or the plain sum without a component axis)."""
        if self.flat_index is None:
            return prod.sum(-1, keepdim=True)
        return self.cmap.reduce_flat(prod)

    def per_component(self, V: Float[Tensor, "vector param"]) -> Float[Tensor, "tangent param"]:
        """Each vector restricted to each component, ``[X * C, P]`` (vector-major); ``V`` itself
        without a component axis."""
        if self.flat_index is None:
            return V
        if self._onehot is None:
            self._onehot = torch.zeros(self.n_comp, self.layout.numel, dtype=torch.float64, device=self.device)
            self._onehot[self.flat_index, torch.arange(self.layout.numel, device=self.device)] = 1.0
        return (V[:, None, :] * self._onehot[None].to(V.dtype)).reshape(-1, V.shape[1])

    def flat64(self, d: Params) -> Tensor:
        return self.layout.flatten({k: v.to(self.device) for k, v in d.items()}, dtype=torch.float64)

    def to_work(self, d: Params) -> Params:
        return {k: d[k].to(self.device, self.dtype) for k in self.names}

    def to_cert(self, d: Params) -> Params:
        return {k: d[k].to(self.device, self.qf.cert_dtype) for k in self.names}

    def chunks(self) -> list[Tensor]:
        q = self.plan.n_query
        return [torch.arange(i, min(i + self.query_chunk, q), device=self.device) for i in range(0, q, self.query_chunk)]

    def row_slice(self, idx: Tensor) -> slice:
        if not self.plan.resolve_query:
            return slice(0, self.plan.rows_per_query)
        o = self.plan.rows_per_query
        return slice(int(idx[0]) * o, (int(idx[-1]) + 1) * o)

    # ------------------------------------------------------------ certificate
    def endpoint(self, params: Params, step: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Metric values ``[Q, O]`` (float64) and ReLU pre-activations at a trajectory point.

        Values at the window's ends are kept (``self.ends``) for the total certificate.
        """
        out = self._endpoint(params)
        if step is not None and step in self.plan.window:
            self.ends[step] = out[0]
        if step is not None and (step in self.plan.window or step in self.checkpoints) and self.qf.readout is not None:
            # the read-out forward measures the certificate: compare it with TransformerLens on
            # every query at the window's ends and at every checkpoint inside it
            p = self.to_cert(params)
            for idx in self.chunks():
                err = self.qf.check_readout(self.batch["tokens"][idx], p, strict=True)
                self.readout_error = max(self.readout_error or 0.0, err)
        return out

    def _endpoint(self, params: Params) -> tuple[Tensor, Tensor | None]:
        p = self.to_cert(params)
        vals, pre = [], []
        for idx in self.chunks():
            sub = _take(self.batch, idx)
            if self.kink_aware:
                v, z = self.qf.values_and_preacts(p, sub)
                # only the units that can reach the metric are ever inspected for kinks
                pre.append((z[:, self.unit_filter.to(z.device)] if self.unit_filter is not None else z).cpu())
            else:
                v = self.qf.values(p, sub)
            vals.append(v)
        return torch.cat(vals).to(torch.float64), (torch.cat(pre) if pre else None)

    # ------------------------------------------------------------- quadrature
    def _kinks(self, w: Params, delta: Params, idx: Tensor, t_nodes: Tensor, z0: Tensor, z1: Tensor, scan_all: bool):
        """Sign changes of the chunk's relevant ReLU pre-activations, sampled at 0, the nodes and 1.

        Only queries with a sign change between the segment's ends are sampled at the nodes,
        unless ``scan_all`` (used when the certificate asks for refinement, to catch units that
        switch twice inside the segment).
        """
        idx = idx.cpu()
        a, b = (z0, z1) if len(idx) == len(z0) else (z0[idx], z1[idx])  # relevant units only (endpoint)
        cand = torch.arange(len(idx)) if scan_all else torch.nonzero(((a * b) < 0).any(1)).reshape(-1)
        empty = torch.zeros(0, dtype=torch.long)
        if len(cand) == 0:
            return empty, empty, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
        sub = _take(self.batch, idx[cand].to(self.device))
        inner = []
        for tj in t_nodes.tolist():
            p = {k: w[k] + tj * delta[k] for k in self.names}
            zj = self.qf.values_and_preacts(p, sub, cert=False)[1].to(torch.float64).cpu()
            inner.append(zj[:, self.unit_filter] if self.unit_filter is not None else zj)
        z = torch.stack([a[cand], *inner, b[cand]], dim=1)  # [q, m, U']
        t = torch.cat([torch.zeros(1, dtype=torch.float64), t_nodes, torch.ones(1, dtype=torch.float64)])
        q, u, ts, on = kink_points(t, z)
        if self.unit_filter is not None:
            u = self.unit_index[u]
        self.kinks_seen[self._current_step] = self.kinks_seen.get(self._current_step, 0) + len(q)
        return idx[cand][q], u, ts, on

    def _phi_chunk(
        self,
        w: Params,
        delta: Params,
        idx: Tensor,
        n: int,
        ends: tuple[Tensor, Tensor] | None,
        tangents: Params | None = None,
    ) -> Float[Tensor, "row param_or_tangent"]:
        """``φ̂`` for the rows of one query chunk with ``n`` shared Gauss–Legendre nodes.

        Queries whose ReLUs switch inside the segment are expanded into one row per smooth piece,
        with the activation pattern forced and the piece's weights (:func:`kink_pieces`). With
        ``tangents`` (dict of ``[T, *shape]``; per-query rows only) the result is ``<φ̂, t>`` for
        each tangent, ``[rows, T]``, from forward-mode derivatives instead of gradients.
        """
        plan = self.plan
        t_nodes, w_nodes = gauss_legendre(n)
        idx_cpu = idx.cpu()
        rows_q, weights, force = idx_cpu, w_nodes[None, :].expand(len(idx_cpu), n), None
        if ends is not None:
            q, u, ts, on = self._kinks(w, delta, idx, t_nodes, *ends, scan_all=n > self.nodes)
            if len(q):
                self.n_units = len(self.unit_filter) if self.unit_filter is not None else ends[0].shape[1]
                kp = kink_pieces(t_nodes, q, u, ts, on)
                smooth = idx_cpu[~torch.isin(idx_cpu, kp.query)]
                rows_q = torch.cat([smooth, kp.query])
                weights = torch.cat([w_nodes[None, :].expand(len(smooth), n), kp.weights])
                mask = torch.zeros(len(rows_q), self.n_units, dtype=torch.bool)
                val = torch.zeros(len(rows_q), self.n_units, dtype=torch.bool)
                mask[len(smooth) + kp.force_row, kp.force_unit] = True
                val[len(smooth) + kp.force_row, kp.force_unit] = kp.force_on
                force = (mask.to(self.device), val.to(self.device))
        # local position of each row's query inside the chunk
        pos = torch.searchsorted(idx_cpu, rows_q)
        sub = _take(self.batch, rows_q.to(self.device))
        if force is not None:
            sub = {**sub, KINK_MASK: force[0], KINK_ON: force[1]}
        n_rows = (len(idx) if plan.resolve_query else 1) * plan.rows_per_query
        width = self.layout.numel if tangents is None else next(iter(tangents.values())).shape[0]
        phi = torch.zeros(n_rows, width, dtype=torch.float64, device=self.device)
        o = plan.rows_per_query
        for j, tj in enumerate(t_nodes.tolist()):
            p = {k: w[k] + tj * delta[k] for k in self.names}
            wj = weights[:, j]
            if tangents is not None:
                d = self.qf.per_query_directional(p, sub, tangents, plan.resolve_output)  # [T, rows, O']
                d = d.to(torch.float64) * wj.to(self.device, torch.float64)[None, :, None]
                per_q = torch.zeros(d.shape[0], len(idx), o, dtype=torch.float64, device=self.device)
                per_q.index_add_(1, pos.to(self.device), d)
                phi += per_q.reshape(d.shape[0], -1).T
            elif plan.resolve_query:
                g = self.qf.per_query_grad(p, sub, plan.resolve_output)  # [rows, O', *shape]
                # the weighted pieces of each query summed in the working dtype, one parameter at a
                # time, as a product with the [queries, rows] weight matrix: the [rows, O', P] block
                # is read once and never copied to float64
                pieces = torch.zeros(len(idx), len(rows_q), dtype=self.dtype, device=self.device)
                pieces[pos.to(self.device), torch.arange(len(rows_q), device=self.device)] = wj.to(self.device, self.dtype)
                for name, sl in self.layout.slices.items():
                    phi[:, sl] += (pieces @ g[name].reshape(len(rows_q), -1)).reshape(len(idx) * o, -1)
            else:
                rw = (plan.weights[rows_q] * wj).to(self.device)
                g = self.qf.aggregate_grad(p, sub, rw, plan.resolve_output)  # [O', *]
                phi += self.layout.flatten(g, lead=1, dtype=torch.float64)
        return phi

    def phi(
        self,
        s: int,
        w_s: Params,
        w_next: Params,
        q0: tuple[Tensor, Tensor | None],
        q1: tuple[Tensor, Tensor | None],
        vectors: Tensor | None = None,
    ) -> Float[Tensor, "row param_or_vector"]:
        """``φ̂_s`` for all rows, refined against the certificate; records nodes, measured and
        attributed change and the bound the residual was compared against (``step_bound``: the
        last :func:`residual_tolerance` of each chunk, summed over chunks; a chunk that stops
        refining at ``max_nodes`` or when refinement settles or stalls keeps its failing bound).

        With ``vectors`` (``[T, P]`` float64 whose sum is ``Δ_s``), returns ``<φ̂_s, v>`` for each
        instead, ``[rows, T]``, from forward-mode derivatives (per-query rows). The certificate's
        rounding allowance then uses ``Σ_v |<φ̂_s, v>|`` for ``Σ_p |φ̂_p Δ_p|``.
        """
        plan = self.plan
        w = self.to_work(w_s)
        delta64 = {k: w_next[k].to(self.device, torch.float64) - w_s[k].to(self.device, torch.float64) for k in self.names}
        delta = {k: v.to(self.dtype) for k, v in delta64.items()}
        dflat = self.layout.flatten(delta64)
        ends = (q0[1], q1[1]) if (self.kink_aware and q0[1] is not None) else None
        self._current_step = s
        tangents = None if vectors is None else self.layout.unflatten(vectors.to(self.device, self.dtype))
        width = self.layout.numel if vectors is None else vectors.shape[0]
        phi = torch.zeros(plan.n_rows, width, dtype=torch.float64, device=self.device)
        measured = torch.zeros(plan.n_rows, dtype=torch.float64)
        attributed = torch.zeros(plan.n_rows, dtype=torch.float64)
        bounds = torch.zeros(plan.n_rows, dtype=torch.float64)
        n_max = 0
        for idx in self.chunks():
            rs = self.row_slice(idx)
            meas = plan.rows(q1[0][idx], idx) - plan.rows(q0[0][idx], idx)
            n0 = n = self.start_nodes.get(int(idx[0]), self.nodes)
            att_prev, worst_prev, stalls = None, math.inf, 0
            while True:
                self.kinks_seen[s] = 0
                part = self._phi_chunk(w, delta, idx, n, ends, tangents)
                if tangents is None:
                    att, mag = part @ dflat, part.abs() @ dflat.abs()
                else:
                    att, mag = part.sum(1), part.abs().sum(1)
                res = (meas - att).abs()
                bound = residual_tolerance(meas, mag, self.tol, self.eps)
                failing = res > bound
                if not bool(failing.any()) or n * 2 > self.max_nodes:
                    break
                # Stop refining once what is left is rounding in the working dtype (e.g. float32
                # gradients of saturated log-probs), not quadrature error: either doubling the
                # nodes moved every failing row by much less than its residual, or two doublings
                # in a row did not shrink the worst residual/bound ratio.
                worst = float((res / bound.clamp_min(torch.finfo(torch.float64).tiny)).max())
                stalls = stalls + 1 if worst > STALLED * worst_prev else 0
                if stalls >= 2:
                    break
                if att_prev is not None and bool(((att - att_prev).abs()[failing] <= SETTLED * res[failing]).all()):
                    break
                att_prev, worst_prev = att, worst
                n *= 2
            if self.adaptive_nodes:
                margin = float((res / bound.clamp_min(torch.finfo(torch.float64).tiny)).max())
                self._adapt_start(int(idx[0]), n0, n, margin)
            n_max = max(n_max, n)
            phi[rs] += part
            measured[rs] += meas.cpu()
            attributed[rs] += att.cpu()
            bounds[rs] += bound.cpu()
        self.nodes_used[s] = n_max
        self.step_measured[s] = measured
        self.step_attributed[s] = attributed
        self.step_bound[s] = bounds
        return phi

    def _adapt_start(self, key: int, n0: int, n: int, margin: float) -> None:
        """Step control for the nodes a chunk's next step starts with (like an ODE solver's).

        After a comfortable pass (worst residual below ``COMFORTABLE`` of its bound) at the
        starting count, the next step tries half as many nodes (down to 1); a step that needed
        refinement sends the next back to ``nodes``. A failed try at fewer nodes doubles the
        number of comfortable steps to wait before the next try (up to 64), so a regime where
        fewer nodes do not suffice costs little.
        """
        cool, wait = self.cooldown.get(key, (0, 1))
        if n > n0:  # refined
            if n0 < self.nodes:  # a try at fewer nodes failed: back off
                wait = min(2 * wait, 64)
                cool = wait
            self.start_nodes[key] = self.nodes
        elif margin < COMFORTABLE:
            if n0 < self.nodes:
                wait = 1  # fewer nodes work here
            if cool > 0:
                cool -= 1
            else:
                self.start_nodes[key] = max(1, n0 // 2)
        self.cooldown[key] = (cool, wait)

    # ---------------------------------------------------------- optimizer algebra
    def step_spec(self, rec):
        """The optimizer spec of step ``rec.step``: hyper-parameters may change between steps."""
        return rec.spec if getattr(rec, "spec", None) is not None else self.spec

    def beta_of(self, s: int) -> float:
        """``β_s`` (Adam: ``beta1``; SGD: ``momentum``) of step ``s``, from the recorded hyper-parameters."""
        spec = self.traj.optimizer_spec_at(s)
        return spec.betas[0] if spec.kind in ("adam", "adamw") else spec.momentum

    def coefficients(self, rec):
        """``β_s, c_s, P_s, e_s`` and the decays of step ``rec.step``, from that step's spec."""
        from .optim import update_coefficients_for

        first = not rec.state_before or not any(rec.state_before.values())
        return update_coefficients_for(self.step_spec(rec), rec.lr, rec.step_count, rec.state_after, first, rec.params)

    def buffer(self, state: dict, spec=None) -> Tensor:
        """The flat float64 momentum buffer held in an optimizer state (zero when absent)."""
        from .optim import buffer_after

        if not state or not any(state.values()):
            return torch.zeros(self.layout.numel, dtype=torch.float64, device=self.device)
        return self.flat64(buffer_after(spec or self.spec, state))

    # ---------------------------------------------------------- realized clock
    def run_realized(self, progress: bool, acc: Tensor, resume: _Resume | None) -> None:
        plan = self.plan
        a, b = plan.window
        want_sources = "source" in plan.by
        state = resume.load() if resume else None
        start = a
        H = Rb = None
        q0 = None
        if state is not None:
            start = state["next_step"]
            acc.copy_(state["acc"])
            H, Rb = state["H"], state["Rb"]
            self._restore(state)
        bar = _progress(progress, total=b - a, initial=start - a, desc="explain (step x component)")
        for seg in prefetched(self.traj.segments(start, b), self.prefetch):
            for rec in seg:
                s = rec.step
                if q0 is None:
                    q0 = self.endpoint(rec.params, s)
                q1 = self.endpoint(rec.next_params, s + 1)
                vectors = self.realized_vectors(rec, want_sources, H, Rb)
                if want_sources:
                    vectors, H, Rb = vectors
                k = plan.bin_of(s)
                if self.directional:
                    V = self.per_component(torch.stack(vectors))  # one tangent per (vector, component)
                    vals = self.phi(s, rec.params, rec.next_params, q0, q1, vectors=V)  # [R, X*C]
                    acc[k] += vals.reshape(vals.shape[0], len(vectors), self.n_comp).transpose(1, 2).cpu()
                else:
                    phi = self.phi(s, rec.params, rec.next_params, q0, q1)
                    for x, vec in enumerate(vectors):
                        acc[k, :, :, x] += self.reduce(phi * vec[None, :]).cpu()
                q0 = q1
                bar.update(1)
            if resume is not None:
                resume.save({"next_step": seg[-1].step + 1, "acc": acc, "H": H, "Rb": Rb, **self._snapshot()})
        bar.close()

    def realized_vectors(self, rec, want_sources: bool, H: Tensor | None, Rb: Tensor | None):
        """Flat float64 vectors whose inner products with ``φ̂_s`` give the entries of step ``s``."""
        w64 = self.flat64(rec.params)
        delta = self.flat64(rec.next_params) - w64
        if not want_sources:
            return [delta]
        from .optim import reconstruct_update

        spec = self.step_spec(rec)
        co = self.coefficients(rec)
        g64 = self.flat64(rec.grad)
        P = self.flat64(co.P)
        e = self.flat64(co.e) if co.e is not None else None
        if co.has_buffer:
            b_next = self.buffer(rec.state_after, spec)
        else:
            b_next = g64 + co.coupled_wd * w64
        if H is None:  # window start: momentum carried in from before the window
            H = self.buffer(rec.state_before, spec)
            Rb = torch.zeros_like(H)
        # b_{s+1} = β_s b_s + c_s gt_s with this step's β_s, c_s: the history part
        # H_{s+1} = β_s H_s (H_a = b_a) and the coupled-L2 part Rb_{s+1} = β_s Rb_s + c_s λ_s w_s
        if co.has_buffer:
            H = co.beta * H
            Rb = co.beta * Rb + co.c * co.coupled_wd * w64
        else:
            H = torch.zeros_like(w64)
            Rb = co.coupled_wd * w64
        dhat = self.layout.flatten(
            reconstruct_update(spec, co, rec.params, rec.grad, self.layout.unflatten(b_next)), dtype=torch.float64
        ).to(self.device)
        vec = {
            "data": P * (b_next - H - Rb) + (e * g64 if e is not None else 0.0),
            "history": P * H,
            "weight_decay": -co.decoupled_wd * w64,
            "regularization": P * Rb + (e * co.coupled_wd * w64 if e is not None else 0.0),
            "update_residual": delta - dhat,
        }
        return [vec[lbl] for lbl in self.plan.x_labels], H, Rb

    # ------------------------------------------------------------- seen clock
    def loss_function(self) -> LossFunction:
        if self._lossf is None:
            self._lossf = LossFunction(self.traj.model(), self.traj.loss_fn, self.dtype, self.device, self.fast_forward)
            rows = self.traj.batch(torch.arange(min(64, self.traj.num_train)))
            if "tokens" in rows:
                err = self._lossf.check_readout(rows["tokens"])
                if err is not None:
                    self.readout_error = max(self.readout_error or 0.0, err)
            else:
                self._lossf.readout = None
        return self._lossf

    def run_seen(self, progress: bool, acc: Tensor, resume: _Resume | None) -> None:
        """Adjoint sweep (DESIGN §4): ``Ã_s = P_s ⊙ φ_s + β_{s+1} Ã_{s+1}``, backwards over segments.

        With ``b_{s+1} = β_s b_s + c_s gt_s`` and ``Δ_s = P_s ⊙ b_{s+1} + e_s ⊙ gt_s - λ'_s w_s``,
        the gradient ``gt_k`` reaches every later update through ``Π_{j=k+1..s} β_j``, so
        ``Ã_k = Σ_{s>=k} P_s φ_s Π_{j=k+1..s} β_j`` and the recursion multiplies ``Ã_{s+1}`` by
        the *next* step's ``β_{s+1}`` (schedulers such as OneCycleLR change β every step).
        ``gt_s`` enters with ``G_s = c_s Ã_s + e_s φ_s``; the momentum carried into the window,
        ``b_a``, with ``β_a Ã_a``.
        """
        plan = self.plan
        a, b = plan.window
        n_train = self.traj.num_train
        col = {lbl: n_train + i for i, lbl in enumerate(PSEUDO)}
        state = resume.load() if resume else None
        A = torch.zeros(plan.n_rows, self.layout.numel, dtype=torch.float64, device=self.device)
        beta_next = 0.0  # β_{s+1} of the step after the current one (Ã_b = 0 at the window's end)
        done_before = b
        q1 = None
        if state is not None:
            acc.copy_(state["acc"])
            A = state["A"].to(self.device)
            done_before = state["done_before"]
            beta_next = self.beta_of(done_before) if done_before < b else 0.0
            self._restore(state)
        bar = _progress(progress, total=b - a, initial=b - done_before, desc="explain (train, adjoint)")
        perm = blocks = None
        if self.flat_index is not None:
            perm = torch.argsort(self.flat_index, stable=True)
            blocks = torch.bincount(self.flat_index, minlength=self.n_comp).tolist()
        for seg in prefetched(self.traj.segments(a, done_before, reverse=True), self.prefetch):
            for rec in reversed(seg):
                s = rec.step
                if q1 is None:
                    q1 = self.endpoint(rec.next_params, s + 1)
                q0 = self.endpoint(rec.params, s)
                phi = self.phi(s, rec.params, rec.next_params, q0, q1)
                q1 = q0
                spec = self.step_spec(rec)
                co = self.coefficients(rec)
                P = self.flat64(co.P)
                e = self.flat64(co.e) if co.e is not None else None
                w64 = self.flat64(rec.params)
                # Ã_s = P_s ⊙ φ_s + β_{s+1} Ã_{s+1}; gradient gt_s enters with G_s = c_s Ã_s + e_s ⊙ φ_s
                A = P[None, :] * phi + (beta_next * A if co.has_buffer else 0.0)
                beta_next = co.beta if co.has_buffer else 0.0
                G = co.c * A
                if e is not None:
                    G = G + e[None, :] * phi
                k = plan.bin_of(s)
                # training examples seen at step s
                ids = rec.batch_ids.to(torch.long)
                scale = rec.clip_factor / len(ids)
                data_sum = torch.zeros(plan.n_rows, self.n_comp, dtype=torch.float64)
                for cid, contrib in self.data_entries(G, ids, self.to_work(rec.params), perm, blocks):
                    contrib = scale * contrib.cpu()
                    acc[k].index_add_(2, cid.cpu(), contrib)
                    data_sum += contrib.sum(-1)
                # pseudo-examples
                reg = torch.zeros_like(data_sum)
                if co.coupled_wd:
                    reg = self.reduce(G * (co.coupled_wd * w64)[None, :]).cpu()
                    acc[k, :, :, col["regularization"]] += reg
                if co.decoupled_wd:
                    acc[k, :, :, col["weight_decay"]] += self.reduce(phi * (-co.decoupled_wd * w64)[None, :]).cpu()
                # update residual: with the reconstruction Δ_s = -λ' w_s + P ⊙ b_{s+1} + e ⊙ gt_s + ρ_s,
                # b_{s+1} = β b_s + c gt_s + ε_s, its entry <A, ε_s> + <φ, ρ_s> is
                # X - <G, gt_s>, X = <A, b_{s+1} - β b_s> + <φ, Δ_s + λ' w_s - P ⊙ b_{s+1}>, and
                # <G, gt_s> is what the data and regularization entries of step s add up to. So the
                # entry also carries their rounding (float32 gradients of saturated losses) and every
                # step's entries add up to exactly what its φ and Δ say.
                delta = self.flat64(rec.next_params) - w64
                kept = delta + co.decoupled_wd * w64
                if co.has_buffer:
                    # ε_s = b_{s+1} - β_s b_s - c_s gt_s (this step's β_s) reaches the output through Ã_s
                    b_next = self.buffer(rec.state_after, spec)
                    b_prev = self.buffer(rec.state_before, spec)
                    X = self.reduce(A * (b_next - co.beta * b_prev)[None, :] + phi * (kept - P * b_next)[None, :])
                else:  # plain SGD: A = P ⊙ φ = G
                    X = self.reduce(phi * kept[None, :])
                acc[k, :, :, col["update_residual"]] += X.cpu() - data_sum - reg
                if s == a and co.has_buffer:
                    # b_{s+1} ∋ Π_{j=a..s} β_j b_a, so b_a enters with β_a Ã_a (β_a: this step's)
                    b_a = self.buffer(rec.state_before, spec)
                    acc[k, :, :, col["history"]] += self.reduce(co.beta * A * b_a[None, :]).cpu()
                bar.update(1)
            done_before = seg[0].step
            if resume is not None:
                resume.save({"done_before": done_before, "acc": acc, "A": A.cpu(), **self._snapshot()})
        bar.close()

    def data_entries(
        self, G: Float[Tensor, "row param"], ids: Tensor, w_work: Params, perm: Tensor | None, blocks: list[int] | None
    ) -> Iterator[tuple[Tensor, Float[Tensor, "row component chunk"]]]:
        """``<G_r|_c, ∇ℓ(x_i; w_s)>`` for the training examples ``ids``, chunk by chunk.

        Yields ``(chunk ids, entries [R, C, b])``. With few tangents (rows x components,
        ``self.train_jvp``) the entries are forward-mode directional derivatives of the
        per-example losses, so no ``b x P`` per-example gradients are formed; otherwise
        per-example gradients are materialised and contracted.
        """
        lossf = self.loss_function()
        R, C = G.shape[0], self.n_comp
        if self.train_jvp:
            tangents = self.layout.unflatten(self.per_component(G).to(self.dtype))
            for start in range(0, len(ids), self.jvp_chunk):
                cid = ids[start : start + self.jvp_chunk]
                tb = {kk: v.to(self.device) for kk, v in self.traj.batch(cid).items()}
                dots = lossf.per_example_dots(w_work, tb, tangents).to(torch.float64)  # [R*C, b]
                yield cid, dots.reshape(R, C, -1)
            return
        for start in range(0, len(ids), self.train_chunk):
            cid = ids[start : start + self.train_chunk]
            tb = {kk: v.to(self.device) for kk, v in self.traj.batch(cid).items()}
            grads = self.layout.flatten(lossf.per_example_grad(w_work, tb), lead=1, dtype=torch.float64)
            if perm is None:
                contrib = (G @ grads.T)[:, None, :]  # [R, 1, b]
            else:
                Gs, gs = G[:, perm], grads[:, perm]
                contrib = torch.stack(
                    [gb_ @ Gb_.T for Gb_, gb_ in zip(torch.split(Gs, blocks, 1), torch.split(gs, blocks, 1))], 1
                ).permute(2, 1, 0)  # [b, C, R] -> [R, C, b]
            yield cid, contrib

    # ------------------------------------------------------------- bookkeeping
    def _snapshot(self) -> dict:
        return {
            "nodes_used": dict(self.nodes_used),
            "step_measured": dict(self.step_measured),
            "step_attributed": dict(self.step_attributed),
            "step_bound": dict(self.step_bound),
            "ends": dict(self.ends),
            "kinks_seen": dict(self.kinks_seen),
        }

    def _restore(self, state: dict) -> None:
        self.nodes_used = dict(state["nodes_used"])
        self.step_measured = dict(state["step_measured"])
        self.step_attributed = dict(state["step_attributed"])
        # partial states written before bounds were recorded: those steps' verdict is unknown
        self.step_bound = dict(state.get("step_bound", {}))
        self.ends = dict(state["ends"])
        self.kinks_seen = dict(state["kinks_seen"])


class _Resume:
    """Partial sums persisted atomically after every checkpoint segment."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.file = self.path / safe_format.EXPLAIN_STATE  # safetensors + JSON: loading runs no code
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        safe_format.check_legacy_explain_state(self.path)
        if not self.file.exists():
            return None
        state = safe_format.load_state(self.file)
        if state.get("fingerprint") != self.fingerprint:
            raise QueryError(
                f"{self.file} holds partial results of a different explain() call; use another resume_dir or delete it"
            )
        return state

    def save(self, state: dict) -> None:
        safe_format.save_state(self.file, {**state, "fingerprint": self.fingerprint})


def prefetched(segments: Iterator[list], enabled: bool) -> Iterator[list]:
    """Iterate ``segments`` while a background thread replays the next one.

    Replay runs the recorded training steps single-threaded (exactness), so on a multi-core CPU
    it overlaps with the engine's quadrature on the other cores (measured on 2 cores, default
    grokking run: 72 ms/step sequential with 2 threads, 55 ms/step overlapped). At most two
    segments are held beyond the one in use; errors in the replay are re-raised here; leaving
    the loop early stops the worker.
    """
    if not enabled:
        yield from segments
        return
    box: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for seg in segments:
                if not put(seg):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    worker = threading.Thread(target=work, name="explaind-replay", daemon=True)
    worker.start()
    try:
        while True:
            item = box.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5.0)


def _progress(enabled: bool, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, unit="step", dynamic_ncols=True)


def _fingerprint(trajectory, batch: dict[str, Tensor], config: dict) -> str:
    h = hashlib.sha256()
    h.update(str(Path(trajectory.run_dir).resolve()).encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for k in sorted(batch):
        h.update(k.encode())
        h.update(batch[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- API
def explain(
    trajectory,
    queries: Any,
    metric: str | Callable = "correct_logprob",
    by: Sequence[str] | str = ("step", "component"),
    components: Any = None,
    reduce: str = "sum",
    tol: float = 1e-6,
    steps: tuple[int, int] | None = None,
    step_bins: int | None = None,
    position: int = -1,
    nodes: int = 2,
    max_nodes: int = 16,
    kink_aware: bool | str = "auto",
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    query_chunk: int | None = None,
    train_chunk: int = 256,
    progress: bool = True,
    resume_dir: str | Path | None = None,
    fast_forward: bool = True,
    train_grads: str = "auto",
    query_grads: str = "auto",
    adaptive_nodes: bool = True,
    strict: bool = False,
    trust_remote_code: bool = False,
):
    """Rewrite the trained model's output change exactly as a sum over steps, components, examples.

    Every argument is checked before any replay starts, all but the queries before the model is
    built (wrong types: ``TypeError``; wrong values: ``ValueError``; bad queries:
    :class:`~explaind_tl.errors.QueryError`).

    Args:
        trajectory: a recorded run (:class:`explaind_tl.Trajectory`) or its run directory
            (``str``/``PathLike``, loaded with :meth:`Trajectory.load`).
        queries: test inputs: a ``[Q, pos]`` token tensor, a dict of tensors or a
            ``datasets.Dataset`` with a ``"tokens"`` column and ``"label"`` where the metric needs
            it (``"alt_label"`` for ``"logit_diff"``).
        metric: ``"correct_logit"``, ``"correct_logprob"``, ``"loss"``, ``"logit_diff"``,
            ``"logits"`` or a callable ``(logits, batch) -> [Q]`` or ``[Q, O]``.
        by: axes to keep, any subset of ``("step", "component", "source", "query", "output",
            "train")``; every other axis is summed. ``"train"`` switches to the seen clock
            (example seen at step ``k``) and the adjoint recursion; it cannot be combined with
            ``"source"`` (its pseudo-entries already carry that split). ``by=()`` sums everything:
            a 0-d Attribution holding the total.
        components: ``None`` (one component per parameter tensor), a granularity name
            (``"head"``, ``"block"``, ``"neuron"``, ``"parameter"``) or a ``ComponentMap``.
        reduce: ``"sum"`` or ``"mean"`` over queries when ``"query"`` is not in ``by``.
        tol: per-step relative tolerance of the certificate (finite, > 0): a step passes when
            ``|residual| <= tol * |step change| + 16 * eps * Σ_p |φ_p Δ_p|`` (the rounding floor
            of the working dtype); failing steps get more nodes, up to ``max_nodes``.
        steps: window ``(a, b)``: explain ``q(w_b) - q(w_a)``; default the whole run.
        step_bins: width of step bins (``None``: one bin per step); needs ``"step"`` in ``by``.
        position: token position the built-in metrics read (last by default); an int in
            ``[-pos, pos)`` of the ``[Q, pos]`` query tokens.
        nodes: Gauss–Legendre nodes per smooth piece to start a step with.
        adaptive_nodes: after a step met its certificate at its starting count with a 10x margin,
            start the next with half as many nodes (down to 1); after a step that needed
            refinement, start again from ``nodes``. Every step is still checked against ``tol``.
        max_nodes: cap for adaptive refinement.
        kink_aware: cut segments where ReLU pre-activations change sign (``"auto"``: when the
            model has observable ReLUs).
        dtype: working dtype of gradients, ``torch.float32`` or ``torch.float64`` (default: the
            trajectory's); sums are accumulated in float64 and certificates are measured in
            float64. Half precision is refused: it leaves percent-level residuals per step (measured
            on the test models), far above any useful certificate.
        device: ``"cpu"``, ``"cuda"``... (default: CUDA when available).
        query_chunk: queries per chunk (default: 4096 aggregated, 256 with a query axis; with
            per-query gradients, which a chunk holds at once, as many as fit ~256 MB);
            train_chunk: training examples per
            chunk of per-example gradients.
        progress: show tqdm progress bars.
        resume_dir: persist partial sums after every checkpoint segment and continue from them
            (``explain_state.safetensors``: safetensors + JSON, no pickle; an old
            ``explain_state.pt`` is refused, see ``python -m explaind_tl.safe_format migrate``).
        trust_remote_code: with ``trajectory`` given as a path: passed to
            :meth:`Trajectory.load` (import the loss function / model factory its manifest names
            even when they are not explaind_tl's). Only for run directories you trust.
        fast_forward: evaluate the model with the read-out forward (:mod:`explaind_tl.readout`:
            only what reaches the metric's position is computed) when it is a supported
            HookedTransformer and the metric a built-in one, for gradients and certificate alike.
            It is compared with TransformerLens's own forward in float64 on the queries before
            use (switched off, with a warning, if they differ) and at the window's ends and every
            checkpoint inside it (``RuntimeError`` if they differ);
            ``meta["readout_error"]`` is the largest relative difference seen. ``False``:
            TransformerLens's forward throughout.
        train_grads: how the train axis gets ``<Ã_s, ∇ℓ(x_i; w_s)>``: ``"jvp"`` (forward-mode
            derivatives of the per-example losses, one pass per row and component, no
            per-example gradients), ``"per_example"`` (``vmap`` per-example gradients,
            contracted), or ``"auto"``: ``"jvp"`` when rows x components <= 12.
        query_grads: how per-query rows (``"query"`` in ``by``, realized clock) get their
            entries: ``"jvp"`` (forward-mode derivatives along each update vector restricted to
            each component: one pass per (source, component), all queries and outputs at once,
            no per-query gradient vectors), ``"grad"`` (per-query gradients, then inner
            products), or ``"auto"``: ``"jvp"`` when sources x components <= 64.
        strict: raise :class:`~explaind_tl.errors.CertificateError` (it carries the result as
            ``.attribution``) instead of warning when the certificate fails.

    Returns:
        :class:`explaind_tl.Attribution` with ``values`` ``[*dims]`` (``"component"`` first when
        present), labelled ``coords`` and the ``completeness`` certificate. ``meta`` records the
        settings, the number of ReLU kinks cut and ``replay_mismatch``: the largest difference
        between a replayed segment's end and its stored checkpoint inside the window (0 for an
        exactly replayable run; anything else shows up as residual at the checkpoint steps).

    Raises:
        TypeError, ValueError, QueryError: a bad argument (before any work).
        TrajectoryError: ``trajectory`` is a path that is not a valid run directory.
        CertificateError: ``strict=True`` and some step (or the total) missed its bound.

    Warns:
        CertificateWarning: some step (or the total) missed its bound (``strict=False``): how
            many, the worst residual and its bound, and what to try. The result's
            ``completeness.ok`` is False and ``completeness.failed_steps`` lists them.
    """
    from .attribution import Attribution, Completeness

    t_start = time.perf_counter()
    # ------------------------------------------------ arguments, before any work
    if isinstance(by, str):
        by = (by,)
    elif isinstance(by, (list, tuple)):
        by = tuple(by)
    else:
        raise TypeError(f"by must be an axis name or a list/tuple of them, got {type(by).__name__}")
    not_str = [d for d in by if not isinstance(d, str)]
    if not_str:
        raise TypeError(f"by entries must be axis names (str), got {not_str}")
    unknown = [d for d in by if d not in AXES]
    if unknown:
        raise ValueError(f"unknown axes {unknown}; choose from {AXES}")
    if len(set(by)) != len(by):
        raise ValueError(f"repeated axes in by={by}")
    if "train" in by and "source" in by:
        raise ValueError("by='train' already carries the source split (pseudo-entries); drop 'source'")
    if not (isinstance(metric, str) or callable(metric)):
        raise TypeError(f"metric must be a metric name or a callable, got {type(metric).__name__}")
    if components is not None and not isinstance(components, str):
        from .components import ComponentMap

        if not isinstance(components, ComponentMap):
            raise TypeError(
                f"components must be None, a granularity name or a ComponentMap, got {type(components).__name__}"
            )
    if isinstance(components, str):
        from .components import GRANULARITIES

        if components not in GRANULARITIES:
            raise ValueError(f"unknown component granularity {components!r}; choose from {GRANULARITIES}")
    _check_choice("train_grads", train_grads, tuple(TRAIN_GRADS))
    _check_choice("query_grads", query_grads, tuple(QUERY_GRADS))
    _check_choice("reduce", reduce, ("sum", "mean"))
    tol = _check_tol(tol)
    nodes = _check_int("nodes", nodes, minimum=1)
    max_nodes = _check_int("max_nodes", max_nodes, minimum=1)
    if max_nodes < nodes:
        raise ValueError(f"need 1 <= nodes <= max_nodes, got nodes={nodes}, max_nodes={max_nodes}")
    if steps is not None:
        if not isinstance(steps, (tuple, list)) or len(steps) != 2:
            raise TypeError(f"steps must be a pair (a, b) of ints, got {steps!r}")
        steps = (_check_int("steps[0]", steps[0]), _check_int("steps[1]", steps[1]))
    if step_bins is not None:
        step_bins = _check_int("step_bins", step_bins, minimum=1)
        if "step" not in by:
            raise ValueError(f"step_bins={step_bins} bins the step axis, but 'step' is not in by={by}")
    position = _check_int("position", position)
    if kink_aware != "auto" and not isinstance(kink_aware, bool):
        raise TypeError(f"kink_aware must be True, False or 'auto', got {kink_aware!r}")
    if dtype is not None:
        dtype = _check_dtype(dtype)
    if device is not None:
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
        try:
            torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"invalid device {device!r}: {err}") from err
    if query_chunk is not None:
        query_chunk = _check_int("query_chunk", query_chunk, minimum=1)
    train_chunk = _check_int("train_chunk", train_chunk, minimum=1)
    for name, flag in (("progress", progress), ("fast_forward", fast_forward), ("adaptive_nodes", adaptive_nodes),
                       ("strict", strict), ("trust_remote_code", trust_remote_code)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if resume_dir is not None and not isinstance(resume_dir, (str, os.PathLike)):
        raise TypeError(f"resume_dir must be a path, got {type(resume_dir).__name__}")
    trajectory = _as_trajectory(trajectory, trust_remote_code)

    T = trajectory.num_steps
    a, b = (0, T) if steps is None else steps
    if not 0 <= a < b <= T:
        raise ValueError(f"steps window must satisfy 0 <= a < b <= {T}, got {(a, b)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model = trajectory.model()
    if dtype is None:
        dtype = next(model.parameters()).dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"the trajectory's parameters are {dtype}; the certificate needs float32 or float64 "
                "gradients: pass dtype=torch.float32 or torch.float64"
            )
    metric_fn, needs_label = resolve_metric(metric, position)
    batch = normalize_queries(queries, model, needs_label, position=None if callable(metric) else position)

    cmap = None
    if "component" in by:
        from .components import ComponentMap

        if components is None:
            components = "parameter"
        cmap = components if isinstance(components, ComponentMap) else ComponentMap.from_model(
            model, components, param_names=list(trajectory.param_names)
        )
    elif components is not None and not isinstance(components, str):
        cmap = None  # summed anyway

    n_query = int(next(iter(batch.values())).shape[0])
    # probe the metric's output width on one query
    probe_qf_vals = _probe_outputs(model, metric_fn, batch)
    n_output = probe_qf_vals
    clock = "seen" if "train" in by else "realized"
    if "train" in by:
        x_labels: list[Any] = list(range(trajectory.num_train)) + list(PSEUDO)
    elif "source" in by:
        x_labels = list(SOURCES)
    else:
        x_labels = [None]
    width = step_bins if (step_bins is not None and "step" in by) else None
    n_bins = 1 if "step" not in by else (math.ceil((b - a) / width) if width else b - a)
    if "step" in by and width is None:
        width = 1
    weights = torch.full((n_query,), 1.0 / n_query if reduce == "mean" else 1.0, dtype=torch.float64)
    plan = _Plan(
        by=by,
        resolve_query="query" in by,
        resolve_output="output" in by,
        n_query=n_query,
        n_output=n_output,
        weights=weights,
        window=(a, b),
        bin_width=width,
        n_bins=n_bins,
        component_labels=list(cmap.labels) if cmap is not None else None,
        x_labels=x_labels,
        clock=clock,
    )
    kink = (kink_aware == "auto") or bool(kink_aware)
    n_tangents = len(x_labels) * (len(cmap.labels) if cmap is not None else 1)
    directional = clock == "realized" and plan.resolve_query and n_tangents <= QUERY_GRADS[query_grads]
    if query_chunk is None:
        query_chunk = 4096 if not plan.resolve_query else 256
        if plan.resolve_query and not directional:
            # per-query gradients of a chunk ([queries, outputs, P], working dtype) within ~256 MB
            n_params = sum(p.numel() for n, p in model.named_parameters() if n in set(trajectory.param_names))
            per_query = plan.rows_per_query * n_params * torch.finfo(dtype).bits // 8
            query_chunk = max(1, min(256, (256 << 20) // per_query))
    engine = _Engine(
        trajectory, batch, metric_fn, plan, cmap, dtype, device, tol, nodes, max_nodes, kink, query_chunk, train_chunk,
        position=None if callable(metric) else position, fast_forward=fast_forward, jvp_tangents=TRAIN_GRADS[train_grads],
        directional=directional, adaptive_nodes=adaptive_nodes,
    )
    acc = torch.zeros(n_bins, plan.n_rows, engine.n_comp, len(x_labels), dtype=torch.float64)
    resume = None
    if resume_dir is not None:
        config = {
            "metric": getattr(metric_fn, "__name__", str(metric)),
            "by": by,
            "components": cmap.labels if cmap is not None else None,
            "reduce": reduce,
            "tol": tol,
            "window": (a, b),
            "bins": width,
            "nodes": nodes,
            "max_nodes": max_nodes,
            "dtype": str(dtype),
            "position": position,
        }
        resume = _Resume(Path(resume_dir), _fingerprint(trajectory, batch, config))
    # with a background replay (one thread, as recorded) the engine keeps the other cores
    n_threads = torch.get_num_threads()
    with torch_threads(n_threads - 1 if engine.prefetch else None):
        if clock == "seen":
            engine.run_seen(progress, acc, resume)
        else:
            engine.run_realized(progress, acc, resume)

    # ----------------------------------------------------------- assemble result
    measured = plan.rows(engine.ends[b]) - plan.rows(engine.ends[a])
    steps_sorted = list(range(a, b))
    step_measured = torch.stack([engine.step_measured[s] for s in steps_sorted])
    step_attr = torch.stack([engine.step_attributed[s] for s in steps_sorted])
    attributed_rows = acc.sum(dim=(0, 2, 3))
    update_res = 0.0
    if "update_residual" in x_labels:
        update_res = float(acc[..., x_labels.index("update_residual")].sum())
    step_bound = total_bound = None
    if all(s in engine.step_bound for s in steps_sorted):  # absent only for old resume states
        step_bound = torch.stack([engine.step_bound[s] for s in steps_sorted])
        total_bound = step_bound.sum(0) + _assembly_allowance(acc, step_measured, plan, engine.ends[a], engine.ends[b])
    completeness = Completeness(
        measured=measured,
        attributed=attributed_rows,
        step_measured=step_measured,
        step_residual=step_measured - step_attr,
        nodes=torch.tensor([engine.nodes_used[s] for s in steps_sorted]),
        refined_steps=int(sum(engine.nodes_used[s] > nodes for s in steps_sorted)),
        update_residual=update_res,
        tol=tol,
        step_bound=step_bound,
        total_bound=total_bound,
        steps=torch.tensor(steps_sorted, dtype=torch.long),
    )
    values, dims, coords = _assemble(acc, plan, trajectory)
    meta = {
        "metric": getattr(metric_fn, "__name__", str(metric)),
        "reduce": reduce if not plan.resolve_query else None,
        "window": [a, b],
        "clock": clock,
        "step_bins": width,
        "tol": tol,
        "nodes": nodes,
        "max_nodes": max_nodes,
        "adaptive_nodes": adaptive_nodes,
        "kink_aware": engine.kink_aware,
        "forward": "readout" if engine.qf.readout is not None else "model",
        "query_grads": ("jvp" if directional else "grad") if plan.resolve_query and clock == "realized" else None,
        "train_grads": ("jvp" if engine.train_jvp else "per_example") if clock == "seen" else None,
        "readout_error": engine.readout_error,
        "kinks": int(sum(engine.kinks_seen.values())),
        "replay_mismatch": max((d for c, d in trajectory.replay_mismatch.items() if a < c <= b), default=0.0),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "optimizer": trajectory.optimizer_spec.to_dict(),
        "seconds": time.perf_counter() - t_start,
        "run_dir": str(trajectory.run_dir),
    }
    attr = Attribution(values=values, dims=dims, coords=coords, completeness=completeness, meta=meta)
    if completeness.ok is False:
        kinks_off = not engine.kink_aware and engine.qf.has_kinks
        message = _certificate_message(completeness, dtype, max_nodes, kinks_off)
        if strict:
            raise CertificateError(message, attr)
        warnings.warn(message, CertificateWarning, stacklevel=2)
    return attr


def _check_int(name: str, x: Any, minimum: int | None = None) -> int:
    """``x`` as an ``int`` (Python or NumPy/torch integer; not bool, not float)."""
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got a bool ({x!r})")
    try:
        v = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__} ({x!r})") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol must be a float, got {type(tol).__name__} ({tol!r})")
    tol = float(tol)
    if not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be finite and > 0, got {tol!r} (it bounds every step's relative residual)")
    return tol


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_dtype(dtype: Any) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"dtype={dtype} is not supported: the certificate needs float32 or float64 gradients "
            "(half precision leaves percent-level residuals per step)"
        )
    return dtype


def _as_trajectory(trajectory: Any, trust_remote_code: bool = False):
    """A :class:`Trajectory`, loading it when given its run directory."""
    if isinstance(trajectory, (str, os.PathLike)):
        from .trajectory import Trajectory

        return Trajectory.load(trajectory, trust_remote_code=trust_remote_code)
    missing = [k for k in ("num_steps", "param_names", "model", "segments") if not hasattr(trajectory, k)]
    if missing:
        raise TypeError(
            f"trajectory must be a Trajectory or a run directory path, got {type(trajectory).__name__}"
        )
    return trajectory


def _assembly_allowance(
    acc: Tensor, step_measured: Float[Tensor, "step row"], plan: _Plan, end_a: Tensor, end_b: Tensor
) -> Float[Tensor, " row"]:
    """Float64 rounding allowed between the total residual and the sum of the step residuals.

    Both sides add the same quantities in float64 in different orders (the ends' rows vs the
    steps' chunked rows; the entries vs the steps' inner products, through the optimizer
    algebra on the seen clock). Allowance: ``64 * eps64 * (S + 1) * M`` per row, with ``M`` the
    largest magnitude summed: the absolute entries of the row, its step changes and its
    metric values at the window's ends.
    """
    eps = torch.finfo(torch.float64).eps
    S = step_measured.shape[0]
    entries = acc.abs().sum(dim=(0, 2, 3))  # [R]
    ends = plan.rows(end_a.abs().cpu()) + plan.rows(end_b.abs().cpu())
    scale = entries + step_measured.abs().sum(0) + ends
    return 64.0 * eps * (S + 1) * scale


def _certificate_message(c, dtype: torch.dtype, max_nodes: int, kinks_off: bool) -> str:
    """What failed and what to try, for the warning and the strict error."""
    failed = c.failed_steps or []
    w = c.worst()
    parts = [
        f"completeness certificate failed: {len(failed)} of {len(c.steps)} steps have a residual above "
        f"their bound (tol={c.tol:.3g})"
    ]
    if failed and w is not None:
        parts.append(
            f"worst: step {w['step']}, |residual| {w['residual']:.3g} > bound {w['bound']:.3g} "
            f"({w['ratio']:.3g}x); failed steps {failed[:10]}{' ...' if len(failed) > 10 else ''}"
        )
    if not c.total_ok:
        r = int(torch.argmax(c.residual.abs() / c.total_bound.clamp_min(1e-300)))
        parts.append(
            f"the total residual {float(c.residual[r].abs()):.3g} exceeds its bound {float(c.total_bound[r]):.3g}"
        )
    # a failed step that could not double its nodes hit the cap; one below it stopped because
    # refinement no longer improved it (rounding in the working dtype, or an integrand the
    # quadrature does not resolve), where more nodes do not help
    at_failed = c.nodes[~c.step_ok].tolist() if failed else []
    capped = [n for n in at_failed if 2 * n > max_nodes]
    hints = []
    if capped or not at_failed:
        hints.append(f"a larger max_nodes (now {max_nodes})")
    if len(capped) < len(at_failed):
        parts.append(
            f"{len(at_failed) - len(capped)} failed step(s) stopped refining below max_nodes because more "
            "nodes no longer reduced the residual"
        )
    if dtype != torch.float64:
        hints.append("dtype=torch.float64")
    if kinks_off:
        hints.append("kink_aware='auto' (this model has ReLUs)")
    hints.append("a looser tol")
    parts.append("try " + ", ".join(hints) + "; see attr.completeness.failed_steps")
    return "; ".join(parts)


def _probe_outputs(model, metric_fn, batch) -> int:
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


def _assemble(acc: Tensor, plan: _Plan, trajectory) -> tuple[Tensor, tuple[str, ...], dict[str, list]]:
    """``acc [bin, row, component, x]`` -> values with dims in the user's order (component first)."""
    nb, _, nc, nx = acc.shape
    q = plan.n_query if plan.resolve_query else 1
    o = plan.rows_per_query
    full = acc.reshape(nb, q, o, nc, nx)
    internal = ["step", "query", "output", "component", "x"]
    x_dim = "train" if plan.clock == "seen" else ("source" if "source" in plan.by else None)
    keep = {
        "step": "step" in plan.by,
        "query": plan.resolve_query,
        "output": plan.resolve_output,
        "component": "component" in plan.by,
        "x": x_dim is not None,
    }
    for i in reversed(range(len(internal))):
        if not keep[internal[i]]:
            full = full.sum(i)
    kept = [d for d in internal if keep[d]]
    names = [x_dim if d == "x" else d for d in kept]
    order = (["component"] if "component" in names else []) + [d for d in plan.by if d != "component"]
    order = [d for d in order if d in names]
    values = (full.permute(*[names.index(d) for d in order]) if order else full).contiguous()
    a, _ = plan.window
    coords: dict[str, list] = {}
    for d in order:
        if d == "step":
            coords[d] = [a + i * (plan.bin_width or 1) for i in range(nb)]
        elif d == "component":
            coords[d] = list(plan.component_labels)
        elif d in ("source", "train"):
            coords[d] = list(plan.x_labels)
        elif d == "query":
            coords[d] = list(range(plan.n_query))
        elif d == "output":
            coords[d] = list(range(plan.n_output))
    return values, tuple(order), coords


__all__ = ["explain", "normalize_queries", "AXES", "SOURCES", "PSEUDO"]
