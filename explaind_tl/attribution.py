"""Labelled attribution tensors and their completeness certificate.

An :class:`Attribution` is a float64 tensor with named dims (a subset of ``"step"``,
``"component"``, ``"source"``, ``"query"``, ``"output"``, ``"train"``, in any order), labels per
dim (``coords``), the :class:`Completeness` certificate of the computation that produced it, and
free-form ``meta``. Selections and sums never rescale anything; the certificate always refers
to the whole computation (it is carried unchanged through ``sel``/``sum``/...).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

DIMS = ("step", "component", "source", "query", "output", "train")
PSEUDO_TRAIN = ("history", "weight_decay", "regularization", "update_residual")
_FORMAT = "explaind_tl.Attribution/1"
_HEAD = re.compile(r"^L(\d+)H(\d+)$")


def _t64(x: Any) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _max(x: Tensor) -> float:
    return float(x.max()) if x.numel() else 0.0


def _mean(x: Tensor) -> float:
    return float(x.mean()) if x.numel() else 0.0


def _rel(num: Tensor, den: Tensor) -> Tensor:
    """``|num| / |den|`` with a guard: denominators below 1e-12 of the largest count as that."""
    num, den = num.abs(), den.abs()
    if den.numel() == 0:
        return num
    floor = max(float(den.max()) * 1e-12, 1e-300)
    return num / den.clamp_min(floor)


@dataclass
class Completeness:
    """The certificate of an attribution: measured vs attributed change, total and per step.

    The verdict: step ``s`` passes when ``|step_residual[s, r]| <= step_bound[s, r]`` for every
    row ``r``; the certificate is ``ok`` when every step passes and the total residual is within
    ``total_bound``. ``step_bound`` is the bound :func:`explaind_tl.explain` compared each step
    against (``tol * |step change| + 16 * eps * Σ_p |φ_p Δ_p|``, see
    :func:`explaind_tl.quadrature.residual_tolerance`), summed over query chunks. A certificate
    without bounds (files saved by older versions) has ``ok``, ``step_ok`` and ``failed_steps``
    ``None``: unknown, not passed.

    Attributes:
        measured: ``[R]`` ``q(w_b) - q(w_a)`` per resolved row (``R = 1`` when aggregated).
        attributed: ``[R]`` sum of all entries of the attribution per row.
        step_measured: ``[S, R]`` ``q(w_{s+1}) - q(w_s)``.
        step_residual: ``[S, R]`` ``step_measured`` minus the attributed change of step ``s``.
        nodes: ``[S]`` quadrature nodes used per step.
        refined_steps: number of steps that needed more nodes than the starting number.
        update_residual: contribution of the update-reconstruction error (also an explicit
            entry of the values when there is a ``"source"``/``"train"`` axis).
        tol: the relative tolerance the steps were held to (``None``: not recorded).
        step_bound: ``[S, R]`` the bound each step's residual was compared against (``None``:
            not recorded).
        total_bound: ``[R]`` the bound of the total residual: the sum of the step bounds plus
            an allowance for the float64 rounding of assembling the entries (default, when
            ``step_bound`` is given: the sum of the step bounds).
        steps: ``[S]`` the step index of each row of the ``step_*`` tensors (default
            ``0 .. S-1``; :func:`explain` records ``a .. b-1``).
    """

    measured: Float[Tensor, " row"]
    attributed: Float[Tensor, " row"]
    step_measured: Float[Tensor, "step row"]
    step_residual: Float[Tensor, "step row"]
    nodes: Int[Tensor, " step"]
    refined_steps: int = 0
    update_residual: float = 0.0
    tol: float | None = None
    step_bound: Float[Tensor, "step row"] | None = None
    total_bound: Float[Tensor, " row"] | None = None
    steps: Int[Tensor, " step"] | None = None

    def __post_init__(self) -> None:
        self.measured = _t64(self.measured).reshape(-1)
        self.attributed = _t64(self.attributed).reshape(-1)
        self.step_measured = _t64(self.step_measured)
        self.step_residual = _t64(self.step_residual)
        if self.step_measured.ndim == 1:
            self.step_measured = self.step_measured[:, None]
        if self.step_residual.ndim == 1:
            self.step_residual = self.step_residual[:, None]
        self.nodes = torch.as_tensor(self.nodes, dtype=torch.long).reshape(-1)
        self.refined_steps = int(self.refined_steps)
        self.update_residual = float(self.update_residual)
        self.tol = None if self.tol is None else float(self.tol)
        n_steps = self.step_residual.shape[0]
        if self.step_bound is not None:
            self.step_bound = _t64(self.step_bound)
            if self.step_bound.ndim == 1:
                self.step_bound = self.step_bound[:, None]
            if self.step_bound.shape != self.step_residual.shape:
                raise ValueError(
                    f"step_bound has shape {tuple(self.step_bound.shape)} but step_residual "
                    f"{tuple(self.step_residual.shape)}"
                )
            if self.total_bound is None:
                self.total_bound = self.step_bound.sum(0)
        if self.total_bound is not None:
            self.total_bound = _t64(self.total_bound).reshape(-1)
            if self.total_bound.shape != self.measured.shape:
                raise ValueError(
                    f"total_bound has {self.total_bound.numel()} rows but measured {self.measured.numel()}"
                )
        if self.steps is None:
            self.steps = torch.arange(n_steps)
        self.steps = torch.as_tensor(self.steps, dtype=torch.long).reshape(-1)
        if self.steps.numel() != n_steps:
            raise ValueError(f"steps has {self.steps.numel()} entries but the certificate {n_steps} steps")

    @property
    def residual(self) -> Float[Tensor, " row"]:
        """``measured - attributed`` per row."""
        return self.measured - self.attributed

    # ------------------------------------------------------------------ verdict
    @property
    def step_ok(self) -> Bool[Tensor, " step"] | None:
        """``[S]`` whether every row of each step is within its bound (``None``: no bounds).

        A NaN residual or bound fails.
        """
        if self.step_bound is None:
            return None
        return (self.step_residual.abs() <= self.step_bound).all(-1)

    @property
    def total_ok(self) -> bool | None:
        """Whether every row's total residual is within ``total_bound`` (``None``: no bound)."""
        if self.total_bound is None:
            return None
        return bool((self.residual.abs() <= self.total_bound).all())

    @property
    def ok(self) -> bool | None:
        """True when every step and the total are within their bounds; ``None`` when unknown."""
        step_ok = self.step_ok
        if step_ok is None or self.total_bound is None:
            return None
        return bool(step_ok.all()) and bool(self.total_ok)

    @property
    def failed_steps(self) -> list[int] | None:
        """Step indices (``steps`` labels) whose residual exceeds its bound (``None``: unknown)."""
        step_ok = self.step_ok
        if step_ok is None:
            return None
        return self.steps[~step_ok].tolist()

    def worst(self) -> dict[str, float | int] | None:
        """The step entry with the largest ``|residual| / bound``.

        Returns:
            ``{"step", "row", "residual", "bound", "ratio"}`` (``residual`` absolute), or
            ``None`` without bounds or steps.
        """
        if self.step_bound is None or self.step_residual.numel() == 0:
            return None
        r = self.step_residual.abs()
        ratio = r / self.step_bound.clamp_min(1e-300)
        ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)
        i = int(torch.argmax(ratio))
        s, row = divmod(i, r.shape[1])
        return {
            "step": int(self.steps[s]),
            "row": row,
            "residual": float(r[s, row]),
            "bound": float(self.step_bound[s, row]),
            "ratio": float(ratio[s, row]),
        }

    def verdict(self) -> str:
        """One line: whether the certificate holds, and where it does not."""
        ok = self.ok
        if ok is None:
            return "certificate: not checked (no bounds recorded; saved by an older version?)"
        tol = f"tol={self.tol:.3g}" if self.tol is not None else "its tolerance"
        if ok:
            return f"certificate: OK, all {len(self.steps)} steps and the total within their bounds ({tol})"
        failed = self.failed_steps or []
        w = self.worst()
        parts = [f"certificate: FAILED, {len(failed)} of {len(self.steps)} steps above their bound ({tol})"]
        if failed:
            shown = ", ".join(str(s) for s in failed[:10]) + (", ..." if len(failed) > 10 else "")
            parts.append(
                f"steps [{shown}]; worst: step {w['step']}, |residual| {w['residual']:.3g} > bound "
                f"{w['bound']:.3g}"
            )
        if not self.total_ok:
            r = int(torch.argmax(self.residual.abs() / self.total_bound.clamp_min(1e-300)))
            parts.append(
                f"total |residual| {float(self.residual[r].abs()):.3g} above its bound "
                f"{float(self.total_bound[r]):.3g}"
            )
        return "; ".join(parts)

    def summary(self) -> dict[str, float | int | bool | None]:
        """Absolute and relative residuals of the total and per step, and the verdict.

        Returns:
            dict with ``total_max_abs``, ``total_mean_abs``, ``total_max_rel``, ``total_mean_rel``
            (per row, relative to ``|measured|``), ``total_rel`` (``Σ|residual| / Σ|measured|``
            over rows), ``step_max_abs``, ``step_mean_abs``, ``step_max_rel``, ``step_mean_rel``
            (per step and row, relative to ``|step_measured|``; denominators are floored at
            1e-12 of the largest), ``refined_steps``, ``max_nodes``, ``update_residual``,
            ``tol``, ``ok`` (``None``: unknown), ``failed_steps`` (how many; ``None``: unknown)
            and ``step_max_ratio`` (largest ``|residual| / bound``; ``None``: unknown).
        """
        tot = self.residual.abs()
        trel = _rel(tot, self.measured)
        den = float(self.measured.abs().sum())
        total_rel = (
            float(tot.sum()) / den if den > 0 else (0.0 if float(tot.sum()) == 0 else math.inf)
        )
        sr = self.step_residual.abs()
        srel = _rel(sr, self.step_measured)
        failed = self.failed_steps
        worst = self.worst()
        return {
            "total_max_abs": _max(tot),
            "total_mean_abs": _mean(tot),
            "total_max_rel": _max(trel),
            "total_mean_rel": _mean(trel),
            "total_rel": total_rel,
            "step_max_abs": _max(sr),
            "step_mean_abs": _mean(sr),
            "step_max_rel": _max(srel),
            "step_mean_rel": _mean(srel),
            "refined_steps": self.refined_steps,
            "max_nodes": int(self.nodes.max()) if self.nodes.numel() else 0,
            "update_residual": self.update_residual,
            "tol": self.tol,
            "ok": self.ok,
            "failed_steps": None if failed is None else len(failed),
            "step_max_ratio": None if worst is None else worst["ratio"],
        }

    def to_frame(self):
        """Per-step ``pandas.DataFrame``: one row per (step, row) with ``step``, ``row``,
        ``measured``, ``residual``, ``bound`` (NaN when not recorded), ``ok`` (``None`` when
        not recorded) and ``nodes``."""
        import pandas as pd

        S, R = self.step_residual.shape
        bound = self.step_bound if self.step_bound is not None else torch.full((S, R), math.nan, dtype=torch.float64)
        ok = (
            (self.step_residual.abs() <= self.step_bound).reshape(-1).tolist()
            if self.step_bound is not None
            else [None] * (S * R)
        )
        return pd.DataFrame(
            {
                "step": self.steps.repeat_interleave(R).numpy(),
                "row": torch.arange(R).repeat(S).numpy(),
                "measured": self.step_measured.reshape(-1).numpy(),
                "residual": self.step_residual.reshape(-1).numpy(),
                "bound": bound.reshape(-1).numpy(),
                "ok": pd.Series(ok, dtype=object),
                "nodes": self.nodes.repeat_interleave(R).numpy(),
            }
        )

    def _rows(self) -> list[tuple[str, str, str]]:
        s = self.summary()
        return [
            ("total", f"{s['total_max_abs']:.3g}", f"{s['total_max_rel']:.3g}"),
            ("per step (max)", f"{s['step_max_abs']:.3g}", f"{s['step_max_rel']:.3g}"),
            ("per step (mean)", f"{s['step_mean_abs']:.3g}", f"{s['step_mean_rel']:.3g}"),
        ]

    def _tail(self) -> str:
        s = self.summary()
        return (
            f"measured {float(self.measured.sum()):.6g}, attributed {float(self.attributed.sum()):.6g}; "
            f"{self.step_measured.shape[0]} steps, refined {s['refined_steps']}, max nodes "
            f"{s['max_nodes']}, update residual {s['update_residual']:.3g}"
        )

    def __str__(self) -> str:
        lines = [f"{'residual':<16}{'abs':>12}{'rel':>12}"]
        lines += [f"{a:<16}{b:>12}{c:>12}" for a, b, c in self._rows()]
        lines.append(self._tail())
        lines.append(self.verdict())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in self._rows())
        ok = self.ok
        color = "gray" if ok is None else ("green" if ok else "red")
        return (
            "<table><tr><th>residual</th><th>abs</th><th>rel</th></tr>"
            f"{rows}</table><p>{self._tail()}</p>"
            f'<p style="color:{color}"><b>{html.escape(self.verdict())}</b></p>'
        )

    def to_tensors(self, prefix: str = "completeness/") -> dict[str, Tensor]:
        out = {
            f"{prefix}measured": self.measured.contiguous(),
            f"{prefix}attributed": self.attributed.contiguous(),
            f"{prefix}step_measured": self.step_measured.contiguous(),
            f"{prefix}step_residual": self.step_residual.contiguous(),
            f"{prefix}nodes": self.nodes.contiguous(),
            f"{prefix}steps": self.steps.contiguous(),
        }
        if self.step_bound is not None:
            out[f"{prefix}step_bound"] = self.step_bound.contiguous()
        if self.total_bound is not None:
            out[f"{prefix}total_bound"] = self.total_bound.contiguous()
        return out

    def scalars(self) -> dict[str, Any]:
        """The JSON-able scalars that :meth:`to_tensors` leaves out."""
        return {"refined_steps": self.refined_steps, "update_residual": self.update_residual, "tol": self.tol}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, Tensor], scalars: dict, prefix: str = "completeness/",
        first_step: int = 0,
    ) -> Completeness:
        """Inverse of :meth:`to_tensors` (+ :meth:`scalars`). Tensors missing from older files
        stay ``None`` (verdict unknown); ``first_step`` labels the steps when they are absent."""
        S = tensors[f"{prefix}step_residual"].shape[0]
        steps = tensors.get(f"{prefix}steps")
        return cls(
            measured=tensors[f"{prefix}measured"],
            attributed=tensors[f"{prefix}attributed"],
            step_measured=tensors[f"{prefix}step_measured"],
            step_residual=tensors[f"{prefix}step_residual"],
            nodes=tensors[f"{prefix}nodes"],
            refined_steps=scalars.get("refined_steps", 0),
            update_residual=scalars.get("update_residual", 0.0),
            tol=scalars.get("tol"),
            step_bound=tensors.get(f"{prefix}step_bound"),
            total_bound=tensors.get(f"{prefix}total_bound"),
            steps=steps if steps is not None else torch.arange(first_step, first_step + S),
        )


