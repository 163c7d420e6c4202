"""Labelled attribution tensors and their completeness certificate.

An :class:`Attribution` is a float64 tensor with named dims (a subset of ``"step"``,
``"component"``, ``"source"``, ``"query"``, ``"output"``, ``"position"``, ``"train"``,
``"train_position"``, in any order), labels per
dim (``coords``), the :class:`Completeness` certificate of the computation that produced it, and
free-form ``meta``. Selections and sums never rescale anything; the certificate always refers
to the whole computation (it is carried unchanged through ``sel``/``sum``/...).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from explaind_tl.certificate import Completeness

_FORMAT = "explaind_tl.Attribution/1"
_HEAD = re.compile(r"^L(\d+)H(\d+)$")


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
        dims: dim names, a subset of ``("step", "component", "source", "query", "output", "position",
            "train", "train_position")`` in any order.
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
            exclude: labels to leave out (e.g. :data:`explaind_tl.axes.PSEUDO` on the ``"train"`` dim).
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


__all__ = ["Attribution", "Completeness"]
