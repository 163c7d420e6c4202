"""The quadrature's pure functions against closed forms and numpy (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close_scaled

from explaind_tl.quadrature import gauss_legendre, kink_pieces, kink_points, lagrange_integrals


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_gauss_legendre_is_exact_up_to_degree_2n_minus_1(n):
    t, w = gauss_legendre(n)
    # nodes and weights come from an eigenvalue solve (LAPACK): exact to rounding relative to the
    # sum of |terms| (here <= 1); 1e-14 is ~45 ulps, a wrong node or weight is off by >1e-3
    assert_close_scaled(w.sum(), 1.0, 1e-14, scale=float(w.abs().sum()))
    for degree in range(2 * n):
        assert_close_scaled((w * t**degree).sum(), 1.0 / (degree + 1), 1e-14, scale=float((w * t**degree).abs().sum()))
    # and not beyond: degree 2n is integrated with an error
    assert abs(float((w * t ** (2 * n)).sum()) - 1.0 / (2 * n + 1)) > 1e-6


def test_kink_points_find_the_interpolant_roots():
    g = np.random.default_rng(0)
    t_nodes, _ = gauss_legendre(2)
    t = torch.cat([torch.zeros(1, dtype=torch.float64), t_nodes, torch.ones(1, dtype=torch.float64)])
    # cubic pre-activations with one known root in (0, 1) each: z(t) = (t - r) (a + b t + c t^2)
    roots = g.uniform(0.02, 0.98, size=(3, 5))
    coef = g.uniform(0.5, 1.5, size=(3, 5, 3)) * np.where(g.random((3, 5, 1)) < 0.5, -1.0, 1.0)
    tt = t.numpy()[None, :, None]
    z = (tt - roots[:, None, :]) * (coef[:, None, :, 0] + coef[:, None, :, 1] * tt * 0.1 + coef[:, None, :, 2] * tt**2 * 0.1)
    q, u, t_star, on = kink_points(t, torch.from_numpy(z))
    assert len(q) == 15  # every unit of every query switches once
    # roots in (0, 1): bisection + regula falsi converge to rounding relative to the unit interval
    assert_close_scaled(t_star, roots[q.numpy(), u.numpy()], 1e-13, scale=1.0)
    z_end = torch.from_numpy(z[:, -1, :])
    assert torch.equal(on, z_end[q, u] > 0)


def test_kink_pieces_integrate_piecewise_polynomials_exactly():
    """Two pieces of one query and one of another: the weights integrate each piece exactly."""
    n = 3
    t, _ = gauss_legendre(n)
    g = torch.Generator().manual_seed(1)
    # query 0 has kinks at 0.3 (unit 4 on) and 0.7 (unit 9 off); query 1 at 0.55 (unit 2 on)
    q = torch.tensor([0, 0, 1])
    u = torch.tensor([4, 9, 2])
    t_star = torch.tensor([0.3, 0.7, 0.55], dtype=torch.float64)
    on = torch.tensor([True, False, True])
    kp = kink_pieces(t, q, u, t_star, on)
    assert kp.query.tolist() == [0, 0, 0, 1, 1]
    bounds = [(0.0, 0.3), (0.3, 0.7), (0.7, 1.0), (0.0, 0.55), (0.55, 1.0)]
    for row, (lo, hi) in enumerate(bounds):
        c = torch.randn(n, generator=g, dtype=torch.float64)  # a polynomial of degree n - 1 per piece
        values = sum(c[k] * t**k for k in range(n))
        exact = sum(float(c[k]) * (hi ** (k + 1) - lo ** (k + 1)) / (k + 1) for k in range(n))
        assert_close_scaled((kp.weights[row] * values).sum(), exact, 1e-14, scale=float((kp.weights[row] * values).abs().sum()))
    # forced states: every kinked unit of a query is forced in each of its pieces, consistently
    forced = {(int(r), int(v)): bool(o) for r, v, o in zip(kp.force_row, kp.force_unit, kp.force_on)}
    assert forced == {
        (0, 4): False, (0, 9): True, (1, 4): True, (1, 9): True, (2, 4): True, (2, 9): False,
        (3, 2): False, (4, 2): True,
    }


def test_lagrange_integrals_sum_to_interval_length():
    t, _ = gauss_legendre(4)
    lo = torch.tensor([0.0, 0.2, 0.9], dtype=torch.float64)
    hi = torch.tensor([1.0, 0.5, 0.95], dtype=torch.float64)
    L = lagrange_integrals(t, lo, hi)
    assert_close_scaled(L.sum(1), hi - lo, 1e-14, scale=float(L.abs().sum(1).max()))


def test_residual_tolerance_measurement_floor():
    """The float64 forwards' rounding floor (logit scale) joins the bound; without it, as before."""
    from explaind_tl.quadrature import MEASUREMENT_ROUNDING, residual_tolerance

    eps64 = torch.finfo(torch.float64).eps
    measured = torch.tensor([1e-13, 2.0], dtype=torch.float64)
    magnitude = torch.tensor([1e-13, 2.0], dtype=torch.float64)
    scale = torch.tensor([40.0, 40.0], dtype=torch.float64)
    plain = residual_tolerance(measured, magnitude, 1e-6, eps64)
    torch.testing.assert_close(plain, 1e-6 * measured + 16 * eps64 * magnitude, rtol=1e-15, atol=0)
    floored = residual_tolerance(measured, magnitude, 1e-6, eps64, scale)
    floor = MEASUREMENT_ROUNDING * eps64 * scale
    torch.testing.assert_close(floored - plain, floor, rtol=1e-12, atol=0)
    # a residual of a few eps64 x |logits| passes a near-zero step only through the floor
    residual = torch.tensor([4 * eps64 * 40.0, 0.0], dtype=torch.float64)
    assert bool(residual[0] > plain[0]) and bool(residual[0] <= floored[0])
    # ... and one above the floor still fails
    assert bool(2 * floor[0] > floored[0])
