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
