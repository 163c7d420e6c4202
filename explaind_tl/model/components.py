"""Components: a partition of the parameter coordinates (docs/design.md §2).

For any partition of the trainable parameter coordinates into components ``c``,
``<φ, Δ> = Σ_c <φ|_c, Δ|_c>`` exactly. :class:`ComponentMap` holds such a partition as one
integer tensor per parameter (the component id of every coordinate) and reduces per-coordinate
products to per-component sums.

For a ``HookedTransformer`` the components are keyed by the hook point whose computation their
parameters serve, with TransformerLens labels:

==================  ==========================================================  ==========================
label               parameters                                                  hook point
==================  ==========================================================  ==========================
``embed``           ``embed.W_E``                                               ``hook_embed``
``pos_embed``       ``pos_embed.W_pos``                                         ``hook_pos_embed``
``L{l}H{h}``        ``blocks.l.attn.W_Q/W_K/W_V/W_O[h]``, ``b_Q/b_K/b_V[h]``   ``blocks.l.attn.hook_z``
``L{l}KV{g}``       GQA: ``blocks.l.attn._W_K/_W_V/_b_K/_b_V[g]`` (shared       ``blocks.l.attn.hook_z``
                    by the query heads of group ``g``)
``L{l}.attn.b_O``   ``blocks.l.attn.b_O``                                       ``blocks.l.hook_attn_out``
``L{l}.mlp``        ``blocks.l.mlp.*`` (``W_in, b_in, W_out, b_out, W_gate``)   ``blocks.l.mlp.hook_post``
``L{l}N{n}``        neuron granularity: ``W_in[:, n]``, ``W_gate[:, n]``,       ``blocks.l.mlp.hook_post``
                    ``b_in[n]``, ``W_out[n]``
``L{l}.mlp.b_out``  neuron granularity: ``blocks.l.mlp.b_out``                  ``blocks.l.hook_mlp_out``
``L{l}.ln1/ln2``    ``blocks.l.ln1.w/b``, ``blocks.l.ln2.w/b``                  ``blocks.l.ln1.hook_scale``
``ln_final``        ``ln_final.w/b``                                            ``ln_final.hook_scale``
``unembed``         ``unembed.W_U``, ``unembed.b_U``                            ``logits`` (no TL hook)
==================  ==========================================================  ==========================

Granularities of :meth:`ComponentMap.from_model`: ``"head"`` (the table with ``L{l}.mlp``),
``"neuron"`` (heads and ``L{l}N{n}`` / ``L{l}.mlp.b_out``), ``"block"`` (``L{l}.attn`` = all
heads + ``b_O``, ``L{l}.mlp``, plus embeddings, LayerNorms and unembedding) and ``"parameter"``
(one component per parameter tensor, labelled by its name; the only one for generic modules).
Parameters a granularity does not know (e.g. mixture-of-experts weights at neuron granularity)
get their own per-parameter component and a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from explaind_tl.model import is_hooked_transformer
from explaind_tl.model.bridge import bridge_assign, is_transformer_bridge
from explaind_tl.model.tl_partition import IndexExpr, tl_assign, tl_sort_key

GRANULARITIES = ("head", "block", "neuron", "parameter")


def _named_shapes(
    model: nn.Module | Mapping[str, Tensor],
) -> tuple[dict[str, torch.Size], list[str]]:
    """All parameters of ``model`` (name -> shape, in order) and the frozen ones."""
    if isinstance(model, nn.Module):
        named = list(model.named_parameters())
    elif isinstance(model, Mapping):
        named = list(model.items())
    else:
        raise TypeError(f"expected an nn.Module or a dict of tensors, got {type(model).__name__}")
    shapes = {n: torch.Size(p.shape) for n, p in named}
    frozen = [
        n
        for n, p in named
        if isinstance(p, Tensor) and not p.requires_grad and isinstance(p, nn.Parameter)
    ]
    return shapes, frozen


def _resolve_param_names(
    shapes: dict[str, torch.Size], frozen: list[str], param_names: Sequence[str] | None
) -> list[str]:
    if param_names is None:
        return [n for n in shapes if n not in frozen]
    param_names = list(param_names)
    unknown = [n for n in param_names if n not in shapes]
    if unknown:
        raise ValueError(f"param_names not found in the model: {unknown}")
    if len(set(param_names)) != len(param_names):
        raise ValueError("param_names contains duplicates")
    return param_names


def _normalize_expr(expr: IndexExpr) -> IndexExpr:
    if expr is None or expr is Ellipsis:
        return (Ellipsis,)
    if isinstance(expr, list):
        return tuple(expr)
    return expr


# --------------------------------------------------------------------------------------------
# ComponentMap
# --------------------------------------------------------------------------------------------


class ComponentMap:
    """A partition of the trainable parameter coordinates into labelled components.

    Attributes:
        labels: component labels, the component axis in order (``C = len(labels)``).
        index: parameter name -> ``LongTensor`` of the parameter's shape holding component ids
            in ``[0, C)``.
        hook_points: label -> hook point name (only labels with a known hook point).
        frozen: parameters of the model with ``requires_grad=False`` (never in the map).
        param_names: the mapped parameters, in order (the engine's "param names").
        shapes: parameter name -> shape.
        flat_index: ``[P]`` concatenation over ``param_names`` of the flattened ``index``.

    Build one with :meth:`from_model`, :meth:`from_dict` or :meth:`from_predicate`; every
    constructor checks that the map is a partition (no gaps, no overlaps).
    """

    def __init__(
        self,
        labels: Sequence[str],
        index: Mapping[str, Tensor],
        hook_points: Mapping[str, str] | None = None,
        frozen: Sequence[str] = (),
        param_names: Sequence[str] | None = None,
        excluded: Sequence[str] = (),
    ) -> None:
        self.labels: list[str] = [str(lbl) for lbl in labels]
        if len(set(self.labels)) != len(self.labels):
            dup = sorted({lbl for lbl in self.labels if self.labels.count(lbl) > 1})
            raise ValueError(f"duplicate component labels: {dup}")
        self.param_names: list[str] = list(param_names) if param_names is not None else list(index)
        self.index: dict[str, Tensor] = {n: index[n].to(torch.long).cpu() for n in self.param_names}
        self.shapes: dict[str, torch.Size] = {n: self.index[n].shape for n in self.param_names}
        self.hook_points: dict[str, str] = dict(hook_points or {})
        self.frozen: list[str] = list(frozen)
        #: parameters of the model left out of the map (frozen ones and those not in param_names)
        self.excluded: list[str] = list(excluded)
        C = len(self.labels)
        for n, ids in self.index.items():
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= C):
                bad = ids[(ids < 0) | (ids >= C)]
                raise ValueError(
                    f"parameter {n!r} has component ids outside [0, {C}): e.g. {bad[:5].tolist()}"
                    + (" (uncovered coordinates)" if bool((bad < 0).any()) else "")
                )
        self.flat_index: Int[Tensor, " param"] = (
            torch.cat([self.index[n].reshape(-1) for n in self.param_names])
            if self.param_names
            else torch.zeros(0, dtype=torch.long)
        )
        self._plans = {n: self._plan(self.index[n]) for n in self.param_names}
        self._device_cache: dict[tuple[str, str], Tensor] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        granularity: str = "head",
        param_names: Sequence[str] | None = None,
    ) -> ComponentMap:
        """The standard partition of a model at a granularity.

        Args:
            model: a ``HookedTransformer`` or a ``TransformerBridge`` (any granularity: the bridge's
                fused q/k/v/o weights are split by head, :mod:`explaind_tl.model.bridge`), or any
                ``nn.Module`` (``"parameter"``).
            granularity: ``"head"``, ``"block"``, ``"neuron"`` or ``"parameter"`` (see module doc).
            param_names: restrict the map to these parameters (default: every parameter with
                ``requires_grad=True``, in ``named_parameters()`` order). Components left
                without any coordinate are dropped.

        Returns:
            The ComponentMap. Labels are in canonical model order (embeddings, per layer
            ``ln1``, heads, ``b_O``, ``ln2``, MLP, then ``ln_final``, ``unembed``).

        Raises:
            ValueError: unknown granularity, or a TL granularity on a non-TL module.
        """
        if not isinstance(granularity, str) or granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown component granularity {granularity!r}; choose from {GRANULARITIES}"
            )
        # TransformerLens models: a HookedTransformer, or a TransformerBridge (same labels)
        assign_of = tl_assign if is_hooked_transformer(model) else bridge_assign if is_transformer_bridge(model) else None
        is_tl = assign_of is not None
        if granularity != "parameter" and not is_tl:
            raise ValueError(
                f"granularity {granularity!r} needs a HookedTransformer or TransformerBridge; use 'parameter' "
                f"for a generic {type(model).__name__}, or ComponentMap.from_dict / from_predicate"
            )
        shapes, frozen = _named_shapes(model)
        names = _resolve_param_names(shapes, frozen, param_names)
        groups: dict[str, list[tuple[str, IndexExpr]]] = {}
        hooks: dict[str, str] = {}
        fallback: list[str] = []
        for name in names:
            shape = shapes[name]
            if granularity == "parameter":
                assign = None
                if is_tl:
                    tl = assign_of(name, shape, "head", model.cfg)
                    if tl is not None:
                        hooks[name] = tl[0][2]
                else:
                    hooks[name] = name.rsplit(".", 1)[0] if "." in name else ""
                assign = [(name, (Ellipsis,), hooks.get(name, ""))]
            else:
                assign = assign_of(name, shape, granularity, model.cfg)
                if assign is None:
                    fallback.append(name)
                    assign = [(name, (Ellipsis,), name.rsplit(".", 1)[0] if "." in name else "")]
            for label, expr, hook in assign:
                groups.setdefault(label, []).append((name, expr))
                if hook:
                    hooks.setdefault(label, hook)
        if fallback:
            warnings.warn(
                f"ComponentMap.from_model({granularity!r}): parameters {fallback} are not part of the "
                "standard TransformerLens partition at this granularity; each gets its own "
                "component labelled by its name",
                stacklevel=2,
            )
        if granularity != "parameter":
            order = sorted(groups, key=tl_sort_key)  # stable: fallbacks keep their order
            groups = {k: groups[k] for k in order}
        excluded = [n for n in shapes if n not in names]
        return cls._build(shapes, names, groups, hooks, frozen, excluded)

    @classmethod
    def from_dict(
        cls,
        model: nn.Module | Mapping[str, Tensor],
        groups: Mapping[str, Iterable[tuple[str, IndexExpr] | str]],
        param_names: Sequence[str] | None = None,
        hook_points: Mapping[str, str] | None = None,
    ) -> ComponentMap:
        """A map from explicit groups of parameter slices.

        Args:
            model: the module (or a ``{name: tensor}`` dict, all treated as trainable).
            groups: ``{label: [(param_name, index_expr), ...]}``. ``index_expr`` is anything
                tensor indexing accepts: ``...``/``slice(None)``/``None`` for the whole tensor,
                an int (``2``: head 2 of ``W_Q``), a tuple of ints/slices
                (``(slice(None), 17)``: column 17 of ``W_in``) or an index tensor. A bare
                ``param_name`` string means the whole tensor. Labels keep the dict's order.
                Entries for parameters outside ``param_names`` (e.g. frozen ones) are skipped
                and components left empty are dropped.
            param_names: the parameters to partition (default: all trainable ones).
            hook_points: optional ``{label: hook name}``.

        Raises:
            ValueError: unknown parameter, a coordinate in two components (overlap, both named)
                or coordinates in no component (gap, parameters named).
        """
        shapes, frozen = _named_shapes(model)
        names = _resolve_param_names(shapes, frozen, param_names)
        norm: dict[str, list[tuple[str, IndexExpr]]] = {}
        for label, entries in groups.items():
            if isinstance(entries, str) or (
                isinstance(entries, tuple)
                and len(entries) == 2
                and isinstance(entries[0], str)
                and not isinstance(entries[1], str)
                and not (
                    isinstance(entries[1], (tuple, list))
                    and entries[1]
                    and isinstance(entries[1][0], str)
                )
            ):
                entries = [entries]  # a single entry given without a list
            lst = []
            for entry in entries:
                pname, expr = (entry, (Ellipsis,)) if isinstance(entry, str) else entry
                if pname not in shapes:
                    raise ValueError(
                        f"component {label!r}: {pname!r} is not a parameter of the model"
                    )
                lst.append((pname, _normalize_expr(expr)))
            norm[str(label)] = lst
        excluded = [n for n in shapes if n not in names]
        return cls._build(shapes, names, norm, dict(hook_points or {}), frozen, excluded)

    @classmethod
    def from_predicate(
        cls,
        model: nn.Module | Mapping[str, Tensor],
        fn: Callable[[str, torch.Size], Any],
        param_names: Sequence[str] | None = None,
        hook_points: Mapping[str, str] | None = None,
    ) -> ComponentMap:
        """A map from a labelling function, vectorised per parameter.

        Args:
            model: the module (or a ``{name: tensor}`` dict).
            fn: ``fn(param_name, shape) -> labels`` called once per parameter. Return one label
                (a ``str``) for the whole tensor, or an array-like of labels (nested lists or a
                numpy ``str``/``object`` array) of the parameter's ``shape`` (or broadcastable
                to it, e.g. ``[n_heads, 1, 1]`` for a per-head split). ``None`` entries are
                uncovered coordinates (an error). Labels are ordered by first appearance
                over ``param_names`` in flattened (row-major) order.
            param_names: the parameters to partition (default: all trainable ones).
            hook_points: optional ``{label: hook name}``.

        Raises:
            ValueError: coordinates without a label.
        """
        shapes, frozen = _named_shapes(model)
        names = _resolve_param_names(shapes, frozen, param_names)
        label_ids: dict[str, int] = {}
        index: dict[str, Tensor] = {}
        gaps: list[str] = []
        for name in names:
            shape = shapes[name]
            res = fn(name, shape)
            if isinstance(res, str):
                cid = label_ids.setdefault(res, len(label_ids))
                index[name] = torch.full(shape, cid, dtype=torch.long)
                continue
            if res is None:
                gaps.append(f"{name} (all {shape.numel()} coordinates)")
                continue
            arr = np.broadcast_to(np.asarray(res, dtype=object), tuple(shape)).reshape(-1)
            ids = np.empty(arr.shape[0], dtype=np.int64)
            missing = 0
            for i, lbl in enumerate(arr):  # first-appearance order; fast enough for small maps
                if lbl is None:
                    ids[i] = -1
                    missing += 1
                else:
                    ids[i] = label_ids.setdefault(str(lbl), len(label_ids))
            if missing:
                gaps.append(f"{name} ({missing} of {shape.numel()} coordinates)")
            index[name] = torch.from_numpy(ids).reshape(shape)
        if gaps:
            raise ValueError(f"component map has gaps: coordinates without a label in {gaps}")
        excluded = [n for n in shapes if n not in names]
        return cls(list(label_ids), index, hook_points, frozen, names, excluded)

    @classmethod
    def _build(
        cls,
        shapes: dict[str, torch.Size],
        names: list[str],
        groups: Mapping[str, list[tuple[str, IndexExpr]]],
        hook_points: Mapping[str, str],
        frozen: list[str],
        excluded: list[str],
    ) -> ComponentMap:
        """Assign ids group by group, checking overlaps and gaps; drop empty components."""
        name_set = set(names)
        ids = {n: torch.full(shapes[n], -1, dtype=torch.long) for n in names}
        labels: list[str] = []
        for label, entries in groups.items():
            cid = len(labels)
            used = False
            for pname, expr in entries:
                if pname not in name_set:
                    continue  # frozen or outside param_names
                target = ids[pname]
                try:
                    current = target[expr]
                except (IndexError, TypeError, ValueError) as err:
                    raise ValueError(
                        f"component {label!r}: bad index {expr!r} for {pname!r} of shape "
                        f"{tuple(target.shape)}: {err}"
                    ) from err
                if current.numel() == 0:
                    continue
                taken = current[(current >= 0) & (current != cid)]
                if taken.numel():
                    others = [labels[i] for i in torch.unique(taken).tolist()]
                    raise ValueError(
                        f"components overlap: {taken.numel()} coordinate(s) of {pname!r} are in "
                        f"component {label!r} and in {others}"
                    )
                target[expr] = cid
                used = True
            if used:
                labels.append(label)
        gaps = []
        for n in names:
            miss = ids[n] < 0
            if bool(miss.any()):
                first = tuple(int(i) for i in torch.nonzero(miss)[0].tolist())
                gaps.append(f"{n} ({int(miss.sum())} of {miss.numel()} coordinates, e.g. {first})")
        if gaps:
            raise ValueError(f"component map has gaps: coordinates in no component in {gaps}")
        hooks = {lbl: hook_points[lbl] for lbl in labels if lbl in hook_points}
        return cls(labels, ids, hooks, frozen, names, excluded)

    # ------------------------------------------------------------------ reduction plans
    @staticmethod
    def _plan(ids: Tensor) -> tuple:
        """How to reduce a parameter: whole tensor to one id, or along one axis, or general."""
        if ids.numel() == 0:
            return ("empty",)
        flat = ids.reshape(-1)
        if bool((flat == flat[0]).all()):
            return ("whole", int(flat[0]))
        for axis in range(ids.ndim):
            ref_idx = [0] * ids.ndim
            ref_idx[axis] = slice(None)
            along = ids[tuple(ref_idx)]  # [n_axis]
            shape = [1] * ids.ndim
            shape[axis] = -1
            if bool((ids == along.reshape(shape)).all()):
                return ("axis", axis, along.clone())
        return ("general", flat.clone())

    def _on(self, key: str, t: Tensor, device: torch.device) -> Tensor:
        if t.device == device:
            return t
        k = (key, str(device))
        if k not in self._device_cache:
            self._device_cache[k] = t.to(device)
        return self._device_cache[k]

    def _reduce_one(self, out: Tensor, name: str, v: Tensor) -> None:
        """Add parameter ``name``'s per-coordinate values ``v [*lead, *shape]`` into ``out``."""
        nd = len(self.shapes[name])
        plan = self._plans[name]
        lead = v.ndim - nd
        if plan[0] == "empty":
            return
        if plan[0] == "whole":
            out[..., plan[1]] += v.reshape(*v.shape[:lead], -1).sum(-1)
        elif plan[0] == "axis":
            axis = plan[1]
            others = [lead + a for a in range(nd) if a != axis]
            s = v.sum(dim=others) if others else v
            out.index_add_(out.ndim - 1, self._on(f"a:{name}", plan[2], out.device), s)
        else:
            flat = v.reshape(*v.shape[:lead], -1)
            out.index_add_(out.ndim - 1, self._on(f"g:{name}", plan[1], out.device), flat)

    def reduce(
        self,
        x: Mapping[str, Float[Tensor, "... *param_shape"]],
        y: Mapping[str, Float[Tensor, "*param_shape"]] | None = None,
    ) -> Float[Tensor, "... component"]:
        """Per-component sums of ``x * y`` (or of ``x`` when ``y`` is None).

        Args:
            x: ``{name: [..., *shape]}`` for every mapped parameter (leading batch dims allowed,
                the same for all parameters, or broadcastable). Extra names are ignored.
            y: optional ``{name: shape}`` (or broadcastable against ``x[name]``).

        Returns:
            ``[..., C]`` in the promoted dtype of ``x`` and ``y`` (float64 stays float64).
        """
        missing = [n for n in self.param_names if n not in x or (y is not None and n not in y)]
        if missing:
            raise KeyError(f"ComponentMap.reduce: missing parameters {missing}")
        dtype = None
        leads = []
        device = None
        for n in self.param_names:
            nd = len(self.shapes[n])
            xv = x[n]
            device = xv.device if device is None else device
            dt = xv.dtype if y is None else torch.promote_types(xv.dtype, y[n].dtype)
            dtype = dt if dtype is None else torch.promote_types(dtype, dt)
            leads.append(tuple(xv.shape[: xv.ndim - nd]))
            if y is not None:
                leads.append(tuple(y[n].shape[: y[n].ndim - nd]))
        lead = torch.broadcast_shapes(*leads) if leads else ()
        out = torch.zeros(*lead, len(self.labels), dtype=dtype or torch.float64, device=device)
        for n in self.param_names:
            v = x[n] if y is None else x[n] * y[n]
            if v.dtype != out.dtype:
                v = v.to(out.dtype)
            if tuple(v.shape[: v.ndim - len(self.shapes[n])]) != tuple(lead):
                v = v.expand(*lead, *self.shapes[n])
            self._reduce_one(out, n, v)
        return out

    def reduce_flat(self, v: Float[Tensor, "... param"]) -> Float[Tensor, "... component"]:
        """Per-component sums of a flat vector ``v [..., P]`` (``param_names`` order)."""
        P = self.flat_index.numel()
        if v.shape[-1] != P:
            raise ValueError(
                f"reduce_flat: expected last dim {P} (flattened parameters), got {v.shape[-1]}"
            )
        lead = v.shape[:-1]
        out = torch.zeros(*lead, len(self.labels), dtype=v.dtype, device=v.device)
        start = 0
        for n in self.param_names:
            size = self.shapes[n].numel()
            self._reduce_one(out, n, v[..., start : start + size].reshape(*lead, *self.shapes[n]))
            start += size
        return out

    # ------------------------------------------------------------------ conveniences
    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: object) -> bool:
        return label in self.labels

    def __iter__(self):
        return iter(self.labels)

    @property
    def sizes(self) -> dict[str, int]:
        """Number of parameter coordinates per component."""
        counts = torch.bincount(self.flat_index, minlength=len(self.labels)).tolist()
        return dict(zip(self.labels, counts))

    def mask(self, label: str) -> dict[str, Tensor]:
        """``{name: bool tensor}`` selecting the coordinates of one component."""
        cid = self.labels.index(label)
        return {n: self.index[n] == cid for n in self.param_names}

    def expand(self, v: Float[Tensor, "... component"]) -> dict[str, Tensor]:
        """Broadcast per-component values ``[..., C]`` back to ``{name: [..., *shape]}``."""
        return {n: v[..., self._on(f"i:{n}", self.index[n], v.device)] for n in self.param_names}

    def __repr__(self) -> str:
        shown = ", ".join(self.labels[:8]) + (", ..." if len(self.labels) > 8 else "")
        return (
            f"ComponentMap({len(self.labels)} components over {len(self.param_names)} parameters, "
            f"{self.flat_index.numel()} coordinates; frozen={len(self.frozen)}): [{shown}]"
        )


__all__ = ["ComponentMap", "GRANULARITIES"]
