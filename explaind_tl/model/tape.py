"""Per-group parameter Jacobians from a taped forward: the per-example-gradient trick.

A forward that records each use of a trainable parameter (:class:`ParamUse`: a product, a bias,
a scale or an embedding lookup, with its input and output) lets every row's gradient be formed
from the outputs' cotangents alone: for ``y = x @ W`` the gradient of a row's outputs is
``xᵀ δ`` with ``δ = ∂F/∂y`` of that row. One backward batched over the outputs gives every
``δ``; :func:`tape_jacobians` contracts them with the inputs over each group of rows (a query's
quadrature nodes and pieces), for every group and output at once, with no backward per group.
:class:`~explaind_tl.model.readout.Readout` records such a tape; the contraction here is pure
tensor math, tested against loops over rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import einops
import torch
from torch import Tensor

Params = dict[str, Tensor]


@dataclass(frozen=True)
class ParamUse:
    """One use of a trainable parameter in a taped forward (:class:`~explaind_tl.model.readout.Readout`
    with a ``tape``).

    ``kind`` says how output ``y`` (``[batch, ...]``) depends on parameter ``name``:

    * ``"mm"``: ``y = x @ W'`` (+ terms without ``W``), ``W'`` is ``W`` rearranged by the einops
      pattern ``extra`` (``None``: ``W`` itself); ``x`` is ``[batch, ..., d_in]``;
    * ``"add"``: ``y = u + b``, ``b`` broadcast over ``y``'s leading axes;
    * ``"mul"``: ``y = x * w`` elementwise, ``w`` broadcast over the leading axes;
    * ``"rows"``: ``y = W[extra]``, ``extra`` ``[batch, pos]`` row ids (tokens or positions).
    """

    kind: str
    name: str
    x: Tensor | None
    y: Tensor
    extra: Any = None


def tape_cotangents(total: Tensor, tape: Sequence[ParamUse]) -> list[Tensor]:
    """Every use's output cotangents ``∂total_o/∂y`` (``[outputs, *y.shape]``, detached) for the
    ``[outputs]`` values ``total`` computed from the taped uses: one backward batched over the
    outputs (a plain one for a single output), the cotangents :func:`tape_jacobians` takes."""
    ys = [u.y for u in tape]
    if total.numel() == 1:
        cot = torch.autograd.grad(total.reshape(()), ys, allow_unused=True, materialize_grads=True)
        return [c.detach()[None] for c in cot]
    eye = torch.eye(len(total), dtype=total.dtype, device=total.device)
    cot = torch.autograd.grad(total, ys, grad_outputs=eye, is_grads_batched=True, allow_unused=True, materialize_grads=True)
    return [c.detach() for c in cot]


@torch.no_grad()
def tape_jacobians(
    tape: Sequence[ParamUse],
    cotangents: Sequence[Tensor],
    groups: int,
    shapes: dict[str, torch.Size],
    outer: int = 1,
    out: Params | None = None,
    index: Tensor | None = None,
) -> Params:
    """Per-group parameter gradients of ``F`` from a taped forward and its outputs' cotangents.

    Rows of the batch must not interact (each row's outputs depend on the parameters only
    through its own rows of every ``y``), as in :class:`~explaind_tl.model.readout.Readout`. Then the gradient of
    ``F_o`` with respect to a parameter, restricted to the rows of one group, is the sum over
    those rows of each use's local gradient: ``xᵀ δ`` for a product, ``Σ δ`` for a bias,
    ``Σ x ⊙ δ`` for a scale, ``δ`` scattered to the rows read for an embedding, where
    ``δ = ∂F_o / ∂y``. Each is one contraction over the group's rows and the positions, for
    every output at once.

    Args:
        tape: the uses (:class:`ParamUse`), in any order; a parameter may be used several times.
        cotangents: per use, ``∂F_o/∂y`` for every output ``o``: ``[outputs, batch, *y.shape[1:]]``.
        groups: the batch is this many equal groups of rows: consecutive rows, or, with
            ``outer``, ``outer`` blocks of ``groups`` runs of consecutive rows (row
            ``(a * groups + g) * m + i`` belongs to group ``g``).
        shapes: every parameter's shape, by name; a parameter without a use gets zeros.
        outer: see ``groups`` (the quadrature nodes, stacked node-major).
        out: where to write the result (``{name: [groups, outputs, *shape]}``, any strides,
            every name of ``shapes``; overwritten): a caller's buffer, written once.
        index: with ``out``, the groups' places along ``out``'s first axis (``[groups]``
            distinct ids; ``out`` then has any length there): each result is written to those
            entries as it is formed, with no block of the groups' own, and the other entries
            are left as they are. Runs of consecutive ids are written as slices (a copy of each
            run, or each one-row product formed in it) where the runs hold enough numbers on
            average to pay for a call each (:data:`RUN_COPY_MIN`), else by one ``index_copy_``.

    Returns:
        ``{name: [groups, outputs, *shape]}`` (``out`` when given).
    """
    if not tape:
        raise ValueError("tape_jacobians: the tape holds no parameter use")
    if index is not None and (out is None or index.shape != (groups,)):
        raise ValueError(f"tape_jacobians: index needs out and one entry per group ({groups}), got {tuple(index.shape)}")
    dest: Params = {} if out is None else out
    runs = None if index is None else _Runs(index)
    written: set[str] = set()
    n_out, like = cotangents[0].shape[0], cotangents[0]
    for use, d in zip(tape, cotangents, strict=True):
        shape = shapes[use.name]
        if use.kind == "mm" and out is not None and use.name not in written and _product_into(use, d, groups, shape, dest[use.name], runs):
            written.add(use.name)  # formed in place, straight into its rows of out
            continue
        if use.kind == "mm":
            g = _product(use, d, groups, outer, shape)
        elif use.kind in ("add", "mul"):  # summed over rows, then nodes (one axis at a time: faster)
            local = d if use.kind == "add" else d * use.x
            g = local.reshape(n_out, outer, groups, -1, *shape).sum(3).sum(1).transpose(0, 1)
        elif use.kind == "rows":
            at = use.extra.reshape(outer, groups, -1) + shape[0] * torch.arange(groups, device=d.device)[:, None]
            acc = torch.zeros(n_out, groups * shape[0], shape[-1], dtype=d.dtype, device=d.device)
            acc.index_add_(1, at.reshape(-1), d.reshape(n_out, -1, shape[-1]))
            g = acc.view(n_out, groups, shape[0], shape[-1]).transpose(0, 1)
        else:
            raise ValueError(f"unknown parameter use {use.kind!r}")
        if out is None:
            dest[use.name] = dest[use.name] + g if use.name in written else g
        elif runs is not None:
            runs.write(dest[use.name], g, add=use.name in written)
        elif use.name in written:
            dest[use.name].add_(g)
        else:
            dest[use.name].copy_(g)
        written.add(use.name)
    for name, shape in shapes.items():
        if name in written:
            continue
        if runs is not None:
            runs.write(dest[name], None)
        elif out is not None:
            dest[name].zero_()
        else:
            dest[name] = torch.zeros(groups, n_out, *shape, dtype=like.dtype, device=like.device)
    return dest


def _product(use: ParamUse, d: Tensor, groups: int, outer: int, shape: torch.Size) -> Tensor:
    """A product's per-group gradients ``[groups, outputs, *shape]`` (see :func:`tape_jacobians`):
    one product per group, ``[d_in, rows] @ [rows, outputs * d_out]``, or with one row per group
    the outer product in the parameter's own order (:func:`_rank_one`)."""
    n_out, d_in, d_out = d.shape[0], use.x.shape[-1], d.shape[-1]
    rows = use.x.numel() // (d_in * groups)  # per group, over the outer blocks
    if rows == 1:
        g = _rank_one(use.x.reshape(groups, d_in), d.reshape(n_out, groups, d_out), use.extra, shape)
        if g is not None:
            return g
    x = einops.rearrange(use.x.reshape(outer, groups, -1, d_in), "outer group row d_in -> group d_in (outer row)")
    dg = einops.rearrange(d.reshape(n_out, outer, groups, -1, d_out), "output outer group row d_out -> group (outer row) (output d_out)")
    g = einops.rearrange(torch.bmm(x, dg), "group d_in (output d_out) -> group output d_in d_out", output=n_out)
    if use.extra is not None:  # back from the rearranged layout the product used
        left, right = use.extra.split("->")
        g = einops.rearrange(g, f"group output {right} -> group output {left}", **dict(zip(left.split(), shape)))
    return g


