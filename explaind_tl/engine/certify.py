"""The certified, kink-aware quadrature of one step (docs/design.md §1).

For step ``s`` the test-side feature map ``φ_s = ∫_0^1 ∇q(w_s + tΔ_s) dt`` is approximated by
Gauss–Legendre nodes shared by a chunk of queries (:meth:`Certifier.phi`). The certificate is
measured alongside: ``q(w_{s+1}) - q(w_s)`` by two float64 forward passes against the attributed
``<φ̂_s, Δ_s>``, compared with :func:`explaind_tl.quadrature.residual_tolerance`; a chunk that
misses it gets more nodes, until ``max_nodes`` or until refinement has settled or stalled. On
ReLU models the queries whose activation pattern changes inside the step are integrated piecewise
with the pattern forced per piece (:func:`explaind_tl.quadrature.kink_pieces`).

The step ``s`` is an argument of every method; :class:`Certifier` keeps only the per-step
results (nodes used, measured and attributed changes, bounds, kinks) and the node counts the next
step of each chunk starts with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from explaind_tl.contraction import dot_and_magnitude
from explaind_tl.engine.options import ExplainOptions
from explaind_tl.engine.plan import take
from explaind_tl.engine.setup import Setup
from explaind_tl.model import is_hooked_transformer
from explaind_tl.model.functional import KINK_MASK, KINK_ON, Params
from explaind_tl.quadrature import (
    gauss_legendre,
    kink_brackets,
    kink_pieces,
    kink_points,
    polish_roots,
    residual_tolerance,
)

# adaptive refinement also stops once doubling the nodes changes every failing row's attributed
# total by less than this fraction of its residual (the quadrature has converged; the rest is
# rounding in the working dtype)
SETTLED = 0.1
# ... or once two doublings in a row shrink the worst residual/bound ratio by less than this factor
STALLED = 0.7
# a step whose worst residual is below this fraction of its bound lets the next start with fewer nodes
COMFORTABLE = 0.1


# The node controller (adaptive_nodes) restarts at every step that is a multiple of this: a sweep
# split into step ranges cut at such steps (explaind_tl.engine.distributed) then makes exactly
# the node choices of one sweep over the whole window.
RESTART_EVERY = 16


# a Jacobian call pads its queries to its largest piece count: at most this many times the
# pieces it really evaluates (queries sorted by piece count split where padding would exceed it)
PAD_WASTE = 4.0


@dataclass
class _Chunk:
    """What one query chunk of :meth:`Certifier.phi` hands back: its accepted rows (``part``), its
    certificate records, the nodes it ended with, the kinks it found, whether it was recomputed
    in float64, and its fused contractions (``dots``, when asked for)."""

    part: Tensor
    measured: Tensor
    attributed: Tensor
    bound: Tensor
    nodes: int
    kinks: int
    float64: bool
    dots: Tensor | None


def jacobian_calls(counts: Tensor, cap: int, waste: float = PAD_WASTE) -> list[Tensor]:
    """Queries (indices into ``counts``, ascending within a call) for each per-query Jacobian call.

    Args:
        counts: ``[Q]`` pieces per query (>= 1; a query with kinks has one per smooth piece).
        cap: most queries one call holds (its Jacobians' memory).
        waste: most padded pieces per real piece in a call (a call evaluates
            ``len(call) * max(counts[call])`` pieces for ``sum(counts[call])`` real ones).

    Returns:
        The calls, covering every query once: all of them in one call when that fits, else runs
        of the queries sorted by piece count, each closed before it would break ``waste`` or an
        even share of ``cap`` (``ceil(n / ceil(n / cap))`` queries: 20 queries under a cap of 14
        go as 10 + 10, not 14 + 6, the same number of calls with the peak of the smaller).
    """
    n = len(counts)
    if n <= cap and int(counts.max()) * n <= waste * int(counts.sum()):
        return [torch.arange(n)]
    n_calls = -(-n // cap)  # ceil: the fewest calls the cap allows
    cap = -(-n // n_calls)  # and an even share of the queries for each
    calls, cur, real = [], [], 0
    for q in torch.argsort(counts, stable=True).tolist():
        c = int(counts[q])  # the largest so far in this run
        if cur and (len(cur) >= cap or c * (len(cur) + 1) > waste * (real + c)):
            calls.append(torch.tensor(sorted(cur)))
            cur, real = [], 0
        cur.append(q)
        real += c
    calls.append(torch.tensor(sorted(cur)))
    return calls


class Certifier:
    """``φ̂_s`` of each step, refined against its certificate, and the certificate's records.

    Args:
        ctx: the shared state of the call.
        options: ``tol``, ``nodes``, ``max_nodes`` and ``adaptive_nodes`` are used.
    """

    def __init__(self, ctx: Setup, options: ExplainOptions) -> None:
        self.ctx = ctx
        self.tol = options.tol
        self.nodes = options.nodes
        self.max_nodes = options.max_nodes
        self.adaptive_nodes = options.adaptive_nodes
        self.start_nodes: dict[int, int] = {}  # query chunk -> nodes its next step starts with
        self.cooldown: dict[int, tuple[int, int]] = {}  # query chunk -> (steps to wait, next wait)
        self.nodes_used: dict[int, int] = {}
        self.kinks_seen: dict[int, int] = {}
        self.ends: dict[int, Tensor] = {}
        self.n_units = 0
        self.step_measured: dict[int, Tensor] = {}
        self.step_attributed: dict[int, Tensor] = {}
        # per step, the bound its residual was compared against ([rows], summed over chunks)
        self.step_bound: dict[int, Tensor] = {}
        # steps with a chunk recomputed in float64 after missing the certificate in float32
        self.float64_steps: dict[int, bool] = {}

    def endpoint(self, params: Params, step: int | None = None, measured: tuple | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        """Metric values ``[Q, O]`` (float64), ReLU pre-activations and each query's largest logit
        magnitude ``[Q]`` (the certificate's measurement floor) at a trajectory point.

        Values at the window's ends are kept (``self.ends``) for the total certificate.
        ``measured``: what :meth:`measure` returned for ``params`` (computed elsewhere, e.g. on
        the replay thread), used instead of measuring again.
        """
        out = self._endpoint(params) if measured is None else measured
        if step is not None and step in self.ctx.plan.window:
            self.ends[step] = out[0]
        if step is not None and (step in self.ctx.plan.window or step in self.ctx.checkpoints) and self.ctx.qf.readout is not None:
            # the read-out forward measures the certificate: compare it with TransformerLens on
            # every query at the window's ends and at every checkpoint inside it
            p = self.ctx.to_cert(params)
            for idx in self.ctx.chunks():
                err = self.ctx.qf.check_readout(self.ctx.batch["tokens"][idx], p, strict=True)
                self.ctx.note_readout_error(err)
        return out

    def measures_in_background(self) -> bool:
        """Whether :meth:`measure` may run on another thread while this one takes gradients: the
        float64 forwards then use objects of their own (the certificate's model copy, or its
        read-out forward, distinct from the working-dtype ones). The read-out forward is a pure
        function of the parameters passed to it; its checks against TransformerLens at
        checkpoints (this thread) only read the certificate's model, through
        ``functional_call``, which the background read-out forward never touches."""
        qf = self.ctx.qf
        return qf.cert_model is not qf.model and (qf.readout is None or qf.cert_readout is not qf.readout)

    def measure(self, params: Params) -> tuple[Tensor, Tensor | None, Tensor]:
        """The certificate's forwards at ``params`` (no bookkeeping; see :meth:`endpoint`)."""
        return self._endpoint(params)

    def _endpoint(self, params: Params) -> tuple[Tensor, Tensor | None, Tensor]:
        p = self.ctx.to_cert(params)
        vals, pre, scale = [], [], []
        for idx in self.ctx.chunks():
            sub = take(self.ctx.batch, idx)
            if self.ctx.kink_aware:
                v, z = self.ctx.qf.values_and_preacts(p, sub, scale=scale)
                # only the units that can reach the metric are ever inspected for kinks
                pre.append((z[:, self.ctx.unit_filter.to(z.device)] if self.ctx.unit_filter is not None else z).cpu())
            else:
                v = self.ctx.qf.values(p, sub, scale=scale)
            vals.append(v)
        vals = torch.cat(vals).to(torch.float64)
        return vals, (torch.cat(pre) if pre else None), torch.cat(scale).to(vals.device, torch.float64)

    # ------------------------------------------------------------- quadrature
    def _kinks(self, w: Params, delta: Params, idx: Tensor, t_nodes: Tensor, z0: Tensor, z1: Tensor, scan_all: bool,
               qf=None):
        """Sign changes of the chunk's relevant ReLU pre-activations, sampled at 0, the nodes and 1.

        Only queries with a sign change between the segment's ends are sampled at the nodes,
        unless ``scan_all`` (used when the certificate asks for refinement, to catch units that
        switch twice inside the segment). ``qf``: the query function to sample with (default:
        the working dtype's).
        """
        qf = qf or self.ctx.qf
        idx = idx.cpu()
        a, b = (z0, z1) if len(idx) == len(z0) else (z0[idx], z1[idx])  # relevant units only (endpoint)
        cand = torch.arange(len(idx)) if scan_all else torch.nonzero(((a * b) < 0).any(1)).reshape(-1)
        empty = torch.zeros(0, dtype=torch.long)
        if len(cand) == 0:
            return empty, empty, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
        sub = take(self.ctx.batch, idx[cand].to(self.ctx.device))
        inner = []
        for tj in t_nodes.tolist():
            p = {k: w[k] + tj * delta[k] for k in self.ctx.names}
            zj = qf.values_and_preacts(p, sub, cert=False)[1].to(torch.float64).cpu()
            inner.append(zj[:, self.ctx.unit_filter] if self.ctx.unit_filter is not None else zj)
        z = torch.stack([a[cand], *inner, b[cand]], dim=1)  # [q, m, U']
        t = torch.cat([torch.zeros(1, dtype=torch.float64), t_nodes, torch.ones(1, dtype=torch.float64)])
        q, u, ts, on = kink_points(t, z)
        u_sampled = u
        if self.ctx.unit_filter is not None:
            u = self.ctx.unit_index[u]
        if len(q) and qf.path_preacts is not None:
            ts = self._deep_kinks(w, delta, idx[cand], t, z, q, u_sampled, u, ts, qf)
        return idx[cand][q], u, ts, on

    def _force_deep_units(self, mask: Tensor, val: Tensor, first_row: int, queries: Tensor, z0: Tensor) -> None:
        """Force every relevant unit after the first MLP layer in the rows of kinked queries to
        its state at ``t = 0`` (the pieces' own switching units are forced over it afterwards).

        A piece's integrand is evaluated at the shared nodes over all of ``[0, 1]`` with the
        piece's pattern forced on the switching units (:func:`kink_pieces`). With one MLP layer
        nothing else can switch there. With more, forcing an earlier unit outside its own piece
        moves the later layers' pre-activations, so a later unit that never switches on the
        true path may switch on the forced one and put a kink into that integrand: so every
        later unit is forced to the state it keeps along the true path (pieces of a kinked query
        only; ``z0``: ``[Q, U']`` relevant pre-activations at ``t = 0``).
        """
        if not self._multilayer_relu() or "tokens" not in self.ctx.batch:
            return
        full = self.ctx.unit_index.cpu() if self.ctx.unit_index is not None else torch.arange(z0.shape[1])
        deep_f = torch.nonzero(self._after_first_layer(full)).reshape(-1)
        if len(deep_f) == 0:
            return
        rows = first_row + torch.arange(len(queries))
        cols = full[deep_f]
        mask[rows[:, None], cols[None, :]] = True
        val[rows[:, None], cols[None, :]] = z0[queries.cpu()][:, deep_f] > 0

    def _multilayer_relu(self) -> bool:
        """Whether the model is a HookedTransformer with ReLU MLPs in more than one layer (its
        units are laid out ``[layer, pos, d_mlp]``)."""
        return is_hooked_transformer(self.ctx.qf.model) and len(self.ctx.qf.hook_names) > 1

    def _after_first_layer(self, units: Tensor) -> Tensor:
        """Which units (flattened ``[layer, pos, d_mlp]`` indices) lie after the first MLP layer."""
        return units // (int(self.ctx.batch["tokens"].shape[1]) * self.ctx.qf.model.cfg.d_mlp) >= 1

    def _deep_kinks(self, w: Params, delta: Params, queries: Tensor, t: Tensor, z: Tensor, q: Tensor, u_sampled: Tensor,
                    u: Tensor, ts: Tensor, qf) -> Tensor:
        """Kink locations of units after the first MLP layer, on the true function.

        A first-layer pre-activation is smooth along the segment, so the interpolant of its
        samples locates its root to the quadrature's accuracy (:func:`kink_points`). A later
        layer's pre-activation is itself kinked wherever an earlier unit switches, and its
        interpolant converges slowly: those roots are found by :func:`polish_roots` on the
        pre-activation itself (one read-out forward per iteration over those kinks), inside the
        sample bracket where the sign changed, starting from the interpolant's root.
        """
        deep = torch.nonzero(self._after_first_layer(u)).reshape(-1)
        if len(deep) == 0:
            return ts
        q_b, k_b, u_b = kink_brackets(z)
        assert torch.equal(q_b, q) and torch.equal(u_b, u_sampled)  # the same kinks, in the same order
        qd, kd, ud, uf = q[deep], k_b[deep], u_sampled[deep], u[deep]
        tokens = self.ctx.batch["tokens"][queries[qd].to(self.ctx.device)]
        dev = self.ctx.device

        def f(x: Tensor, rows: Tensor) -> Tensor:
            zx = qf.preacts_along(w, delta, tokens[rows.to(dev)], x.to(dev))
            return zx[torch.arange(len(rows), device=dev), uf[rows].to(dev)].to(torch.float64).cpu()

        # the bracket need not shrink below what the working dtype resolves of the pre-activation
        xtol = 4 * torch.finfo(qf.dtype).eps
        roots = polish_roots(f, t[kd], t[kd + 1], z[qd, kd, ud], z[qd, kd + 1, ud], ts[deep], xtol=xtol)
        out = ts.clone()
        out[deep] = roots
        return out

    def _phi_chunk(
        self,
        w: Params,
        delta: Params,
        idx: Tensor,
        n: int,
        ends: tuple[Tensor, Tensor] | None,
        tangents: Params | None = None,
        out: Tensor | None = None,
        qf=None,
    ) -> tuple[Float[Tensor, "row param_or_tangent"], int]:
        """``φ̂`` for the rows of one query chunk with ``n`` shared Gauss–Legendre nodes, and the
        number of (query, unit) kinks found inside the segment
        (``qf``: the query function, default the working dtype's; ``w``, ``delta`` and
        ``tangents`` in its dtype).

        Queries whose ReLUs switch inside the segment are expanded into one row per smooth piece,
        with the activation pattern forced and the piece's weights (:func:`kink_pieces`). With
        ``tangents`` (dict of ``[T, *shape]``; per-query rows only) the result is ``<φ̂, t>`` for
        each tangent, ``[rows, T]``, from forward-mode derivatives instead of gradients.

        Without tangents the rows are written into ``out`` (``[rows, P]``, any float dtype,
        overwritten) when given: the sweeps keep ``φ̂`` in a preallocated working-dtype buffer,
        and the nodes are summed into it in that dtype (what the certificate's rounding
        allowance ``16 eps Σ|φ̂ Δ|`` covers).
        """
        plan = self.ctx.plan
        qf = qf or self.ctx.qf
        t_nodes, w_nodes = gauss_legendre(n)
        idx_cpu = idx.cpu()
        rows_q, weights, force, n_kinks = idx_cpu, w_nodes[None, :].expand(len(idx_cpu), n), None, 0
        if ends is not None:
            q, u, ts, on = self._kinks(w, delta, idx, t_nodes, *ends, scan_all=n > self.nodes, qf=qf)
            n_kinks = len(q)
            if len(q):
                self.n_units = len(self.ctx.unit_filter) if self.ctx.unit_filter is not None else ends[0].shape[1]
                kp = kink_pieces(t_nodes, q, u, ts, on)
                smooth = idx_cpu[~torch.isin(idx_cpu, kp.query)]
                rows_q = torch.cat([smooth, kp.query])
                weights = torch.cat([w_nodes[None, :].expand(len(smooth), n), kp.weights])
                mask = torch.zeros(len(rows_q), self.n_units, dtype=torch.bool)
                val = torch.zeros(len(rows_q), self.n_units, dtype=torch.bool)
                self._force_deep_units(mask, val, len(smooth), kp.query, ends[0])
                mask[len(smooth) + kp.force_row, kp.force_unit] = True
                val[len(smooth) + kp.force_row, kp.force_unit] = kp.force_on
                force = (mask.to(self.ctx.device), val.to(self.ctx.device))
        pos = torch.searchsorted(idx_cpu, rows_q)  # each row's query, local to the chunk
        sub = take(self.ctx.batch, rows_q.to(self.ctx.device))
        if force is not None:
            sub = {**sub, KINK_MASK: force[0], KINK_ON: force[1]}
        n_rows = (len(idx) if plan.resolve_query else 1) * plan.rows_per_query
        width = self.ctx.layout.numel if tangents is None else next(iter(tangents.values())).shape[0]
        if out is not None and tangents is None:
            phi = out if plan.resolve_query else out.zero_()  # per-query rows: every row is written
        else:
            phi = torch.zeros(n_rows, width, dtype=torch.float64, device=self.ctx.device)
        o = plan.rows_per_query
        if tangents is None and plan.resolve_query:
            self._per_query_jacobians(qf, w, delta, t_nodes, pos, weights, sub, phi.view(len(idx), o, phi.shape[1]))
            return phi, n_kinks
        if tangents is None:  # aggregated rows: the node-weighted gradient of the weighted query sum
            rw = (plan.weights[rows_q][:, None] * weights).to(self.ctx.device)
            g = qf.aggregate_quadrature(w, delta, t_nodes.tolist(), rw, sub, plan.resolve_output)  # [O', *]
            phi += self.ctx.layout.flatten(g, lead=1, dtype=phi.dtype)
            return phi, n_kinks
        for j, tj in enumerate(t_nodes.tolist()):
            p = {k: w[k] + tj * delta[k] for k in self.ctx.names}
            d = qf.per_query_directional(p, sub, tangents, plan.resolve_output)  # [T, rows, O']
            d = d.to(torch.float64) * weights[:, j].to(self.ctx.device, torch.float64)[None, :, None]
            per_q = torch.zeros(d.shape[0], len(idx), o, dtype=torch.float64, device=self.ctx.device)
            per_q.index_add_(1, pos.to(self.ctx.device), d)
            phi += per_q.reshape(d.shape[0], -1).T
        return phi, n_kinks

    def _per_query_jacobians(self, qf, w: Params, delta: Params, t_nodes: Tensor, pos: Tensor, weights: Tensor,
                             sub: dict[str, Tensor], grid: Float[Tensor, "query output param"]) -> None:
        """Each query's rows of ``φ̂`` (``grid[i]``, layout order): one Jacobian per query of the
        node- and piece-weighted metric, so a kinked query's pieces are summed inside the backward
        and the Jacobians held are ``[queries, outputs, P]``, never one block per piece.

        ``pos``, ``weights`` and ``sub`` describe the rows (pieces): each row's query, its node
        weights and its batch entries. Queries go in calls of at most ``jacobian_mb`` of
        Jacobians (:func:`jacobian_calls`), each padded to its largest piece count with pieces
        of weight 0, and written into ``grid`` as they are formed (by index where a call's
        queries are not consecutive).
        """
        counts = torch.bincount(pos, minlength=grid.shape[0])
        rows_of = torch.argsort(pos, stable=True)  # rows grouped by query
        first = torch.cumsum(counts, 0) - counts
        per_query = grid.shape[1] * self.ctx.layout.numel * torch.finfo(qf.dtype).bits // 8
        cap = max(1, int(self.ctx.options.jacobian_mb * 2**20) // per_query)
        dev, t_list = self.ctx.device, t_nodes.tolist()
        for qs in jacobian_calls(counts, cap):
            c = counts[qs][:, None]
            slot = torch.arange(int(c.max()))[None, :]
            table = rows_of[first[qs][:, None] + torch.minimum(slot, c - 1)]  # [q, pieces]: padded with a real row
            wts = torch.where((slot < c)[..., None], weights[table], 0.0).to(dev)
            rows = table.to(dev)
            # consecutive queries are written into their rows' view, others by index (index_copy_
            # into the whole grid as each parameter's Jacobians are formed)
            run = int(qs[-1]) - int(qs[0]) == len(qs) - 1
            block, index = (grid[int(qs[0]) : int(qs[-1]) + 1], None) if run else (grid, qs.to(grid.device))
            out = {name: block[:, :, sl].unflatten(2, self.ctx.layout_shapes[name]) for name, sl in self.ctx.layout.slices.items()}
            qf.per_query_quadrature(w, delta, t_list, wts, {k: v[rows] for k, v in sub.items()}, self.ctx.plan.resolve_output,
                                    out, index)

    def phi(
        self,
        s: int,
        w_s: Params,
        w_next: Params,
        q0: tuple[Tensor, Tensor | None],
        q1: tuple[Tensor, Tensor | None],
        vectors: Tensor | None = None,
        out: Tensor | None = None,
        on_phi: Tensor | None = None,
        sink: Callable[[slice, Tensor], None] | None = None,
    ) -> Float[Tensor, "row param_or_vector"] | tuple[Float[Tensor, "row param"] | None, Float[Tensor, "row component k"]]:
        """``φ̂_s`` for all rows, refined against the certificate; records nodes, measured and
        attributed change and the bound the residual was compared against (``step_bound``: the
        last :func:`residual_tolerance` of each chunk, summed over chunks; a chunk that stops
        refining at ``max_nodes`` or when refinement settles or stalls keeps its failing bound).

        With ``vectors`` (``[T, P]`` float64 whose sum is ``Δ_s``), returns ``<φ̂_s, v>`` for each
        instead, ``[rows, T]``, from forward-mode derivatives (per-query rows). The certificate's
        rounding allowance then uses ``Σ_v |<φ̂_s, v>|`` for ``Σ_p |φ̂_p Δ_p|``.

        Without ``vectors``, ``φ̂_s`` is written into ``out`` (``[rows, P]``, overwritten; default:
        a new float64 matrix) in ``out``'s dtype; the certificate's ``<φ̂_s, Δ_s>`` and
        ``Σ_p |φ̂_p Δ_p|`` are float64 sums of its entries (:func:`~explaind_tl.contraction.dot_and_magnitude`).

        With ``on_phi`` (``[P, K]`` float64, layout order; no ``vectors``, and component blocks
        without a permutation), returns ``(φ̂_s, dots)`` with ``dots [rows, C, K]`` the
        per-component float64 contractions of the accepted ``φ̂_s`` with each column, computed
        in the certificate's own pass over ``φ̂_s`` (one float64 conversion for both).

        With ``sink`` (per-query rows, no ``vectors``), ``out`` is a scratch buffer of at least
        one chunk's rows: each chunk's accepted rows are computed there and handed to
        ``sink(rows, φ̂_rows)`` before the next chunk overwrites them, so ``φ̂_s`` is never held
        whole; the returned ``φ̂_s`` is then ``None``.
        """
        plan = self.ctx.plan
        blocks = self.ctx.blocks
        if on_phi is not None and (vectors is not None or blocks.perm is not None):
            raise ValueError("on_phi needs feature rows (no vectors) and component blocks without a permutation")
        if sink is not None and (vectors is not None or out is None or not plan.resolve_query):
            raise ValueError("sink needs per-query feature rows (no vectors) and a scratch buffer (out)")
        if s % RESTART_EVERY == 0:  # the node controller starts afresh (see RESTART_EVERY)
            self.start_nodes.clear()
            self.cooldown.clear()
        w = self.ctx.to_work(w_s)
        delta64 = {k: w_next[k].to(self.ctx.device, torch.float64) - w_s[k].to(self.ctx.device, torch.float64) for k in self.ctx.names}
        delta = {k: v.to(self.ctx.dtype) for k, v in delta64.items()}
        dflat = self.ctx.layout.flatten(delta64)
        ends = (q0[1], q1[1]) if (self.ctx.kink_aware and q0[1] is not None) else None
        tangents = None if vectors is None else self.ctx.layout.unflatten(vectors.to(self.ctx.device, self.ctx.dtype))
        width = self.ctx.layout.numel if vectors is None else vectors.shape[0]
        if vectors is None and out is not None:
            phi = out
            if not plan.resolve_query:
                phi.zero_()
        else:
            phi = torch.zeros(plan.n_rows, width, dtype=torch.float64, device=self.ctx.device)
        # per-query rows of a chunk are written in place; aggregated rows are summed over chunks
        in_place = vectors is None and plan.resolve_query
        measured = torch.zeros(plan.n_rows, dtype=torch.float64)
        attributed = torch.zeros(plan.n_rows, dtype=torch.float64)
        bounds = torch.zeros(plan.n_rows, dtype=torch.float64)
        dots = None if on_phi is None else torch.zeros(plan.n_rows, blocks.n_comp, on_phi.shape[1], dtype=torch.float64,
                                                       device=self.ctx.device)
        fused = () if on_phi is None else (blocks, on_phi)
        n_max, kinks = 0, 0
        for idx in self.ctx.chunks():
            rs = self.ctx.row_slice(idx)
            # per-query rows are written in place: into φ̂'s own rows, or with a sink into the scratch
            target = (phi[: rs.stop - rs.start] if sink is not None else phi[rs]) if in_place else None
            c = self._certified_chunk(idx, w, w_s, delta, delta64, dflat, ends, tangents, vectors, target, fused, q0, q1)
            n_max, kinks = max(n_max, c.nodes), kinks + c.kinks
            if c.float64:
                self.float64_steps[s] = True
            if not in_place:
                phi[rs] += c.part
            elif sink is not None:
                sink(rs, c.part)
            if dots is not None:
                dots[rs] += c.dots
            measured[rs] += c.measured.cpu()
            attributed[rs] += c.attributed.cpu()
            bounds[rs] += c.bound.cpu()
        self.kinks_seen[s] = kinks
        self.nodes_used[s] = n_max
        self.step_measured[s] = measured
        self.step_attributed[s] = attributed
        self.step_bound[s] = bounds
        if sink is not None:
            phi = None
        return phi if dots is None else (phi, dots)

    def _certified_chunk(self, idx: Tensor, w: Params, w_s: Params, delta: Params, delta64: Params, dflat: Tensor,
                         ends, tangents: Params | None, vectors: Tensor | None, target: Tensor | None, fused: tuple,
                         q0: tuple, q1: tuple) -> _Chunk:
        """One query chunk of :meth:`phi`: its ``φ̂`` rows (into ``target`` when given), refined
        until they meet the certificate or refinement stops, and the chunk's certificate records
        (the chunk's node controller is ``start_nodes``/``cooldown`` under its first query).
        """
        plan = self.ctx.plan
        meas = plan.rows(q1[0][idx], idx) - plan.rows(q0[0][idx], idx)
        # rounding floor of the float64 forwards that measured it: logit scale at both ends
        sc = (q0[2][idx] + q1[2][idx])[:, None].expand(len(idx), q0[0].shape[1])
        floor = plan.rows(sc, idx)
        n0 = n = self.start_nodes.get(int(idx[0]), self.nodes)
        att_prev, worst_prev, stalls = None, math.inf, 0
        float64 = False
        while True:
            part, kinks = self._phi_chunk(w, delta, idx, n, ends, tangents, out=target)
            if tangents is None:
                att, mag, *part_dots = dot_and_magnitude(part, dflat, *fused)
            else:
                (att, mag), part_dots = (part.sum(1), part.abs().sum(1)), []
            res = (meas - att).abs()
            bound = residual_tolerance(meas, mag, self.tol, self.ctx.eps, floor)
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
        if bool(failing.any()) and self.ctx.dtype != torch.float64:
            # What is left may be rounding inside the working dtype's gradients (float32
            # gradients of saturated log-probs cancel), which the rounding allowance, made for
            # rounding of φ̂'s entries, does not cover: the chunk once more in float64, with
            # the same nodes and pieces (the same kinks, found again), stored where the float32 one was.
            part, att, mag, *part_dots = self._phi_float64(w_s, delta64, idx, n, ends, vectors, target, dflat, fused)
            res = (meas - att).abs()
            bound = residual_tolerance(meas, mag, self.tol, self.ctx.eps, floor)
            float64 = True
        if self.adaptive_nodes:
            margin = float((res / bound.clamp_min(torch.finfo(torch.float64).tiny)).max())
            self._adapt_start(int(idx[0]), n0, n, margin)
        return _Chunk(part, meas, att, bound, n, kinks, float64, part_dots[0] if part_dots else None)

    def _phi_float64(self, w_s: Params, delta64: Params, idx: Tensor, n: int, ends, vectors: Tensor | None,
                     out: Tensor | None, dflat: Tensor, fused: tuple = ()) -> tuple[Tensor, ...]:
        """One chunk's ``φ̂`` (or ``<φ̂, v>``) recomputed with the float64 query function, and its
        attributed change and rounding scale (with ``fused = (blocks, on_phi)``, also its
        contractions with ``on_phi``; see :meth:`phi`)."""
        qf64 = self.ctx.float64_query_function()
        w64 = {k: w_s[k].to(self.ctx.device, torch.float64) for k in self.ctx.names}
        tan64 = None if vectors is None else self.ctx.layout.unflatten(vectors.to(self.ctx.device, torch.float64))
        part, _ = self._phi_chunk(w64, delta64, idx, n, ends, tan64, out=out, qf=qf64)  # the same kinks, found again
        if tan64 is None:
            return (part, *dot_and_magnitude(part, dflat, *fused))
        return part, part.sum(1), part.abs().sum(1)

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

    def snapshot(self) -> dict:
        """The bookkeeping so far, for a resume state."""
        return {
            "nodes_used": dict(self.nodes_used),
            "step_measured": dict(self.step_measured),
            "step_attributed": dict(self.step_attributed),
            "step_bound": dict(self.step_bound),
            "ends": dict(self.ends),
            "kinks_seen": dict(self.kinks_seen),
            "float64_steps": dict(self.float64_steps),
        }

    def restore(self, state: dict) -> None:
        """Continue from :meth:`snapshot` (of a resume state)."""
        self.nodes_used = dict(state["nodes_used"])
        self.step_measured = dict(state["step_measured"])
        self.step_attributed = dict(state["step_attributed"])
        # partial states written before bounds were recorded: those steps' verdict is unknown
        self.step_bound = dict(state.get("step_bound", {}))
        self.ends = dict(state["ends"])
        self.kinks_seen = dict(state["kinks_seen"])
        self.float64_steps = dict(state.get("float64_steps", {}))
