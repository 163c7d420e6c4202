"""explaind_tl.contraction: per-component contractions against float64 oracles."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled

from explaind_tl import contraction
from explaind_tl.contraction import Blocks, dot_and_magnitude


def _oracle_dots(M: torch.Tensor, V: torch.Tensor, index: torch.Tensor, n_comp: int) -> torch.Tensor:
    """[R, C, K] by a plain loop over components, in float64, layout order."""
    M64, V64 = M.to(torch.float64), V.to(torch.float64)
    out = torch.zeros(M.shape[0], n_comp, V.shape[1], dtype=torch.float64)
    for c in range(n_comp):
        sel = index == c
        out[:, c] = M64[:, sel] @ V64[sel]
    return out


@pytest.mark.parametrize("kind", ["runs", "interleaved", "single"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dots_and_gram_match_oracle(kind, dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    P, R, K, B, C = 301, 7, 3, 5, 4
    if kind == "runs":  # heads-like: a few contiguous runs per component
        index = torch.cat([torch.full((n,), c) for c, n in [(0, 50), (1, 60), (0, 40), (2, 70), (3, 81)]])
    elif kind == "interleaved":  # neurons-like: one run per coordinate
        index = torch.arange(P) % C
    else:
        index, C = None, 1
    # small chunks, so the row chunking and the buffer reuse are exercised
    monkeypatch.setattr(contraction, "CHUNK_BYTES", 8 * 64)
    blocks = Blocks.from_index(index, P, C)
    assert (blocks.perm is not None) == (kind == "interleaved")
    M = torch.randn(R, P, generator=g, dtype=torch.float64).to(dtype)
    V = torch.randn(P, K, generator=g, dtype=torch.float64)
    Gm = torch.randn(B, P, generator=g, dtype=torch.float64).to(dtype)
    idx = index if index is not None else torch.zeros(P, dtype=torch.long)
    want = _oracle_dots(M, V, idx, C)
    got = blocks.dots(blocks.sort(M), blocks.sort(V.T).T)
    assert got.dtype == torch.float64 and got.shape == (R, C, K)
    # float64 sums of M's own entries, whatever M's dtype: a float32 GEMV would miss this by ~1e-7
    assert_close_scaled(got, want, k=1e-12)
    want_g = _oracle_dots(M, Gm.T, idx, C)
    got_g = blocks.gram(blocks.sort(M), blocks.sort(Gm))
    assert_close_scaled(got_g, want_g, k=1e-12 if dtype == torch.float64 else 1e-5)


def test_sort_unsort_roundtrip():
    P, C = 40, 3
    index = torch.arange(P) % C
    blocks = Blocks.from_index(index, P, C)
    v = torch.randn(2, P, dtype=torch.float64)
    assert torch.equal(blocks.unsort(blocks.sort(v)), v)
    sorted_idx = blocks.sort(index[None].double())[0]
    assert torch.all(sorted_idx[1:] >= sorted_idx[:-1])  # components contiguous after sorting


def test_from_index_refuses_wrong_length():
    with pytest.raises(ValueError, match="expected 10"):
        Blocks.from_index(torch.zeros(9, dtype=torch.long), 10, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dot_and_magnitude_matches_oracle(dtype, monkeypatch):
    monkeypatch.setattr(contraction, "CHUNK_BYTES", 8 * 100)
    g = torch.Generator().manual_seed(1)
    M = torch.randn(13, 57, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(57, generator=g, dtype=torch.float64)
    att, mag = dot_and_magnitude(M, v)
    M64 = M.to(torch.float64)
    assert_close_scaled(att, M64 @ v, k=1e-13)
    assert_close_scaled(mag, M64.abs() @ v.abs(), k=1e-13)
    assert bool((mag >= att.abs()).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dot_and_magnitude_with_vectors_matches_blocks_dots(dtype, monkeypatch):
    """The certificate's pass with the sweep's vectors: the same per-component float64 dots as
    the oracle, from row chunks smaller than the matrix; refused for permuted blocks, whose
    columns are not in the matrix's order."""
    monkeypatch.setattr(contraction, "CHUNK_BYTES", 8 * 150)
    g = torch.Generator().manual_seed(2)
    P, R, K, C = 120, 9, 3, 3
    index = torch.cat([torch.full((n,), c) for c, n in [(0, 30), (1, 50), (0, 10), (2, 30)]])
    blocks = Blocks.from_index(index, P, C)
    assert blocks.perm is None
    M = torch.randn(R, P, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(P, generator=g, dtype=torch.float64)
    V = torch.randn(P, K, generator=g, dtype=torch.float64)
    att, mag, dots = dot_and_magnitude(M, v, blocks, V)
    assert dots.shape == (R, C, K) and dots.dtype == torch.float64
    assert_close_scaled(dots, _oracle_dots(M, V, index, C), k=1e-13)
    att0, mag0 = dot_and_magnitude(M, v)
    assert torch.equal(att, att0) and torch.equal(mag, mag0)
    interleaved = Blocks.from_index(torch.arange(P) % C, P, C)
    assert interleaved.perm is not None
    with pytest.raises(ValueError, match="without a permutation"):
        dot_and_magnitude(M, v, interleaved, V)


@pytest.mark.parametrize("kind", ["runs", "single"])
def test_gram_pieces_equals_gram_of_the_concatenation(kind):
    """Per-parameter pieces of G (cut where no block boundary falls, and across blocks) give the
    gram of the whole G; refused for permuted blocks."""
    g = torch.Generator().manual_seed(4)
    P, R, B, C = 150, 6, 5, 3
    index = torch.cat([torch.full((n,), c) for c, n in [(0, 40), (1, 35), (2, 45), (0, 30)]]) if kind == "runs" else None
    blocks = Blocks.from_index(index, P, C if index is not None else 1)
    M = torch.randn(R, P, generator=g)
    G = torch.randn(B, P, generator=g)
    cuts = [0, 7, 40, 41, 100, 150]
    pieces = [(a, G[:, a:b].clone()) for a, b in zip(cuts[:-1], cuts[1:])]
    assert_close_scaled(blocks.gram_pieces(M, pieces), blocks.gram(M, G), k=1e-6)
    with pytest.raises(ValueError, match="without a permutation"):
        Blocks.from_index(torch.arange(P) % C, P, C).gram_pieces(M, pieces)
