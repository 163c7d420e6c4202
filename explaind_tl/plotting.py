"""Static matplotlib figures of an :class:`~explaind_tl.attribution.Attribution`.

Every function returns the ``matplotlib.figure.Figure`` and, when ``path`` is given, saves a PNG
of exactly ``figsize * dpi`` pixels (no tight bounding box). matplotlib is imported lazily with
the Agg backend, so importing this module is free.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from explaind_tl.attribution import Attribution
from explaind_tl.axes import PSEUDO

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure


def _figure(figsize: tuple[float, float], dpi: int) -> Figure:
    from matplotlib.figure import Figure

    # A bare Figure (not pyplot): PNGs are rendered by the Agg canvas whatever the global backend
    # is, no pyplot state is touched (a user's notebook backend stays as it is), and the figure is
    # garbage-collected normally.
    return Figure(figsize=figsize, dpi=dpi, layout="constrained")


def _save(fig: Figure, path: str | os.PathLike | None) -> None:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=fig.dpi, format="png")


def _ticks(labels: list[Any], max_ticks: int) -> tuple[list[int], list[str]]:
    n = len(labels)
    stride = max(1, -(-n // max_ticks))
    pos = list(range(0, n, stride))
    return pos, [str(labels[i]) for i in pos]


def _need(attr: Attribution, *dims: str) -> None:
    missing = [d for d in dims if d not in attr.dims]
    if missing:
        raise ValueError(
            f"this plot needs dims {dims}; the attribution has {attr.dims} (missing {missing})"
        )


def _at_bin_ends(steps: list[int], cum: torch.Tensor, meta: dict) -> tuple[list, torch.Tensor]:
    """Cumulative sums through bin ``[s, s + w)`` describe ``w_{s+w}``: plot them at ``s + w``.

    Prepends the window start with 0 so the curves start at zero. ``w`` is ``meta["step_bins"]``,
    else the spacing of the step labels (1 for a single step).
    """
    if not steps or not all(isinstance(s, (int, float)) for s in steps):
        return list(steps), cum
    width = meta.get("step_bins") or (steps[1] - steps[0] if len(steps) > 1 else 1)
    xs = [steps[0]] + [
        min(s + width, steps[i + 1]) if i + 1 < len(steps) else s + width
        for i, s in enumerate(steps)
    ]
    zero = torch.zeros(*cum.shape[:-1], 1, dtype=cum.dtype)
    return xs, torch.cat([zero, cum], dim=-1)


def plot_component_heatmap(
    attr: Attribution,
    path: str | os.PathLike | None = None,
    *,
    figsize: tuple[float, float] = (8.0, 5.0),
    dpi: int = 100,
    cmap: str = "RdBu_r",
    title: str | None = None,
) -> Figure:
    """Component x step heatmap (every other dim summed), diverging colormap centred at 0.

    Args:
        attr: needs dims ``"component"`` and ``"step"``.
        path: where to write the PNG (optional).
        figsize, dpi: figure size in inches and resolution (PNG is ``figsize * dpi`` pixels).
        cmap: a diverging colormap.
        title: default ``"attribution per component and step"`` plus the metric.
    """
    _need(attr, "component", "step")
    red = attr.keep("component", "step")
    vals = red.values.numpy()
    vmax = float(abs(vals).max()) if vals.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot()
    im = ax.imshow(vals, aspect="auto", cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    steps, comps = red.coords["step"], red.coords["component"]
    xp, xl = _ticks(steps, 10)
    yp, yl = _ticks(comps, 30)
    ax.set_xticks(xp, xl)
    ax.set_yticks(yp, yl, fontsize=7 if len(yp) > 15 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("component")
    metric = attr.meta.get("metric")
    ax.set_title(
        title or ("attribution per component and step" + (f" ({metric})" if metric else ""))
    )
    fig.colorbar(im, ax=ax, label="contribution to the change of the query")
    _save(fig, path)
    return fig


def plot_cumulative_influence(
    attr: Attribution,
    accuracy: pd.DataFrame | None = None,
    path: str | os.PathLike | None = None,
    *,
    components: list[str] | None = None,
    top: int = 8,
    figsize: tuple[float, float] = (9.0, 5.0),
    dpi: int = 100,
    title: str | None = None,
) -> Figure:
    """Cumulative influence per component over steps, with optional accuracy curves.

    The cumulative sum through step bin ``[s, s + w)`` is the change of the query from the
    window start to ``w_{s+w}``, so it is drawn at ``s + w`` (curves start at 0 at the window
    start), aligned with accuracies measured at those parameters.

    Args:
        attr: needs ``"step"``; with ``"component"`` one line per component (the ``top`` with
            the largest final |cumulative influence|, or ``components``), the rest summed as
            ``"other"``; without it a single total line.
        accuracy: optional DataFrame with column ``"step"`` and any of ``"train_acc"``,
            ``"test_acc"``, drawn on a twin axis.
        path: where to write the PNG (optional).
        components: which components to draw (default: the ``top`` largest).
        top: number of components when ``components`` is None.
    """
    _need(attr, "step")
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot()
    if "component" in attr.dims:
        cum = attr.keep("component", "step").cumsum("step")
        labels = cum.coords["component"]
        vals = cum.values
        if components is None:
            order = torch.argsort(vals[:, -1].abs(), descending=True, stable=True)[:top].tolist()
        else:
            missing = [c for c in components if c not in labels]
            if missing:
                raise KeyError(f"components {missing} not in the attribution")
            order = [labels.index(c) for c in components]
        steps, vals = _at_bin_ends(cum.coords["step"], vals, attr.meta)
        for i in order:
            ax.plot(steps, vals[i].numpy(), label=str(labels[i]), lw=1.5)
        rest = [i for i in range(len(labels)) if i not in order]
        if rest:
            ax.plot(steps, vals[rest].sum(0).numpy(), label="other", color="0.5", lw=1, ls="--")
        ax.plot(steps, vals.sum(0).numpy(), label="total", color="k", lw=2)
    else:
        cum = attr.keep("step").cumsum("step")
        steps, vals = _at_bin_ends(cum.coords["step"], cum.values[None], attr.meta)
        ax.plot(steps, vals[0].numpy(), label="total", color="k", lw=2)
    ax.axhline(0.0, color="0.8", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cumulative influence")
    handles, names = ax.get_legend_handles_labels()
    if accuracy is not None:
        if "step" not in accuracy.columns:
            raise ValueError("accuracy needs a 'step' column")
        ax2 = ax.twinx()
        for col, style in (("train_acc", ":"), ("test_acc", "-.")):
            if col in accuracy.columns:
                ax2.plot(accuracy["step"], accuracy[col], ls=style, color="tab:gray", label=col)
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(-0.02, 1.02)
        h2, n2 = ax2.get_legend_handles_labels()
        handles, names = handles + h2, names + n2
    ax.legend(handles, names, fontsize=7, loc="best", ncol=2)
    metric = attr.meta.get("metric")
    ax.set_title(
        title or ("cumulative influence per component" + (f" ({metric})" if metric else ""))
    )
    _save(fig, path)
    return fig


def plot_top_examples(
    attr: Attribution,
    component: str | None = None,
    k: int = 10,
    path: str | os.PathLike | None = None,
    *,
    include_pseudo: bool = False,
    by_abs: bool = True,
    figsize: tuple[float, float] = (8.0, 4.0),
    dpi: int = 100,
    title: str | None = None,
) -> Figure:
    """Bar chart of the top-``k`` training examples for one component (e.g. a head).

    Args:
        attr: needs the ``"train"`` dim (``explain(..., by=("component", "train"))``).
        component: label to select on the ``"component"`` dim (None: sum over components).
        k: number of examples.
        path: where to write the PNG (optional).
        include_pseudo: also rank the pseudo-entries (``"history"``, ``"weight_decay"``...).
        by_abs: rank by |value|.
    """
    _need(attr, "train")
    sub = attr
    if component is not None:
        _need(attr, "component")
        sub = attr.sel(component=component)
    rows = sub.top(
        k,
        dim="train",
        by_abs=by_abs,
        exclude=() if include_pseudo else PSEUDO,
        as_frame=False,
    )
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot()
    names = [str(lbl) for lbl, _ in rows]
    vals = [v for _, v in rows]
    colors = ["tab:red" if v > 0 else "tab:blue" for v in vals]
    ax.bar(range(len(vals)), vals, color=colors)
    ax.set_xticks(range(len(vals)), names, rotation=45 if len(vals) > 8 else 0, fontsize=8)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("training example")
    ax.set_ylabel("contribution")
    ax.set_title(title or f"top {k} training examples" + (f" for {component}" if component else ""))
    _save(fig, path)
    return fig


__all__ = ["plot_component_heatmap", "plot_cumulative_influence", "plot_top_examples"]