# --------------------------------------------------------------------------------------------
# JSON helpers (coords and meta)
# --------------------------------------------------------------------------------------------


def _py(x: Any) -> Any:
    """Coordinate label -> plain Python int/float/str/bool/None."""
    if isinstance(x, Tensor):
        return x.item()
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):  # numpy scalars
        return x.item()
    return x


def _encode_meta(x: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(x, Tensor):
        key = f"meta/{len(tensors)}"
        tensors[key] = x.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(x, dict):
        return {str(k): _encode_meta(v, tensors) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode_meta(v, tensors) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def _decode_meta(x: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__tensor__"}:
            return tensors[x["__tensor__"]]
        return {k: _decode_meta(v, tensors) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode_meta(v, tensors) for v in x]
    return x


# --------------------------------------------------------------------------------------------
# Attribution
# --------------------------------------------------------------------------------------------


@dataclass
class Attribution:
    """A labelled float64 attribution tensor.

    Attributes:
        values: float64 tensor with one axis per entry of ``dims``.
        dims: dim names, a subset of ``("step", "component", "source", "query", "output",
            "train")`` in any order.
        coords: labels per dim: ``"step"`` ints (step index or bin start), ``"component"``
            strs, ``"source"`` strs, ``"train"`` int example ids and str pseudo-entries,
            ``"query"``/``"output"`` ints or strs. A missing dim defaults to ``range(size)``.
        completeness: the certificate (see :class:`Completeness`), or None.
        meta: free-form (metric, window, node counts, timings...).
    """

    values: Tensor
    dims: tuple[str, ...]
    coords: dict[str, list] = field(default_factory=dict)
    completeness: Completeness | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = torch.as_tensor(self.values).detach().cpu()
        if values.dtype != torch.float64:
            values = values.to(torch.float64)
        self.values = values
        self.dims = (self.dims,) if isinstance(self.dims, str) else tuple(self.dims)
        if len(set(self.dims)) != len(self.dims):
            raise ValueError(f"repeated dims {self.dims}")
        if values.ndim != len(self.dims):
            raise ValueError(f"values have {values.ndim} axes but dims are {self.dims}")
        coords = {}
        for i, d in enumerate(self.dims):
            labels = self.coords.get(d)
            labels = list(range(values.shape[i])) if labels is None else [_py(c) for c in labels]
            if len(labels) != values.shape[i]:
                raise ValueError(f"dim {d!r} has size {values.shape[i]} but {len(labels)} coords")
            coords[d] = labels
        extra = [d for d in self.coords if d not in self.dims]
        if extra:
            raise ValueError(f"coords given for dims {extra} that are not in dims {self.dims}")
        self.coords = coords
        self.meta = dict(self.meta or {})

    # ------------------------------------------------------------------ basics
    @property
    def sizes(self) -> dict[str, int]:
        """``{dim: size}``."""
        return dict(zip(self.dims, self.values.shape))

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def total(self) -> float:
        """Sum of all values."""
        return float(self.values.sum())

    def __float__(self) -> float:
        return self.total()

    def _new(self, values: Tensor, dims: Sequence[str], coords: dict[str, list]) -> Attribution:
        return Attribution(values, tuple(dims), coords, self.completeness, dict(self.meta))

    def _axis(self, dim: str) -> int:
        if dim not in self.dims:
            raise KeyError(f"no dim {dim!r}; dims are {self.dims}")
        return self.dims.index(dim)

    # ------------------------------------------------------------------ selection
    def _positions(self, dim: str, key: Any) -> tuple[list[int] | int, bool]:
        """Positions for a label-based key; the bool says whether the dim is kept."""
        labels = self.coords[dim]
        if isinstance(key, slice):
            if key.step is not None:
                raise ValueError("sel: slices select a value range [start, stop); no step allowed")
            try:
                pos = [
                    i
                    for i, c in enumerate(labels)
                    if (key.start is None or c >= key.start) and (key.stop is None or c < key.stop)
                ]
            except TypeError as err:
                raise TypeError(
                    f"sel: dim {dim!r} has labels that cannot be compared with {key}; use isel"
                ) from err
            return pos, True
        lookup = {(type(c) is str, c): i for i, c in enumerate(labels)}

        def find(k: Any) -> int:
            k = _py(k)
            i = lookup.get((type(k) is str, k))
            if i is None:
                shown = labels[:10] + (["..."] if len(labels) > 10 else [])
                raise KeyError(f"label {k!r} not in dim {dim!r} (labels: {shown})")
            return i

        if isinstance(key, (list, tuple, range)) or (isinstance(key, Tensor) and key.ndim == 1):
            return [find(k) for k in key], True
        return find(key), False

    def _take(self, sel: dict[str, tuple[list[int] | int, bool]]) -> Attribution:
        values = self.values
        dims = list(self.dims)
        coords = {d: list(c) for d, c in self.coords.items()}
        for d, (pos, keep) in sel.items():
            ax = dims.index(d)
            if keep:
                idx = torch.as_tensor(pos, dtype=torch.long)
                values = values.index_select(ax, idx)
                coords[d] = [coords[d][i] for i in pos]
            else:
                values = values.select(ax, pos)
                dims.pop(ax)
                coords.pop(d)
        return self._new(values, dims, coords)

    def sel(self, **kw: Any) -> Attribution:
        """Select by label.

        ``attr.sel(component="L0H1")`` drops the dim, ``sel(component=["L0H1", "L0H2"])`` keeps
        it, ``sel(step=slice(400, 900))`` keeps the steps with labels in ``[400, 900)`` (value
        range on labels that compare, e.g. ints).
        """
        for d in kw:
            self._axis(d)
        return self._take({d: self._positions(d, k) for d, k in kw.items()})

    def isel(self, **kw: Any) -> Attribution:
        """Select by position: int drops the dim, list/slice/range keeps it."""
        sel = {}
        for d, k in kw.items():
            n = self.values.shape[self._axis(d)]
            if isinstance(k, slice):
                sel[d] = (list(range(n))[k], True)
            elif isinstance(k, (list, tuple, range)) or (isinstance(k, Tensor) and k.ndim == 1):
                sel[d] = ([int(i) % n for i in k], True)
            else:
                i = int(k)
                if not -n <= i < n:
                    raise IndexError(f"isel: position {i} out of range for dim {d!r} of size {n}")
                sel[d] = (i % n, False)
        return self._take(sel)

    # ------------------------------------------------------------------ reductions
    def sum(self, dim: str | Sequence[str] | None = None) -> Attribution:
        """Sum over one dim, several dims, or (``None``) all dims (a 0-d Attribution)."""
        dims = list(self.dims) if dim is None else ([dim] if isinstance(dim, str) else list(dim))
        axes = [self._axis(d) for d in dims]
        values = self.values.sum(dim=axes) if axes else self.values.clone()
        keep = [d for d in self.dims if d not in dims]
        return self._new(values, keep, {d: self.coords[d] for d in keep})

    def cumsum(self, dim: str = "step") -> Attribution:
        """Cumulative sum along ``dim`` (labels unchanged)."""
        return self._new(self.values.cumsum(self._axis(dim)), self.dims, self.coords)

    def keep(self, *dims: str) -> Attribution:
        """Sum every dim except ``dims`` and order the result as ``dims``."""
        for d in dims:
            self._axis(d)
        return self.sum([d for d in self.dims if d not in dims]).transpose(*dims)

    def transpose(self, *dims: str) -> Attribution:
        """Reorder dims (all of them)."""
        if sorted(dims) != sorted(self.dims):
            raise ValueError(f"transpose needs a permutation of {self.dims}, got {dims}")
        values = self.values.permute(*[self.dims.index(d) for d in dims])
        return self._new(values, dims, self.coords)

    def heads(
        self,
        *,
        return_labels: bool = False,
        keep: str | Sequence[str] | None = None,
        fill: float = 0.0,
    ) -> Tensor | tuple[Tensor, list[list[str]]]:
        """Per-head values on a ``[n_layers, n_heads]`` grid from ``"L{l}H{h}"`` components.

        Args:
            return_labels: also return the grid of labels (``[[f"L{l}H{h}", ...], ...]``).
            keep: dims to keep in front of the grid (default none: every other dim is summed).
            fill: value for heads absent from the component axis.

        Returns:
            ``[*keep, n_layers, n_heads]`` float64 tensor (and labels). ``n_layers``/``n_heads``
            come from ``meta["n_layers"]``/``meta["n_heads"]`` when present, else from the labels.
        """
        keep = [] if keep is None else ([keep] if isinstance(keep, str) else list(keep))
        if "component" in keep:
            raise ValueError("heads(): 'component' becomes the grid; it cannot be kept")
        red = self.keep(*keep, "component")
        found = [(i, _HEAD.match(str(c))) for i, c in enumerate(red.coords["component"])]
        found = [(i, int(m.group(1)), int(m.group(2))) for i, m in found if m]
        if not found:
            raise ValueError(
                "heads(): no 'L{l}H{h}' components (use components='head' or 'neuron')"
            )
        n_layers = int(self.meta.get("n_layers") or max(lay for _, lay, _ in found) + 1)
        n_heads = int(self.meta.get("n_heads") or max(h for _, _, h in found) + 1)
        lead = red.values.shape[:-1]
        grid = torch.full((*lead, n_layers, n_heads), float(fill), dtype=torch.float64)
        for i, lay, h in found:
            grid[..., lay, h] = red.values[..., i]
        if return_labels:
            labels = [[f"L{lay}H{h}" for h in range(n_heads)] for lay in range(n_layers)]
            return grid, labels
        return grid

    def top(
        self,
        k: int = 10,
        dim: str = "component",
        by_abs: bool = True,
        *,
        exclude: Iterable[Any] = (),
        as_frame: bool = True,
    ):
        """The ``k`` largest entries along ``dim`` after summing every other dim.

        Args:
            k: how many.
            dim: the dim to rank.
            by_abs: rank by absolute value (else by signed value, largest first).
            exclude: labels to leave out (e.g. ``PSEUDO_TRAIN`` on the ``"train"`` dim).
            as_frame: return a ``pandas.DataFrame`` with columns ``[dim, "value"]`` (else a list
                of ``(label, value)``).
        """
        red = self.keep(dim)
        labels, vals = red.coords[dim], red.values
        skip = {(type(_py(e)) is str, _py(e)) for e in exclude}
        pos = [i for i, c in enumerate(labels) if (type(c) is str, c) not in skip]
        sub = vals[pos]
        order = torch.argsort(sub.abs() if by_abs else sub, descending=True, stable=True)[
            :k
        ].tolist()
        rows = [(labels[pos[i]], float(sub[i])) for i in order]
        if not as_frame:
            return rows
        import pandas as pd

        return pd.DataFrame(rows, columns=[dim, "value"])

    # ------------------------------------------------------------------ export
    def to_frame(self):
        """Long ``pandas.DataFrame``: one row per cell, one column per dim, plus ``"value"``."""
        import pandas as pd

        data: dict[str, Any] = {}
        sizes = list(self.values.shape)
        n = int(torch.tensor(sizes).prod()) if sizes else 1
        for i, d in enumerate(self.dims):
            inner = int(torch.tensor(sizes[i + 1 :]).prod()) if i + 1 < len(sizes) else 1
            outer = n // (inner * sizes[i]) if sizes[i] else 0
            labels = self.coords[d]
            col = [labels[j] for j in range(sizes[i]) for _ in range(inner)] * outer
            data[d] = pd.Series(
                col, dtype=object if any(isinstance(c, str) for c in labels) else None
            )
        data["value"] = self.values.reshape(-1).numpy()
        return pd.DataFrame(data)

    def to_xarray(self):
        """An ``xarray.DataArray`` (needs xarray installed; it is not a dependency)."""
        try:
            import xarray as xr
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("to_xarray() needs xarray (pip install xarray)") from err
        return xr.DataArray(
            self.values.numpy(),
            dims=self.dims,
            coords={d: list(self.coords[d]) for d in self.dims},
            attrs={k: v for k, v in self.meta.items() if isinstance(v, (str, int, float))},
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file: values (and certificate tensors) + JSON header metadata.

        Dims, coords (ints and strs preserved), meta (tensors in it are stored as tensors) and
        the completeness scalars go in the file's metadata as JSON. The write is atomic.
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, Tensor] = {"values": self.values.detach().cpu().contiguous()}
        header: dict[str, Any] = {
            "format": _FORMAT,
            "dims": list(self.dims),
            "coords": {d: [_py(c) for c in self.coords[d]] for d in self.dims},
            "meta": _encode_meta(self.meta, tensors),
            "completeness": None,
        }
        if self.completeness is not None:
            tensors.update(self.completeness.to_tensors())
            header["completeness"] = self.completeness.scalars()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"explaind_tl": json.dumps(header)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Attribution:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
        if "explaind_tl" not in md:
            raise ValueError(f"{path} is not an explaind_tl Attribution file")
        header = json.loads(md["explaind_tl"])
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path}: unsupported format {header.get('format')!r}")
        tensors = load_file(str(path))
        completeness = None
        if header.get("completeness") is not None:
            window = header.get("meta", {}).get("window")
            first = int(window[0]) if isinstance(window, list) and window else 0
            completeness = Completeness.from_tensors(tensors, header["completeness"], first_step=first)
        return cls(
            values=tensors["values"],
            dims=tuple(header["dims"]),
            coords=header["coords"],
            completeness=completeness,
            meta=_decode_meta(header["meta"], tensors),
        )

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        dims = ", ".join(f"{d}: {n}" for d, n in self.sizes.items()) or "scalar"
        s = f"Attribution({dims}; total={self.total():.6g})"
        if self.completeness is not None:
            c = self.completeness.summary()
            s += (
                f"\n  completeness: total rel residual {c['total_rel']:.3g}, step max rel "
                f"{c['step_max_rel']:.3g} (abs {c['step_max_abs']:.3g}), refined steps "
                f"{c['refined_steps']}, max nodes {c['max_nodes']}, update residual "
                f"{c['update_residual']:.3g}\n  {self.completeness.verdict()}"
            )
        return s

    def _repr_html_(self) -> str:
        dims = ", ".join(f"{d}: {n}" for d, n in self.sizes.items()) or "scalar"
        html = f"<p><b>Attribution</b> ({dims}); total = {self.total():.6g}</p>"
        if self.completeness is not None:
            html += self.completeness._repr_html_()
        return html


__all__ = ["Attribution", "Completeness", "DIMS", "PSEUDO_TRAIN"]
