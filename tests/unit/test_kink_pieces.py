"""Forced activation states of :func:`kink_pieces` when a unit switches more than once."""

from __future__ import annotations

import torch

from explaind_tl.quadrature import gauss_legendre, kink_pieces


def _forced(kp) -> dict[tuple[int, int], bool]:
    pairs = [(int(r), int(v)) for r, v in zip(kp.force_row, kp.force_unit)]
    assert len(pairs) == len(set(pairs)), "a (row, unit) pair is forced twice"
    return {p: bool(o) for p, o in zip(pairs, kp.force_on)}


def test_unit_switching_twice_gets_one_state_per_piece():
    """Unit 46 turns off at 0.2 and on again at 0.75; unit 15 turns off at 0.43, unit 20 on at 0.97.

    The true activation pattern per piece (oracle written out by hand): 46 is on, off, off, on, on;
    15 is on, on, off, off, off; 20 is off until the last piece.
    """
    t, _ = gauss_legendre(4)
    q = torch.tensor([0, 0, 0, 0])
    u = torch.tensor([46, 15, 46, 20])
    t_star = torch.tensor([0.2, 0.43, 0.75, 0.97], dtype=torch.float64)
    on = torch.tensor([False, False, True, True])
    kp = kink_pieces(t, q, u, t_star, on)
    assert kp.query.tolist() == [0] * 5
    want = {
        46: [True, False, False, True, True],
        15: [True, True, False, False, False],
        20: [False, False, False, False, True],
    }
    expected = {(row, unit): states[row] for unit, states in want.items() for row in range(5)}
    assert _forced(kp) == expected


def test_three_switches_of_one_unit_and_a_second_query():
    """off->on->off->on for one unit of query 1, shuffled input order, query 0 untouched."""
    t, _ = gauss_legendre(3)
    q = torch.tensor([1, 0, 1, 1])
    u = torch.tensor([7, 3, 7, 7])
    t_star = torch.tensor([0.9, 0.5, 0.1, 0.4], dtype=torch.float64)
    on = torch.tensor([True, True, True, False])  # unit 7: on at 0.1, off at 0.4, on at 0.9
    kp = kink_pieces(t, q, u, t_star, on)
    assert kp.query.tolist() == [0, 0, 1, 1, 1, 1]
    expected = {(0, 3): False, (1, 3): True}
    expected.update({(2 + p, 7): s for p, s in enumerate([False, True, False, True])})
    assert _forced(kp) == expected


def test_polish_roots_on_smooth_kinked_and_exact_zero_functions():
    """Illinois regula falsi inside sign-change brackets: roots of a smooth function, of one
    kinked inside its bracket (as a deeper ReLU's pre-activation is), and an exact zero."""
    from explaind_tl.quadrature import polish_roots

    funcs = [
        lambda x: torch.cos(3 * x) - x,  # smooth, root 0.39004...
        lambda x: 4 * torch.clamp(x - 0.3, min=0) + 0.2 * x - 0.1,  # kink at 0.3, root 1.3 / 4.2 right of it
        lambda x: x - 0.5,  # hit exactly at the guess
    ]
    calls = []

    def f(x, rows):
        calls.append(len(rows))
        return torch.stack([funcs[int(r)](xi) for xi, r in zip(x, rows)])

    lo = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    f_lo, f_hi = f(lo, torch.arange(3)), f(hi, torch.arange(3))
    assert bool((f_lo * f_hi < 0).all())
    calls.clear()
    roots = polish_roots(f, lo, hi, f_lo, f_hi, guess=torch.tensor([0.9, 0.05, 0.5], dtype=torch.float64))
    assert calls[0] == 3 and calls[1] == 2 and calls[-1] < 3  # converged entries are no longer evaluated
    # independent oracles: Newton's method, and the closed form
    import math

    r0 = 0.5
    for _ in range(200):
        r0 = r0 - (math.cos(3 * r0) - r0) / (-3 * math.sin(3 * r0) - 1)  # Newton to convergence
    r1 = (0.1 + 4 * 0.3) / 4.2  # 4(x - 0.3) + 0.2x = 0.1 on the right of the kink
    assert abs(float(roots[0]) - r0) <= 1e-14
    assert abs(float(roots[1]) - r1) <= 1e-14
    assert float(roots[2]) == 0.5
    # a wrong bracket end (no sign change) cannot be made into a root: the result stays inside
    # the bracket it was given
    r = polish_roots(lambda x, rows: x - 2.0, lo[:1], hi[:1], lo[:1] - 2.0, hi[:1] - 2.0, guess=hi[:1] / 2)
    assert 0.0 <= float(r) <= 1.0
    # a coarser resolution stops earlier, at a root that good
    coarse = polish_roots(f, lo, hi, f_lo, f_hi, guess=torch.tensor([0.9, 0.05, 0.5], dtype=torch.float64), xtol=1e-6)
    assert abs(float(coarse[1]) - r1) <= 1e-6


def test_jacobian_calls_cover_every_query_within_cap_and_padding():
    """Calls of per-query Jacobians: every query once, ascending within a call, at most ``cap``
    queries, padding bounded by ``waste``, and one call when everything fits."""
    from explaind_tl.engine.certify import jacobian_calls

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 40, (1,), generator=g))
        counts = 1 + torch.randint(0, 4, (n,), generator=g) * (torch.rand(n, generator=g) < 0.3)
        cap, waste = int(torch.randint(1, 12, (1,), generator=g)), 2.0
        calls = jacobian_calls(counts, cap, waste)
        assert sorted(torch.cat(calls).tolist()) == list(range(n))
        for c in calls:
            assert c.tolist() == sorted(c.tolist()) and len(c) <= cap
            padded, real = len(c) * int(counts[c].max()), int(counts[c].sum())
            assert len(c) == 1 or padded <= waste * real
    assert [c.tolist() for c in jacobian_calls(torch.tensor([1, 2, 1, 2]), 8)] == [[0, 1, 2, 3]]
    # one query with many pieces among many with one: padding them all would cost 5x, so it goes alone
    split = jacobian_calls(torch.tensor([1] * 19 + [9]), 64, 4.0)
    assert [c.tolist() for c in split] == [list(range(19)), [19]]
    # more queries than the cap: as many calls as the cap needs, of even sizes
    assert [len(c) for c in jacobian_calls(torch.ones(20, dtype=torch.long), 14)] == [10, 10]
    assert [len(c) for c in jacobian_calls(torch.ones(21, dtype=torch.long), 10)] == [7, 7, 7]