def _product_into(use: ParamUse, d: Tensor, groups: int, shape: torch.Size, dest: Tensor, runs: _Runs | None) -> bool:
    """A product read at one row per group formed straight into its rows of ``dest`` (``[groups,
    outputs, *shape]``, or with ``runs`` the rows they name), run by run (:func:`_rank_one`).
    ``False``, with nothing written, where that does not apply: several rows per group, a
    pattern :func:`_rank_one` does not take, or runs too short to pay for a call each."""
    n_out, d_in, d_out = d.shape[0], use.x.shape[-1], d.shape[-1]
    if use.x.numel() != d_in * groups or _rank_one_kind(use.extra) is None:
        return False
    if runs is not None and not runs.worth_slicing(dest):
        return False
    x, dg = use.x.reshape(groups, d_in), d.reshape(n_out, groups, d_out)
    for src, dst, n in [(0, 0, groups)] if runs is None else runs.runs:
        _rank_one(x[src : src + n], dg[:, src : src + n], use.extra, shape, out=dest[dst : dst + n])
    return True


def _rank_one_kind(pattern: str | None) -> str | None:
    """``"plain"`` for the parameter itself or a reshaping of it, ``"heads"`` for
    ``"a i b -> i (a b)"`` (a head axis in front of the input axis), else ``None``."""
    if pattern is None:
        return "plain"
    left, right = [side.replace("(", " ").replace(")", " ").split() for side in pattern.split("->")]
    if left == right:
        return "plain"
    if len(left) == 3 and pattern.split("->")[1].split() == [left[1], f"({left[0]}", f"{left[2]})"]:
        return "heads"
    return None


