"""One-call answers to the everyday questions, built on :func:`explaind_tl.explain`.

* :func:`component_influence` — how much did a head (or any component) move the metric, step by
  step, on a query set?
* :func:`top_training_examples` — which training examples drove a (component, query) pair?
* :func:`data_vs_weight_decay` — per component and step window, how much of the change came from
  training data and how much from weight decay (and momentum history, regularization)?

Every answer keeps its completeness certificate (``.completeness`` on the Attribution, or
``DataFrame.attrs["completeness"]``).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from explaind_tl.engine.api import explain


def component_influence(
    trajectory, queries: Any, component: str | list[str] | None = None, components: Any = "head",
    step_bins: int | None = None, **kwargs: Any,
):
    """Influence of components on the metric over time: ``Attribution[component, step]``.

    Args:
        trajectory: a recorded run or its run directory (see :func:`explain`).
        queries: the query set (see :func:`explain`).
        component: a label such as ``"L0H2"`` (or a list) to keep; ``None`` keeps all.
        components: granularity or ``ComponentMap`` (default ``"head"``).
        step_bins: width of step bins (``None``: every step).
        **kwargs: passed to :func:`explain` (``metric``, ``reduce``, ``steps``, ...).

    Returns:
        ``Attribution`` with dims ``("component", "step")`` (``("step",)`` for one label).
    """
    attr = explain(trajectory, queries, by=("component", "step"), components=components, step_bins=step_bins, **kwargs)
    return attr if component is None else attr.sel(component=component)


def top_training_examples(
    trajectory, queries: Any, component: str, k: int = 10, query: int | None = None,
    components: Any = "head", **kwargs: Any,
) -> pd.DataFrame:
    """The ``k`` training examples with the largest influence through ``component``.

    Args:
        trajectory: a recorded run or its run directory (see :func:`explain`).
        queries: the query set.
        component: component label, e.g. ``"L0H2"``.
        k: how many examples.
        query: restrict to one query (its index in ``queries``); ``None`` aggregates them
            (``reduce`` as in :func:`explain`).
        components: granularity or ``ComponentMap``.
        **kwargs: passed to :func:`explain`.

    Returns:
        DataFrame with columns ``train`` (example id) and ``value``, largest ``|value|`` first;
        pseudo-entries (history, weight decay, ...) are left out of the ranking.
    """
    by = ("component", "query", "train") if query is not None else ("component", "train")
    attr = explain(trajectory, queries, by=by, components=components, **kwargs).sel(component=component)
    if query is not None:
        attr = attr.sel(query=query)
    frame = attr.to_frame()
    frame = frame[frame["train"].map(lambda x: not isinstance(x, str))]
    frame = frame.reindex(frame["value"].abs().sort_values(ascending=False).index).head(k)
    frame = frame.reset_index(drop=True)
    frame.attrs["completeness"] = attr.completeness.summary() if attr.completeness is not None else None
    return frame


def data_vs_weight_decay(
    trajectory, queries: Any, components: Any = "head", step_bins: int | None = 100, **kwargs: Any,
) -> pd.DataFrame:
    """Per component and step window: the data, history, weight-decay and other sources.

    Args:
        trajectory: a recorded run or its run directory (see :func:`explain`).
        queries: the query set.
        components: granularity or ``ComponentMap``.
        step_bins: width of step bins.
        **kwargs: passed to :func:`explain`.

    Returns:
        Wide DataFrame indexed by ``(component, step)`` with one column per source
        (``data``, ``history``, ``weight_decay``, ``regularization``, ``update_residual``) and a
        ``total`` column.
    """
    attr = explain(trajectory, queries, by=("component", "source", "step"), components=components,
                   step_bins=step_bins, **kwargs)
    frame = attr.to_frame().pivot_table(index=["component", "step"], columns="source", values="value", sort=False)
    frame["total"] = frame.sum(axis=1)
    frame.attrs["completeness"] = attr.completeness.summary() if attr.completeness is not None else None
    return frame
