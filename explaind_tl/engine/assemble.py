"""From the sweep's partial sums to an :class:`explaind_tl.Attribution` with its certificate.

:func:`finish` arranges the accumulated entries in the axes the caller asked for
(:func:`assemble_values`), builds the :class:`explaind_tl.certificate.Completeness` (step bounds
from the quadrature, plus a float64 allowance for the total, :func:`assembly_allowance`), records
``meta`` and warns or raises when the certificate fails (:func:`certificate_message`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from explaind_tl.attribution import Attribution
from explaind_tl.axes import NO_TOKEN, PSEUDO
from explaind_tl.certificate import Completeness
from explaind_tl.engine.options import ExplainOptions
from explaind_tl.engine.plan import Plan
from explaind_tl.engine.setup import Setup
from explaind_tl.errors import CertificateError, CertificateWarning


def sweep_facts(ctx: Setup) -> dict:
    """What ``meta`` and the certificate message need from a sweep's :class:`Setup` (picklable,
    so shards on other processes can send it)."""
    plan = ctx.plan
    return {
        "kink_aware": ctx.kink_aware,
        "kinks_off": not ctx.kink_aware and ctx.qf.has_kinks,
        "forward": "readout" if ctx.qf.readout is not None else "model",
        "query_grads": ("jvp" if ctx.directional else "grad") if plan.resolve_query and plan.clock == "realized" else None,
        "train_grads": ("jvp" if ctx.train_jvp else "per_example") if plan.clock == "seen" else None,
        "readout_error": ctx.readout_error,
        "replay_mismatch": dict(ctx.traj.replay_mismatch),
        "device": str(ctx.device),
        "position": list(ctx.position) if isinstance(ctx.position, (list, tuple)) else ctx.position,
    }


def finish(
    plan: Plan,
    trajectory: Any,
    facts: dict,
    cert: dict,
    acc: Tensor,
    options: ExplainOptions,
    metric_fn: Callable,
    metric: Any,
    reduce: str,
    t_start: float,
    strict: bool,
) -> Attribution:
    """The Attribution of a finished sweep (``acc [bin, row, component, x]``, the certificate's
    records ``cert`` as :meth:`Certifier.snapshot` gives them, and :func:`sweep_facts`), of one
    process or merged from several.

    Raises:
        CertificateError: ``strict`` and the certificate failed.

    Warns:
        CertificateWarning: the certificate failed (not ``strict``).
    """
    a, b = plan.window
    x_labels = plan.x_labels
    ends = cert["ends"]
    measured = plan.rows(ends[b]) - plan.rows(ends[a])
    steps_sorted = list(range(a, b))
    step_measured = torch.stack([cert["step_measured"][s] for s in steps_sorted])
    step_attr = torch.stack([cert["step_attributed"][s] for s in steps_sorted])
    attributed_rows = acc.sum(dim=(0, 2, 3))
    update_res = 0.0
    if "update_residual" in x_labels:
        update_res = float(acc[..., x_labels.index("update_residual")].sum())
    step_bound = total_bound = None
    bounds = cert.get("step_bound", {})
    if all(s in bounds for s in steps_sorted):  # absent only for old resume states
        step_bound = torch.stack([bounds[s] for s in steps_sorted])
        total_bound = step_bound.sum(0) + assembly_allowance(acc, step_measured, plan, ends[a], ends[b])
    completeness = Completeness(
        measured=measured,
        attributed=attributed_rows,
        step_measured=step_measured,
        step_residual=step_measured - step_attr,
        nodes=torch.tensor([cert["nodes_used"][s] for s in steps_sorted]),
        refined_steps=int(sum(cert["nodes_used"][s] > options.nodes for s in steps_sorted)),
        update_residual=update_res,
        tol=options.tol,
        step_bound=step_bound,
        total_bound=total_bound,
        steps=torch.tensor(steps_sorted, dtype=torch.long),
    )
    values, dims, coords = assemble_values(acc, plan)
    dtype = options.dtype
    meta = {
        "metric": getattr(metric_fn, "__name__", str(metric)),
        "reduce": reduce if not plan.resolve_query else None,
        "window": [a, b],
        "clock": plan.clock,
        "step_bins": plan.bin_width,
        "tol": options.tol,
        "nodes": options.nodes,
        "max_nodes": options.max_nodes,
        "adaptive_nodes": options.adaptive_nodes,
        "position": facts.get("position"),
        "kink_aware": facts["kink_aware"],
        "forward": facts["forward"],
        "query_grads": facts["query_grads"],
        "train_grads": facts["train_grads"],
        "readout_error": facts["readout_error"],
        "kinks": int(sum(cert["kinks_seen"].values())),
        "float64_steps": sorted(int(s) for s in cert.get("float64_steps", {}) if a <= s < b),
        "replay_mismatch": max((d for c, d in facts["replay_mismatch"].items() if a < c <= b), default=0.0),
        "dtype": str(dtype).replace("torch.", ""),
        "device": facts["device"],
        "optimizer": trajectory.optimizer_spec.to_dict(),
        "seconds": time.perf_counter() - t_start,
        "run_dir": str(trajectory.run_dir),
    }
    if facts.get("world_size", 1) > 1:
        meta["world_size"], meta["split"] = facts["world_size"], facts["split"]
        meta["shard_seconds"] = facts.get("shard_seconds")
    attr = Attribution(values=values, dims=dims, coords=coords, completeness=completeness, meta=meta)
    if completeness.ok is False:
        message = certificate_message(completeness, dtype, options.max_nodes, facts["kinks_off"])
        if strict:
            raise CertificateError(message, attr)
        warnings.warn(message, CertificateWarning, stacklevel=3)
    return attr


def assembly_allowance(
    acc: Tensor, step_measured: Float[Tensor, "step row"], plan: Plan, end_a: Tensor, end_b: Tensor
) -> Float[Tensor, " row"]:
    """Float64 rounding allowed between the total residual and the sum of the step residuals.

    Both sides add the same quantities in float64 in different orders (the ends' rows vs the
    steps' chunked rows; the entries vs the steps' inner products, through the optimizer
    algebra on the seen clock). Allowance: ``64 * eps64 * (S + 1) * M`` per row, with ``M`` the
    largest magnitude summed: the absolute entries of the row, its step changes and its
    metric values at the window's ends.
    """
    eps = torch.finfo(torch.float64).eps
    S = step_measured.shape[0]
    entries = acc.abs().sum(dim=(0, 2, 3))  # [R]
    ends = plan.rows(end_a.abs().cpu()) + plan.rows(end_b.abs().cpu())
    scale = entries + step_measured.abs().sum(0) + ends
    return 64.0 * eps * (S + 1) * scale


def certificate_message(c, dtype: torch.dtype, max_nodes: int, kinks_off: bool) -> str:
    """What failed and what to try, for the warning and the strict error."""
    failed = c.failed_steps or []
    parts = [f"completeness {c.verdict()}"]
    # a failed step that could not double its nodes hit the cap; one below it stopped because
    # refinement no longer improved it (rounding in the working dtype, or an integrand the
    # quadrature does not resolve), where more nodes do not help
    at_failed = c.nodes[~c.step_ok].tolist() if failed else []
    capped = [n for n in at_failed if 2 * n > max_nodes]
    hints = []
    if capped or not at_failed:
        hints.append(f"a larger max_nodes (now {max_nodes})")
    if len(capped) < len(at_failed):
        parts.append(
            f"{len(at_failed) - len(capped)} failed step(s) stopped refining below max_nodes because more "
            "nodes no longer reduced the residual"
        )
    if dtype != torch.float64:
        hints.append("dtype=torch.float64")
    if kinks_off:
        hints.append("kink_aware='auto' (this model has ReLUs)")
    hints.append("a looser tol")
    parts.append("try " + ", ".join(hints) + "; see attr.completeness.failed_steps")
    return "; ".join(parts)


def assemble_values(acc: Tensor, plan: Plan) -> tuple[Tensor, tuple[str, ...], dict[str, list]]:
    """``acc [bin, row, component, x]`` -> values with dims in the user's order (component first)."""
    nb, _, nc, nx = acc.shape
    q = plan.n_query if plan.resolve_query else 1
    o = plan.rows_per_query
    full = acc.reshape(nb, q, o, nc, nx)
    internal = ["step", "query", "output", "component", "x"]
    x_dim = "train" if plan.clock == "seen" else ("source" if "source" in plan.by else None)
    keep = {
        "step": "step" in plan.by,
        "query": plan.resolve_query,
        "output": plan.resolve_output,
        "component": "component" in plan.by,
        "x": x_dim is not None,
    }
    for i in reversed(range(len(internal))):
        if not keep[internal[i]]:
            full = full.sum(i)
    kept = [d for d in internal if keep[d]]
    names = [x_dim if d == "x" else (plan.output_name if d == "output" else d) for d in kept]
    order = (["component"] if "component" in names else []) + [d for d in plan.by if d != "component"]
    order = [d for d in order if d in names]
    values = (full.permute(*[names.index(d) for d in order]) if order else full).contiguous()
    a, _ = plan.window
    coords: dict[str, list] = {}
    for d in order:
        if d == "step":
            coords[d] = [a + i * (plan.bin_width or 1) for i in range(nb)]
        elif d == "component":
            coords[d] = list(plan.component_labels)
        elif d in ("source", "train"):
            coords[d] = list(plan.x_labels)
        elif d == "query":
            coords[d] = list(range(plan.n_query))
        elif d in ("output", "position"):
            coords[d] = list(plan.output_labels) if plan.output_labels is not None else list(range(plan.n_output))
    if plan.n_terms and "train" in order:
        values, order, coords = split_token_terms(values, order, coords, plan.n_terms)
    return values, tuple(order), coords


def split_token_terms(values: Tensor, order: list[str], coords: dict[str, list], n_terms: int):
    """The train axis with token-term columns (``i * n_terms + t``, then the pseudo-entries) as two
    dims, ``train`` (examples, then pseudo-entries) x ``train_position`` (the predicted token
    ``1..n_terms``, then :data:`~explaind_tl.axes.NO_TOKEN` holding the pseudo-entries)."""
    d = order.index("train")
    v = values.movedim(d, -1)
    n_cols = v.shape[-1] - len(PSEUDO)
    n = n_cols // n_terms
    out = v.new_zeros(*v.shape[:-1], n + len(PSEUDO), n_terms + 1)
    out[..., :n, :n_terms] = v[..., :n_cols].reshape(*v.shape[:-1], n, n_terms)
    out[..., n:, n_terms] = v[..., n_cols:]
    out = out.movedim(-2, d).movedim(-1, d + 1).contiguous()
    coords = dict(coords)
    coords["train"] = list(range(n)) + list(PSEUDO)
    coords["train_position"] = list(range(1, n_terms + 1)) + [NO_TOKEN]
    return out, order[: d + 1] + ["train_position"] + order[d + 1:], coords
