"""Alignment: do test examples get pushed together, and when do the outer layers fit the inside?

Two views of the paper's claim that the last phase of grokking aligns the model's outer layers
(embedding, unembedding) with an inner pipeline that has already formed:

* :func:`query_alignment` — the paper's view. Per component, each test query's influence
  *vector* within a step window is its per-step-bin ExPLAIND attribution over that window
  (``explain(by=("query", "component", "step"), steps=window, step_bins=bin)``). The mean
  pairwise cosine similarity of these vectors across queries measures how much the component's
  updates move all test examples together (1: in lockstep; 0: unrelated). Windows are placed one
  per phase, so the per-query cost is a few windows rather than the whole run.
* :func:`swap_experiment` — pure forward passes: the final model's outer layers (``embed``,
  ``pos_embed``, ``unembed``; optionally the MLP output weights) around the step-``s`` inner
  pipeline, test accuracy as a function of ``s``. If the inner pipeline already supports
  generalisation before the model generalises, the swapped model's accuracy rises first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from explaind_tl.model.bridge import hooked_name

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .phases import Phases

__all__ = ["OUTER_PARAMS", "alignment_windows", "query_alignment", "swap_experiment"]

OUTER_PARAMS = ("embed.W_E", "pos_embed.W_pos", "unembed.W_U", "unembed.b_U")
MLP_OUT_PARAMS = ("mlp.W_out", "mlp.b_out")


def alignment_windows(phases: Phases, width: int) -> list[tuple[str, int, int]]:
    """One window of ``width`` steps per phase: ``(phase, start, stop)``.

    The window sits at the end of its phase (for the memorisation phase: its start, where the
    updates are largest), clipped to the phase.
    """
    out = []
    for name, (lo, hi) in phases.intervals().items():
        if name == "memorisation":
            a, b = lo, min(hi, lo + width)
        else:
            a, b = max(lo, hi - width), hi
        if b > a:
            out.append((name, a, b))
    return out


def _mean_offdiag_cosine(v: torch.Tensor) -> float:
    """Mean pairwise cosine similarity of the rows of ``v`` ``[Q, D]`` (zero rows skipped)."""
    norms = v.norm(dim=1)
    keep = norms > 0
    v = v[keep] / norms[keep, None]
    n = v.shape[0]
    if n < 2:
        return float("nan")
    g = v @ v.T
    return float((g.sum() - g.diagonal().sum()) / (n * (n - 1)))


def query_alignment(
    trajectory: Any,
    queries: dict,
    windows: list[tuple[str, int, int]],
    *,
    step_bin: int,
    metric: str = "correct_logprob",
    components: Any = "head",
    dtype: Any = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per component and window: mean pairwise cosine of the queries' influence vectors.

    Args:
        trajectory: The recorded run.
        queries: A (small) set of test queries ``{"tokens", "label"}``.
        windows: ``(name, start, stop)`` step windows (see :func:`alignment_windows`).
        step_bin: Bin width inside a window (the influence vector has ``width / step_bin``
            entries).
        metric: Query metric.
        components: Component granularity or map.
        dtype: Working dtype (``None``: float32). Per-query rows of confidently classified
            queries need ``torch.float64`` to meet the certificate without refining every step.
        progress: Show progress bars.

    Returns:
        ``(frame, attributions)``: the frame has ``phase, start, stop, component, mean_cosine,
        mean_influence`` (mean over queries of the window total), plus a row per window with
        ``component = "all"`` (vectors concatenated over components); ``attributions`` maps
        the window name to its ``Attribution``.
    """
    import pandas as pd

    import explaind_tl

    rows, attrs = [], {}
    for name, a, b in windows:
        attr = explaind_tl.explain(
            trajectory,
            queries,
            metric=metric,
            by=("query", "component", "step"),
            components=components,
            steps=(a, b),
            step_bins=max(1, min(step_bin, b - a)),
            dtype=dtype,
            progress=progress,
        )
        attrs[name] = attr
        t = attr.transpose("component", "query", "step")
        for i, c in enumerate(t.coords["component"]):
            v = t.values[i]  # [Q, S]
            rows.append(
                {
                    "phase": name,
                    "start": a,
                    "stop": b,
                    "component": c,
                    "mean_cosine": _mean_offdiag_cosine(v),
                    "mean_influence": float(v.sum(-1).mean()),
                }
            )
        allv = t.values.permute(1, 0, 2).reshape(t.values.shape[1], -1)
        rows.append(
            {
                "phase": name,
                "start": a,
                "stop": b,
                "component": "all",
                "mean_cosine": _mean_offdiag_cosine(allv),
                "mean_influence": float(allv.sum(-1).mean()),
            }
        )
    return pd.DataFrame(rows), attrs


@torch.no_grad()
def swap_experiment(
    trajectory: Any,
    test: dict[str, torch.Tensor],
    steps: list[int] | None = None,
) -> pd.DataFrame:
    """Test accuracy of hybrids of the final model and the step-``s`` model.

    Args:
        trajectory: The recorded run (``params_at``, ``model``, ``checkpoint_steps``).
        test: ``{"tokens": [M, 3], "label": [M]}``.
        steps: Steps ``s`` (default: the checkpoint steps).

    Returns:
        One row per ``s``: ``step``, ``actual`` (the step-``s`` model), ``final_outer``
        (final embed/pos_embed/unembed around step-``s`` inner layers),
        ``final_outer_mlp_out`` (also the final MLP output weights), ``final_inner`` (the
        reverse: step-``s`` outer layers around the final inner layers).
    """
    import pandas as pd
    from torch.func import functional_call

    steps = list(trajectory.checkpoint_steps if steps is None else steps)
    T = trajectory.num_steps
    final = trajectory.params_at(T)
    model = trajectory.model(T)
    names = list(final)

    def is_outer(n: str, mlp_out: bool) -> bool:
        n = hooked_name(n)  # a TransformerBridge's parameters by their HookedTransformer names
        return n in OUTER_PARAMS or (mlp_out and n.endswith(MLP_OUT_PARAMS))

    def acc(params: dict[str, torch.Tensor]) -> float:
        logits = functional_call(model, params, (test["tokens"],))[:, -1, :]
        return float((logits.argmax(-1) == test["label"]).double().mean())

    rows = []
    for s in steps:
        ps = trajectory.params_at(s)
        rows.append(
            {
                "step": int(s),
                "actual": acc(ps),
                "final_outer": acc({n: final[n] if is_outer(n, False) else ps[n] for n in names}),
                "final_outer_mlp_out": acc(
                    {n: final[n] if is_outer(n, True) else ps[n] for n in names}
                ),
                "final_inner": acc({n: ps[n] if is_outer(n, False) else final[n] for n in names}),
            }
        )
    return pd.DataFrame(rows)