def _rank_one(x: Tensor, d: Tensor, pattern: str | None, shape: torch.Size, out: Tensor | None = None) -> Tensor | None:
    """Each group's gradient of a product read at one row, ``x_gᵀ δ_g`` (``x`` ``[groups, d_in]``,
    ``d`` ``[outputs, groups, d_out]``), formed as ``[groups, outputs, *shape]`` in the
    parameter's own order (contiguous, or into ``out`` of that shape, any strides), so that
    writing it into a caller's buffer copies runs of whole parameters, or nothing at all.
    ``None`` for a ``pattern`` other than the parameter itself, a reshaping of it
    (``"head d_head d_model -> (head d_head) d_model"``) or ``"a i b -> i (a b)"`` (a head axis
    in front of the input axis, ``W_Q``): the caller then takes the batched product.

    A ``bmm`` over groups lays its result out as ``[groups, d_in, outputs, d_out]``, and the
    rearrangement into the parameter's order is a strided copy of runs of ``d_out`` (8 floats
    for a head's ``W_Q``): with the write into ``φ̂`` included, 1.35-1.9x slower per parameter
    than this broadcast product on the kernel benchmark's calls (docs/design.md §4).
    """
    kind = _rank_one_kind(pattern)
    if kind is None:
        return None
    n_g, n_out = x.shape[0], d.shape[0]
    dt = d.transpose(0, 1)  # [groups, outputs, d_out]
    if kind == "plain":
        a, b, full = x[:, None, :, None], dt[:, :, None, :], (n_g, n_out, x.shape[1], d.shape[2])
    else:
        heads = shape[0]
        a, b = x[:, None, None, :, None], dt.reshape(n_g, n_out, heads, 1, -1)
        full = (n_g, n_out, heads, x.shape[1], d.shape[2] // heads)
    if out is None:
        return torch.mul(a, b, out=torch.empty(full, dtype=d.dtype, device=d.device)).view(n_g, n_out, *shape)
    try:
        target = out.view(full)
    except RuntimeError:  # out's strides do not split that way: form it, then copy
        return out.copy_(_rank_one(x, d, pattern, shape))
    torch.mul(a, b, out=target)
    return out


# Runs of consecutive ids are written as slices (one call per run) when they hold at least this
# many numbers on average; shorter runs go by one index_copy_ over all of them. index_copy_
# moves ~11 GB/s on the kernel benchmark's calls (an indexed loop per element), a slice copy
# ~37 GB/s (one thread, AMD EPYC), and a call costs a few microseconds.
RUN_COPY_MIN = 16384


class _Runs:
    """Runs of consecutive entries in a ``[groups]`` index: ``(first group, first entry, length)``."""

    def __init__(self, index: Tensor) -> None:
        self.index = index
        ids = index.tolist()
        self.runs: list[tuple[int, int, int]] = []
        for g, i in enumerate(ids):
            if self.runs and self.runs[-1][1] + self.runs[-1][2] == i:
                first, at, n = self.runs[-1]
                self.runs[-1] = (first, at, n + 1)
            else:
                self.runs.append((g, i, 1))

    def worth_slicing(self, dest: Tensor) -> bool:
        """Whether the average run of ``dest``'s entries holds :data:`RUN_COPY_MIN` numbers."""
        return dest[0].numel() * len(self.index) >= RUN_COPY_MIN * len(self.runs)

    def write(self, dest: Tensor, g: Tensor | None, add: bool = False) -> None:
        """``dest[index] = g`` (``+= g`` with ``add``; zeros where ``g`` is ``None``), run by run
        where they are long enough, else by one indexed call."""
        if not self.worth_slicing(dest):
            if g is None:
                dest.index_fill_(0, self.index, 0)
            elif add:
                dest.index_add_(0, self.index, g)
            else:
                dest.index_copy_(0, self.index, g)
            return
        for src, at, n in self.runs:
            rows = dest[at : at + n]
            if g is None:
                rows.zero_()
            elif add:
                rows.add_(g[src : src + n])
            else:
                rows.copy_(g[src : src + n])
