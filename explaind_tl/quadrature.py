"""Quadrature along one optimizer step: Gauss–Legendre nodes, kink-aware pieces, the certificate.

The test-side feature map of step ``s`` is ``φ_s = ∫_0^1 ∇q(w_s + tΔ_s) dt`` (docs/design.md §1). On a
smooth model a few Gauss–Legendre nodes reach machine precision. On a ReLU model the integrand
jumps wherever a neuron's pre-activation changes sign along the segment, so the kinks are located
(from the pre-activations at both ends of the segment) and each smooth piece is integrated with
its activation pattern forced, at the same shared Gauss–Legendre nodes (:func:`kink_pieces`). Everything here is a pure function of tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@functools.lru_cache(maxsize=64)
def _leggauss(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x, w = np.polynomial.legendre.leggauss(n)
    return tuple(((x + 1.0) / 2.0).tolist()), tuple((w / 2.0).tolist())


def gauss_legendre(n: int) -> tuple[Float[Tensor, "node"], Float[Tensor, "node"]]:
    """Gauss–Legendre nodes and weights on ``[0, 1]`` (float64).

    Args:
        n: number of nodes (``n = 1`` is the midpoint rule).

    Returns:
        ``(t, w)``, each ``[n]``; ``w`` sums to 1 and integrates polynomials of degree ``2n - 1``
        exactly.
    """
    if n < 1:
        raise ValueError(f"need at least one quadrature node, got {n}")
    t, w = _leggauss(int(n))
    return torch.tensor(t, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)


def kink_brackets(z: Float[Tensor, "query sample unit"]) -> tuple[Int[Tensor, "kink"], Int[Tensor, "kink"], Int[Tensor, "kink"]]:
    """``(query_index, sample_index, unit_index)`` of every sign change of ``z`` between samples
    ``k`` and ``k + 1``, in the order :func:`kink_points` returns its kinks."""
    flip = (z[:, :-1, :] * z[:, 1:, :]) < 0  # [Q, m-1, U]
    return torch.nonzero(flip, as_tuple=True)


def polish_roots(
    f: Callable[[Float[Tensor, "active"], Int[Tensor, "active"]], Float[Tensor, "active"]],
    lo: Float[Tensor, "kink"],
    hi: Float[Tensor, "kink"],
    f_lo: Float[Tensor, "kink"],
    f_hi: Float[Tensor, "kink"],
    guess: Float[Tensor, "kink"],
    xtol: float = 4 * float(np.finfo(np.float64).eps),
    iterations: int = 40,
) -> Float[Tensor, "kink"]:
    """Roots of ``K`` scalar functions inside brackets ``[lo, hi]`` with ``f_lo * f_hi < 0``, by
    the Illinois variant of regula falsi from ``guess``.

    ``f(x, rows)`` evaluates the functions ``rows`` at the points ``x`` (one each, all at once).
    Each iteration evaluates the entries not yet converged once and keeps a bracket around a
    sign change, so it converges for any continuous function, superlinearly where it is smooth
    near the root, and tolerates kinks inside the bracket (a deeper ReLU's pre-activation is
    kinked wherever an earlier layer's units switch). An entry stops when its bracket is
    narrower than ``xtol * max(1, |hi|)`` (the resolution its function is evaluated at) or a
    zero is hit.

    Returns:
        ``[K]`` float64 roots: an exact zero where one was hit, else the end of the final
        bracket with the smaller ``|f|``.
    """
    lo, hi = lo.to(torch.float64).clone(), hi.to(torch.float64).clone()
    f_lo, f_hi = f_lo.to(torch.float64).clone(), f_hi.to(torch.float64).clone()
    g_lo, g_hi = f_lo.clone(), f_hi.clone()  # Illinois-scaled end values
    x = guess.to(torch.float64).clamp(min=lo, max=hi)
    last = torch.zeros(len(lo), dtype=torch.int8)  # which end moved last: -1 lo, +1 hi
    found = torch.zeros(len(lo), dtype=torch.bool)
    act = torch.arange(len(lo))
    for _ in range(iterations):
        if len(act) == 0:
            break
        xa = x[act]
        fx = f(xa, act).to(torch.float64)
        zero = fx == 0
        left = ((f_lo[act] * fx) < 0) & ~zero  # the sign change is in [lo, x]: x becomes hi
        right = ~left & ~zero
        # Illinois: an end that stays twice in a row has its value halved
        la = last[act]
        g_lo[act] = torch.where(left & (la == 1), 0.5 * g_lo[act], g_lo[act])
        g_hi[act] = torch.where(right & (la == -1), 0.5 * g_hi[act], g_hi[act])
        hi[act] = torch.where(left | zero, xa, hi[act])
        lo[act] = torch.where(right | zero, xa, lo[act])
        f_hi[act], g_hi[act] = torch.where(left, fx, f_hi[act]), torch.where(left, fx, g_hi[act])
        f_lo[act], g_lo[act] = torch.where(right, fx, f_lo[act]), torch.where(right, fx, g_lo[act])
        last[act] = torch.where(left, 1, torch.where(right, -1, la)).to(torch.int8)
        found[act] = found[act] | zero
        width = hi[act] - lo[act]
        act = act[~((width <= xtol * hi[act].abs().clamp_min(1.0)) | found[act])]
        w = hi[act] - lo[act]
        x[act] = (hi[act] - g_hi[act] * w / (g_hi[act] - g_lo[act])).clamp(min=lo[act], max=hi[act])
    return torch.where(found, lo, torch.where(f_lo.abs() <= f_hi.abs(), lo, hi))


def kink_points(
    t: Float[Tensor, "sample"], z: Float[Tensor, "query sample unit"], iterations: int = 24, polish: int = 3
) -> tuple[Int[Tensor, "kink"], Int[Tensor, "kink"], Float[Tensor, "kink"], Bool[Tensor, "kink"]]:
    """Where ReLU pre-activations change sign along a segment.

    ``z`` holds every unit's pre-activation at sample points ``t`` (``0``, the quadrature nodes
    and ``1``). Each sign change between consecutive samples is one kink; its location is the
    root of the polynomial interpolating that unit's samples, found by bisection inside the
    bracketing interval, then polished by regula falsi steps inside the (by then tiny) bracket. The interpolant converges like the quadrature does, so the kink
    locations sharpen as the certificate asks for more nodes.

    Args:
        t: increasing sample points ``[m]`` in ``[0, 1]``.
        z: pre-activations ``[Q, m, U]`` (positions and neurons flattened into ``U``).
        iterations: bisection steps (24 shrink the bracket below 1e-7).
        polish: regula falsi steps after the bisection (each roughly squares the error of the
            smooth interpolant's root: float64 resolution after 2-3).

    Returns:
        ``(query_index, unit_index, t_star, turns_on)``, one entry per sign change;
        ``turns_on`` is True where the unit switches from off to on.
    """
    z = z.to(torch.float64)
    q_idx, k_idx, u_idx = kink_brackets(z)
    if len(q_idx) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    t = t.to(torch.float64)
    samples = z[q_idx, :, u_idx]  # [K, m]
    m = t.shape[0]
    # barycentric weights of the sample points
    diff = t[:, None] - t[None, :] + torch.eye(m, dtype=torch.float64)
    bary = 1.0 / diff.prod(dim=1)

    def interp(x: Tensor) -> Tensor:
        d = x[:, None] - t[None, :]
        exact = d == 0
        d = torch.where(exact, torch.ones_like(d), d)
        c = bary[None, :] / d
        val = (c * samples).sum(1) / c.sum(1)
        hit = exact.any(1)
        if bool(hit.any()):
            val = torch.where(hit, (samples * exact).sum(1), val)
        return val

    lo, hi = t[k_idx].clone(), t[k_idx + 1].clone()
    f_lo = samples.gather(1, k_idx[:, None])[:, 0]
    f_hi = samples.gather(1, (k_idx + 1)[:, None])[:, 0]
    for step in range(iterations + polish):
        if step < iterations:
            x = 0.5 * (lo + hi)
        else:  # regula falsi inside the bracket (its ends have opposite signs, f_hi != f_lo)
            x = (lo - f_lo * (hi - lo) / (f_hi - f_lo)).clamp(min=lo, max=hi)
        f_x = interp(x)
        left = (f_lo * f_x) <= 0
        hi, f_hi = torch.where(left, x, hi), torch.where(left, f_x, f_hi)
        lo, f_lo = torch.where(left, lo, x), torch.where(left, f_lo, f_x)
    turns_on = samples.gather(1, (k_idx + 1)[:, None])[:, 0] > 0
    return q_idx, u_idx, torch.where(f_lo.abs() <= f_hi.abs(), lo, hi), turns_on


def lagrange_integrals(
    t: Float[Tensor, "node"], lo: Float[Tensor, "kink"], hi: Float[Tensor, "kink"]
) -> Float[Tensor, "kink node"]:
    """``∫_lo^hi L_j(t) dt`` for the Lagrange basis polynomials ``L_j`` through the nodes ``t``.

    Computed exactly with an ``n``-node Gauss–Legendre rule on ``[lo, hi]`` (``L_j`` has degree
    ``n - 1``).
    """
    n = t.shape[0]
    tau, omega = gauss_legendre(n)
    x = lo[:, None] + (hi - lo)[:, None] * tau[None, :]  # [K, n] points on each interval
    basis = torch.ones(x.shape[0], n, n, dtype=torch.float64)  # [K, point, j]
    for j in range(n):
        for m in range(n):
            if m != j:
                basis[:, :, j] *= (x - t[m]) / (t[j] - t[m])
    return ((hi - lo)[:, None, None] * omega[None, :, None] * basis).sum(1)


@dataclass
class KinkPieces:
    """A segment cut at every ReLU sign change, one row per (query, smooth piece).

    Attributes:
        query: ``[M]`` query index of each row.
        weights: ``[M, n]`` quadrature weights of each row at the ``n`` shared nodes.
        force_row, force_unit: ``[F]`` (row, unit) pairs whose ReLU state is forced in that row.
        force_on: ``[F]`` the forced state (True: ``post = z``; False: ``post = 0``).
    """

    query: Tensor
    weights: Tensor
    force_row: Tensor
    force_unit: Tensor
    force_on: Tensor


def kink_pieces(
    t: Float[Tensor, "node"],
    q: Int[Tensor, "kink"],
    u: Int[Tensor, "kink"],
    t_star: Float[Tensor, "kink"],
    turns_on: Bool[Tensor, "kink"],
) -> KinkPieces:
    """Exact piecewise integration with shared nodes for queries whose ReLUs switch.

    Between two consecutive sign changes the activation pattern of a query is fixed, and the
    integrand ``∇q`` computed with that pattern *forced* is a smooth function on the whole of
    ``[0, 1]``. Its integral over the piece ``[lo, hi]`` is ``Σ_j A_j ∇q_forced(t_j)`` with
    ``A_j = ∫_lo^hi L_j`` (Lagrange basis through the shared Gauss–Legendre nodes ``t``), which
    converges like the Gauss rule does on smooth integrands. So every kinked query becomes
    ``k + 1`` rows of one batched forward/backward at the shared nodes, each row with its
    pattern forced on the switching units and its own weights; no per-query parameters.

    Args:
        t: shared nodes ``[n]`` on ``[0, 1]``.
        q, u, t_star, turns_on: the kinks, from :func:`kink_points` (a unit may switch more
            than once; its switches alternate, so every piece gets a consistent state).

    Returns:
        The rows of the kinked queries (queries without kinks are not included).
    """
    t_star = t_star.to(torch.float64).clamp(0.0, 1.0)
    order = torch.argsort(q.to(torch.float64) * 4.0 + t_star, stable=True)  # by query, then t*
    q, u, t_star, turns_on = q[order], u[order], t_star[order], turns_on[order]
    uq, k = torch.unique_consecutive(q, return_counts=True)  # kinks per kinked query
    n_pieces = k + 1
    row_start = torch.cumsum(n_pieces, 0) - n_pieces
    kink_start = torch.cumsum(k, 0) - k
    m_rows = int(n_pieces.sum())
    row_q = torch.repeat_interleave(uq, n_pieces)
    owner = torch.repeat_interleave(torch.arange(len(uq)), n_pieces)  # kinked-query id per row
    piece = torch.arange(m_rows) - row_start[owner]  # piece index within its query
    first = kink_start[owner]
    kq = k[owner]
    lo = torch.where(piece > 0, t_star[(first + piece - 1).clamp(min=0, max=len(t_star) - 1)], torch.zeros(m_rows, dtype=torch.float64))
    hi = torch.where(piece < kq, t_star[(first + piece).clamp(max=len(t_star) - 1)], torch.ones(m_rows, dtype=torch.float64))
    weights = lagrange_integrals(t, lo, hi)
    # forced states: each switching unit is forced in every piece of its query, by the kink that
    # governs that piece: the unit's last switch before the piece, or (before its first switch)
    # the opposite of its first switch. A unit that switches more than once therefore gets one
    # consistent state per piece (off-on-off, ...), never two.
    kink_owner = torch.repeat_interleave(torch.arange(len(uq)), k)  # kinked-query id per kink
    rank = torch.arange(len(q)) - kink_start[kink_owner]  # position of the kink in its query
    first_of_unit, last_piece = _unit_neighbours(kink_owner, u, rank, k[kink_owner])
    reps = n_pieces[kink_owner]
    f_kink = torch.repeat_interleave(torch.arange(len(q)), reps)
    f_piece = torch.arange(int(reps.sum())) - torch.repeat_interleave(torch.cumsum(reps, 0) - reps, reps)
    # kink i (rank r) governs the pieces r + 1 .. (the next switch of its unit), and pieces 0 .. r
    # too when it is its unit's first switch
    lo_piece = torch.where(first_of_unit, 0, rank + 1)[f_kink]
    keep = (f_piece >= lo_piece) & (f_piece <= last_piece[f_kink])
    f_kink, f_piece = f_kink[keep], f_piece[keep]
    f_row = row_start[kink_owner[f_kink]] + f_piece
    after = f_piece > rank[f_kink]
    f_on = after == turns_on[f_kink]
    return KinkPieces(query=row_q, weights=weights, force_row=f_row, force_unit=u[f_kink], force_on=f_on)


def _unit_neighbours(
    owner: Int[Tensor, "kink"], unit: Int[Tensor, "kink"], rank: Int[Tensor, "kink"], n_kinks: Int[Tensor, "kink"]
) -> tuple[Bool[Tensor, "kink"], Int[Tensor, "kink"]]:
    """For kinks sorted by (query, t*): whether each is its unit's first switch in its query, and
    the last piece it governs (the rank of the unit's next switch, or the query's last piece)."""
    key = (owner * (int(unit.max()) + 1) + unit) * (int(rank.max()) + 1) + rank
    order = torch.argsort(key)
    so, su = owner[order], unit[order]
    same_prev = torch.zeros(len(order), dtype=torch.bool)
    same_prev[1:] = (so[1:] == so[:-1]) & (su[1:] == su[:-1])
    first = torch.empty_like(same_prev)
    first[order] = ~same_prev
    nxt = n_kinks[order].clone()  # pieces of a query with k kinks are 0..k
    same_next = same_prev[1:]
    nxt[:-1] = torch.where(same_next, rank[order][1:], nxt[:-1])
    last = torch.empty_like(nxt)
    last[order] = nxt
    return first, last


# the float64 forward measures q(w_{s+1}) - q(w_s) with an absolute rounding error of a few
# float64 epsilons times the size of the logits it is read from (log-softmax, logit differences):
# a residual below MEASUREMENT_ROUNDING * eps64 * (scale at both ends) is below what it can see
MEASUREMENT_ROUNDING = 8.0


def residual_tolerance(
    measured: Float[Tensor, "row"],
    magnitude: Float[Tensor, "row"],
    tol: float,
    eps: float,
    value_scale: Float[Tensor, "row"] | None = None,
) -> Float[Tensor, "row"]:
    """The per-row bound a step's certificate residual must meet (docs/design.md §1).

    ``|r| <= tol * |measured change| + 16 * eps * magnitude + 8 * eps64 * value_scale`` where
    ``magnitude`` is the sum of absolute products ``Σ_p |φ_p Δ_p|`` (the floating-point noise
    floor of the inner product computed in the working dtype, whose machine epsilon is ``eps``)
    and ``value_scale`` is the largest logit magnitude at the step's two ends (summed over the
    row's queries and outputs): the rounding floor of the float64 forwards that measure the
    change. Without it (``None``) only the first two terms apply.
    """
    bound = tol * measured.abs() + 16.0 * eps * magnitude
    if value_scale is not None:
        bound = bound + MEASUREMENT_ROUNDING * torch.finfo(torch.float64).eps * value_scale.to(bound)
    return bound
