"""Per-component contractions of ``[rows, P]`` feature maps, without ``[rows, P]`` temporaries.

The engine's large state is a handful of ``[rows, P]`` matrices (the feature map ``φ̂_s`` and
the adjoint ``Ã_s``, docs/design.md §4) kept in the working dtype. Everything it books is a
contraction of one of them with a flat vector or with a block of per-example gradients,
restricted to each component. :class:`Blocks` describes the component partition as contiguous
column blocks (after a permutation when the components interleave, e.g. MLP neurons), so that

* ``Blocks.dots(M, V)``: ``Σ_{p ∈ c} M[r, p] V[p, k]`` for every component ``c``, in float64
  (each block converted once, in row chunks of a few MB; float64 ``M`` is read as it is), and
* ``Blocks.gram(M, G)``: ``Σ_{p ∈ c} M[r, p] G[b, p]``, one GEMM per block in ``M``'s dtype,

are GEMVs and GEMMs on views, never products materialised as ``[rows, P]`` (the old
``reduce(phi * v)`` allocated one per call: 45 MB per vector per step on the issue-#10 workload).
Pure functions of tensors; the engine keeps its matrices in the sorted order for a whole sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

# bytes of float64 a block is converted in at a time (rows chunked to stay near the cache)
CHUNK_BYTES = 4 << 20
# with more contiguous runs than this per component the columns are permuted into blocks
MAX_RUNS_PER_COMPONENT = 8


@dataclass(frozen=True)
class Blocks:
    """The component partition of ``P`` flat coordinates as contiguous column blocks.

    Attributes:
        perm: ``None`` when the runs of the layout order are used as they are, else the
            permutation ``[P]`` (sorted order -> layout order) that makes components contiguous.
        starts, ends, comps: the blocks in the (sorted) order: columns ``starts[j]:ends[j]``
            belong to component ``comps[j]``.
        n_comp: number of components ``C``.
    """

    perm: Tensor | None
    inverse: Tensor | None
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    comps: tuple[int, ...]
    n_comp: int

    @staticmethod
    def from_index(flat_index: Int[Tensor, "param"] | None, numel: int, n_comp: int = 1) -> Blocks:
        """Blocks of a flat component index (``None``: one component over all ``numel`` coordinates).

        The layout order is kept when its runs of equal component are few (heads, parameters,
        blocks: a few runs per component); otherwise (neurons: one run per coordinate of
        ``W_in``) the columns are sorted by component, stably.
        """
        if flat_index is None:
            return Blocks(None, None, (0,), (numel,), (0,), 1)
        idx = flat_index.detach().cpu().long()
        if idx.numel() != numel:
            raise ValueError(f"component index has {idx.numel()} entries, expected {numel}")
        change = torch.nonzero(idx[1:] != idx[:-1]).reshape(-1) + 1
        n_runs = int(change.numel()) + 1
        perm = inverse = None
        if n_runs > MAX_RUNS_PER_COMPONENT * max(n_comp, 1):
            perm = torch.argsort(idx, stable=True)
            inverse = torch.argsort(perm)
            idx = idx[perm]
            change = torch.nonzero(idx[1:] != idx[:-1]).reshape(-1) + 1
        bounds = [0, *change.tolist(), numel]
        starts, ends = tuple(bounds[:-1]), tuple(bounds[1:])
        comps = tuple(int(idx[s]) for s in starts)
        dev = flat_index.device
        return Blocks(
            None if perm is None else perm.to(dev), None if inverse is None else inverse.to(dev),
            starts, ends, comps, n_comp,
        )

    # ------------------------------------------------------------------ order
    def sort(self, v: Float[Tensor, "... param"]) -> Float[Tensor, "... param"]:
        """``v`` (layout order, last axis) in the blocks' order (``v`` itself without a permutation)."""
        if self.perm is None:
            return v
        return v.index_select(-1, self.perm.to(v.device))

    def sort_into(self, v: Float[Tensor, "row param"], out: Float[Tensor, "row param"]) -> Tensor:
        """:meth:`sort` of a matrix into a preallocated ``out`` (``v`` itself without a permutation)."""
        if self.perm is None:
            return v
        return torch.index_select(v, 1, self.perm.to(v.device), out=out)

    def unsort(self, v: Float[Tensor, "... param"]) -> Float[Tensor, "... param"]:
        """Back to the layout order (inverse of :meth:`sort`)."""
        if self.inverse is None:
            return v
        return v.index_select(-1, self.inverse.to(v.device))

    # ------------------------------------------------------------- contractions
    def dots(self, M: Float[Tensor, "row param"], V: Float[Tensor, "param k"]) -> Float[Tensor, "row component k"]:
        """``out[r, c, k] = Σ_{p ∈ c} M[r, p] V[p, k]`` in float64 (both in the blocks' order).

        ``M`` may be float32: each block is copied into one float64 buffer of about
        :data:`CHUNK_BYTES`, a row chunk at a time, and contracted there (one GEMV per vector:
        BLAS GEMMs with a handful of columns are several times slower), so the sums carry no
        float32 rounding beyond ``M``'s own entries and no ``[rows, P]`` temporary is made.
        """
        R, K = M.shape[0], V.shape[1]
        V = V.to(M.device, torch.float64)
        cols = [V[:, k].contiguous() for k in range(K)]
        out = torch.zeros(K, self.n_comp, R, dtype=torch.float64, device=M.device)
        if M.dtype == torch.float64:  # read as it is
            self.dots_of_rows(M, cols, out)
            return out.permute(2, 1, 0)
        buf = None
        for s, e, c in zip(self.starts, self.ends, self.comps):
            rows = max(1, min(R, CHUNK_BYTES // (8 * max(e - s, 1))))
            if buf is None or buf.numel() < rows * (e - s):
                buf = torch.empty(rows * (e - s), dtype=torch.float64, device=M.device)
            for r0 in range(0, R, rows):
                m = M[r0 : r0 + rows, s:e]
                chunk = buf[: m.numel()].view(m.shape).copy_(m)
                for k in range(K):
                    out[k, c, r0 : r0 + rows] += chunk @ cols[k][s:e]
        return out.permute(2, 1, 0)

    def dots_of_rows(self, chunk: Float[Tensor, "row param"], cols: list[Tensor], out: Float[Tensor, "k component row"]) -> None:
        """``out[k, c, r] += Σ_{p ∈ c} chunk[r, p] cols[k][p]`` (float64 ``chunk`` of full rows, in
        the blocks' order): :meth:`dots` of float64 rows, for :meth:`dots` itself and for a caller
        that already holds them converted (:func:`dot_and_magnitude`)."""
        for s, e, c in zip(self.starts, self.ends, self.comps):
            for k, col in enumerate(cols):
                out[k, c] += chunk[:, s:e] @ col[s:e]

    def gram(self, M: Float[Tensor, "row param"], G: Float[Tensor, "batch param"]) -> Float[Tensor, "row component batch"]:
        """``out[r, c, b] = Σ_{p ∈ c} M[r, p] G[b, p]`` (blocks' order), one GEMM per block in
        ``M``'s dtype, returned in float64."""
        R, B = M.shape[0], G.shape[0]
        G = G.to(M.device, M.dtype)
        if len(self.starts) == 1:
            return (M @ G.T).to(torch.float64)[:, None, :]
        out = torch.zeros(R, self.n_comp, B, dtype=M.dtype, device=M.device)
        for s, e, c in zip(self.starts, self.ends, self.comps):
            out[:, c].addmm_(M[:, s:e], G[:, s:e].T)
        return out.to(torch.float64)

    def gram_pieces(self, M: Float[Tensor, "row param"], pieces: list[tuple[int, Float[Tensor, "batch cols"]]]
                    ) -> Float[Tensor, "row component batch"]:
        """:meth:`gram` of ``M`` with a ``G`` given as column pieces ``(start, [B, n])`` (columns
        ``start:start + n`` of ``G``, e.g. one per parameter), never concatenated into ``[B, P]``:
        one GEMM per piece and block they share. Needs blocks without a permutation (``M``'s
        columns in the layout order)."""
        if self.perm is not None:
            raise ValueError("gram_pieces needs blocks without a permutation; use gram on the sorted matrix")
        R, B = M.shape[0], pieces[0][1].shape[0]
        out = torch.zeros(R, self.n_comp, B, dtype=M.dtype, device=M.device)
        for start, g in pieces:
            g = g.to(M.device, M.dtype)
            end = start + g.shape[1]
            for s, e, c in zip(self.starts, self.ends, self.comps):
                lo, hi = max(s, start), min(e, end)
                if lo < hi:
                    out[:, c].addmm_(M[:, lo:hi], g[:, lo - start : hi - start].T)
        return out.to(torch.float64)


def dot_and_magnitude(
    M: Float[Tensor, "row param"],
    v: Float[Tensor, "param"],
    blocks: Blocks | None = None,
    V: Float[Tensor, "param k"] | None = None,
) -> tuple[Float[Tensor, "row"], Float[Tensor, "row"]] | tuple[Float[Tensor, "row"], Float[Tensor, "row"], Float[Tensor, "row component k"]]:
    """``(M @ v, |M| @ |v|)`` in float64 (the certificate's attributed change ``<φ̂, Δ>`` and its
    rounding scale ``Σ_p |φ̂_p Δ_p|``), ``M`` copied into a float64 buffer of about
    :data:`CHUNK_BYTES` a row chunk at a time.

    With ``blocks`` (no permutation: ``M``'s columns are already in the blocks' order) and ``V``
    (``[P, K]``), also ``blocks.dots(M, V)`` (``[rows, C, K]``) from the same float64 chunks, so
    ``M`` is converted once for both (the adjoint sweep's contractions of ``φ̂_s``).
    """
    R, P = M.shape
    v = v.to(M.device, torch.float64)
    va = v.abs()
    att = torch.empty(R, dtype=torch.float64, device=M.device)
    mag = torch.empty(R, dtype=torch.float64, device=M.device)
    if V is not None:
        if blocks is None or blocks.perm is not None:
            raise ValueError("dot_and_magnitude with V needs blocks without a permutation (M in the blocks' order)")
        V = V.to(M.device, torch.float64)
        cols = [V[:, k].contiguous() for k in range(V.shape[1])]
        dots = torch.zeros(V.shape[1], blocks.n_comp, R, dtype=torch.float64, device=M.device)
    rows = max(1, min(R, CHUNK_BYTES // (8 * max(P, 1))))
    buf = torch.empty(rows, P, dtype=torch.float64, device=M.device)
    for r0 in range(0, R, rows):
        m = M[r0 : r0 + rows]
        chunk = buf[: m.shape[0]]
        chunk.copy_(m)
        torch.mv(chunk, v, out=att[r0 : r0 + rows])
        if V is not None:
            blocks.dots_of_rows(chunk, cols, dots[:, :, r0 : r0 + rows])
        torch.mv(chunk.abs_(), va, out=mag[r0 : r0 + rows])
    if V is None:
        return att, mag
    return att, mag, dots.permute(2, 1, 0)
