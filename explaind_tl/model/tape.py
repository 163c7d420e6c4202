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
            entries as it is formed (``index_copy_``), with no block of the groups' own, and the
            other entries are left as they are.

    Returns:
        ``{name: [groups, outputs, *shape]}`` (``out`` when given).
    """
    if not tape:
        raise ValueError("tape_jacobians: the tape holds no parameter use")
    if index is not None and (out is None or index.shape != (groups,)):
        raise ValueError(f"tape_jacobians: index needs out and one entry per group ({groups}), got {tuple(index.shape)}")
    dest: Params = {} if out is None else out
    written: set[str] = set()
    n_out, like = cotangents[0].shape[0], cotangents[0]
    for use, d in zip(tape, cotangents, strict=True):
        shape = shapes[use.name]
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
        elif index is not None:
            if use.name in written:
                dest[use.name].index_add_(0, index, g)
            else:
                dest[use.name].index_copy_(0, index, g)
        elif use.name in written:
            dest[use.name].add_(g)
        else:
            dest[use.name].copy_(g)
        written.add(use.name)
    for name, shape in shapes.items():
        if name in written:
            continue
        if index is not None:
            dest[name].index_fill_(0, index, 0)
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


def _rank_one(x: Tensor, d: Tensor, pattern: str | None, shape: torch.Size) -> Tensor | None:
    """Each group's gradient of a product read at one row, ``x_gᵀ δ_g`` (``x`` ``[groups, d_in]``,
    ``d`` ``[outputs, groups, d_out]``), formed as ``[groups, outputs, *shape]`` in the
    parameter's own order (contiguous), so that writing it into a caller's buffer copies runs of
    whole parameters. ``None`` for a ``pattern`` other than the parameter itself, a reshaping of
    it (``"head d_head d_model -> (head d_head) d_model"``) or ``"a i b -> i (a b)"`` (a head
    axis in front of the input axis, ``W_Q``): the caller then takes the batched product.

    A ``bmm`` over groups lays its result out as ``[groups, d_in, outputs, d_out]``, and the
    rearrangement into the parameter's order is a strided copy of runs of ``d_out`` (8 floats
    for a head's ``W_Q``): with the write into ``φ̂`` included, 1.35-1.9x slower per parameter
    than this broadcast product on the kernel benchmark's calls (docs/design.md §4).
    """
    n_g, n_out = x.shape[0], d.shape[0]
    dt = d.transpose(0, 1)  # [groups, outputs, d_out]
    tokens = None if pattern is None else [side.replace("(", " ").replace(")", " ").split() for side in pattern.split("->")]
    if tokens is None or tokens[0] == tokens[1]:  # the parameter itself, or a reshaping of it
        out = torch.empty(n_g, n_out, x.shape[1], d.shape[2], dtype=d.dtype, device=d.device)
        return torch.mul(x[:, None, :, None], dt[:, :, None, :], out=out).view(n_g, n_out, *shape)
    left = tokens[0]
    if len(left) == 3 and pattern.split("->")[1].split() == [left[1], f"({left[0]}", f"{left[2]})"]:  # a i b -> i (a b)
        heads = shape[0]
        out = torch.empty(n_g, n_out, heads, x.shape[1], d.shape[2] // heads, dtype=d.dtype, device=d.device)
        return torch.mul(x[:, None, None, :, None], dt.reshape(n_g, n_out, heads, 1, -1), out=out)
    return None
