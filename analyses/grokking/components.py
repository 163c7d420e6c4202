"""Per-component ExPLAIND influence over the run, and its split into data and weight decay.

One call of :func:`explaind_tl.explain` per query set with ``by=("step", "component",
"source")``, ``components="head"`` and ``reduce="mean"``: the change of the mean metric (default
the log-probability of the correct answer) over the whole run, written exactly as a sum over
step bins, components (``embed``, ``pos_embed``, each head ``L0H{h}``, ``L0.attn.b_O``,
``L0.mlp``, ``unembed``) and sources of the update:

* ``data`` + ``history``: the gradient signal (this step's gradients and, through momentum,
  earlier steps' gradients) — "data" in the tables below;
* ``weight_decay``: AdamW's decoupled decay ``-lr * wd * w_s``;
* ``update_residual``: floating-point difference between the reconstructed and the stored
  update (tiny; kept so totals stay exact).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from explaind_tl.attribution import Attribution

    from .phases import Phases

__all__ = [
    "COMPONENT_GROUPS",
    "component_group",
    "component_influence",
    "influence_table",
    "phase_shares",
]

DATA_SOURCES = ("data", "history", "regularization")
COMPONENT_GROUPS = ("embed/unembed", "attention", "mlp")


def component_group(label: str) -> str:
    """``"embed/unembed"`` (embed, pos_embed, unembed), ``"mlp"`` or ``"attention"``."""
    if label in ("embed", "pos_embed", "unembed"):
        return "embed/unembed"
    if "mlp" in label or re.fullmatch(r"L\d+N\d+", label):
        return "mlp"
    return "attention"


def component_influence(
    trajectory: Any,
    queries: dict,
    *,
    step_bin: int,
    metric: str = "correct_logprob",
    components: Any = "head",
    dtype: Any = None,
    progress: bool = True,
) -> Attribution:
    """``explain(by=("step", "component", "source"), reduce="mean")`` over the whole run.

    Args:
        trajectory: The recorded run.
        queries: ``{"tokens": [Q, 3], "label": [Q]}``.
        step_bin: Width of the step bins.
        metric: Query metric (see :func:`explaind_tl.explain`).
        components: Component granularity or map.
        dtype: Working dtype of the gradients (``None``: the engine's float32 default;
            ``torch.float64`` for memorised training examples, whose log-probs saturate near 0
            so that float32 gradients carry ~1e-4 relative rounding error).
        progress: Show the engine's progress bar.
    """
    import explaind_tl

    return explaind_tl.explain(
        trajectory,
        queries,
        metric=metric,
        by=("step", "component", "source"),
        components=components,
        reduce="mean",
        step_bins=step_bin,
        dtype=dtype,
        progress=progress,
    )


def _sources(attr: Attribution) -> tuple[Any, Any]:
    """``(data [C, S], weight_decay [C, S])`` value tensors (component x step)."""
    import torch

    a = attr.transpose("component", "step", "source")
    src = a.coords["source"]
    data = torch.zeros(a.values.shape[:2], dtype=torch.float64)
    wd = torch.zeros_like(data)
    for i, s in enumerate(src):
        if s in DATA_SOURCES:
            data += a.values[..., i]
        elif s == "weight_decay":
            wd += a.values[..., i]
    return data, wd


def influence_table(attr: Attribution, phases: Phases | None = None) -> pd.DataFrame:
    """One row per component: total influence, data vs weight decay, and per-phase totals.

    Columns: ``component, group, total, data, weight_decay, wd_share`` (``|wd| / (|data| +
    |wd|)``), ``abs_share`` (share of the summed absolute per-bin influence) and, with
    ``phases``, one ``phase:<name>`` column per phase (steps binned by bin start).
    """
    import pandas as pd

    a = attr.transpose("component", "step", "source")
    data, wd = _sources(a)
    total = a.values.sum(-1)  # [C, S]
    abs_all = total.abs().sum()
    steps = a.coords["step"]
    rows = []
    for i, c in enumerate(a.coords["component"]):
        d, w = float(data[i].sum()), float(wd[i].sum())
        row = {
            "component": c,
            "group": component_group(str(c)),
            "total": float(total[i].sum()),
            "data": d,
            "weight_decay": w,
            "wd_share": abs(w) / (abs(d) + abs(w)) if (abs(d) + abs(w)) > 0 else 0.0,
            "abs_share": float(total[i].abs().sum() / abs_all) if abs_all > 0 else 0.0,
        }
        if phases is not None:
            for name, (lo, hi) in phases.intervals().items():
                idx = [j for j, s in enumerate(steps) if lo <= int(s) < hi]
                row[f"phase:{name}"] = float(total[i, idx].sum()) if idx else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def phase_shares(attr: Attribution, phases: Phases) -> pd.DataFrame:
    """Share of each component group in the absolute influence per phase, and weight decay's share.

    Returns:
        One row per phase: ``phase, start, stop, change`` (net change of the metric),
        ``share:<group>`` (``sum |influence|`` of the group's components over the phase's bins
        divided by that of all components), ``data``, ``weight_decay`` and ``wd_abs_share``.
    """
    import pandas as pd

    a = attr.transpose("component", "step", "source")
    data, wd = _sources(a)
    total = a.values.sum(-1)
    groups = [component_group(str(c)) for c in a.coords["component"]]
    steps = a.coords["step"]
    rows = []
    for name, (lo, hi) in phases.intervals().items():
        idx = [j for j, s in enumerate(steps) if lo <= int(s) < hi]
        if not idx:
            continue
        sub = total[:, idx]
        per_c = sub.abs().sum(-1)
        den = float(per_c.sum()) or 1.0
        row: dict[str, Any] = {"phase": name, "start": lo, "stop": hi, "change": float(sub.sum())}
        for g in COMPONENT_GROUPS:
            row[f"share:{g}"] = float(sum(per_c[i] for i, gg in enumerate(groups) if gg == g)) / den
        d, w = float(data[:, idx].sum()), float(wd[:, idx].sum())
        da, wa = float(data[:, idx].abs().sum()), float(wd[:, idx].abs().sum())
        row.update(
            data=d,
            weight_decay=w,
            wd_abs_share=wa / (da + wa) if (da + wa) > 0 else 0.0,
        )
        rows.append(row)
    return pd.DataFrame(rows)
