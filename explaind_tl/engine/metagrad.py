"""Exact metagradients: how the final query output depends on a weight on each training example.

Training is a composition of recorded steps ``(w_{s+1}, S_{s+1}) = F_s(w_s, S_s, ε)`` (``S``:
the optimizer state), where step ``s`` trains on the mean of ``ε_i ℓ_i(w_s)`` over its batch and
``ε = 1`` is the recorded run. :func:`metagradient` returns ``∂q(w_b) / ∂ε_i`` for every
training example ``i`` by reverse-mode differentiation through steps ``b-1 .. a``: the adjoint
``(λ_w, λ_S)`` starts at ``(∇q(w_b), 0)`` and is pulled back through each step by
``torch.func.vjp`` of the step written as a pure function (the loss gradient by
``torch.func.grad``, clipping, then :func:`explaind_tl.optim_step.functional_step`: AdamW / Adam / SGD
state, bias correction, schedules, weight decay), which also gives the step's ``∂/∂ε`` of its
batch. Each checkpoint segment is replayed forward (exactly, :meth:`Trajectory.segments`) and
differentiated backward, so memory holds one segment. The same sweep gives, with
``wrt="component_step"``, the derivative with respect to a scale on each component's part of
the updates in each step bin: ``Σ_{s ∈ bin} <λ_{s+1}, Δ_s|_c>``, read off before the adjoint is
pulled back past step ``s``.

Unlike the ExPLAIND decomposition, a metagradient is a derivative, not a split of a measured
change: it has no completeness identity. What it does carry is the check that the function it
differentiates is the one that ran, at every step, against the recorded step:

* ``meta["gradient_residual"]``: ``max |g_s - g_s^rec| / max |g_s^rec|``, the step's (clipped)
  gradient recomputed as a pure function against the one the optimizer saw;
* ``meta["optimizer_residual"]``: ``max |F_opt(w_s, S_s, g_s^rec) - w_{s+1}| / max |w_{s+1} - w_s|``,
  the optimizer algebra fed the recorded gradient against the recorded update;
* ``meta["step_residual"]``: the same for the whole differentiated step (recomputed gradient).

``ok`` when the first two are within ``tol``. The third is reported, not judged: Adam divides each
entry's moment by its root mean square, so an entry whose gradient is rounding noise (e.g. a key
bias, whose exact gradient is 0) moves by ~``lr`` in a direction the noise picks; a recomputation in
another dtype or order picks another, so the step residual of a float32 run can be of order 1
while the parameters that matter agree to rounding.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from explaind_tl.attribution import Attribution
from explaind_tl.engine import prefetch
from explaind_tl.engine.plan import prepare_queries
from explaind_tl.errors import CertificateWarning
from explaind_tl.metrics import check_position
from explaind_tl.model.functional import QueryFunction
from explaind_tl.model.training_loss import LossFunction
from explaind_tl.optim_step import clipped, functional_step

Params = dict[str, Tensor]
STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")
WRT = ("train", "component_step")


def _check(trajectory: Any, wrt: Any, reduce: Any, steps: Any, dtype: Any, tol: Any, step_bins: Any) -> tuple[int, int]:
    if wrt not in WRT:
        raise ValueError(f"wrt must be one of {WRT} (a weight on each training example's loss, or a scale on "
                         f"each component's update per step bin), got {wrt!r}")
    if step_bins is not None and (not isinstance(step_bins, int) or isinstance(step_bins, bool) or step_bins < 1):
        raise ValueError(f"step_bins must be a positive int (steps per bin) or None, got {step_bins!r}")
    if step_bins is not None and wrt != "component_step":
        raise ValueError("step_bins applies to wrt='component_step'")
    if reduce not in (None, "sum", "mean"):
        raise ValueError(f"reduce must be None (one column per query), 'sum' or 'mean', got {reduce!r}")
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (or None: the run's), got {dtype!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    T = trajectory.num_steps
    if steps is None:
        return 0, T
    if not (isinstance(steps, (tuple, list)) and len(steps) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in steps)):
        raise ValueError(f"steps must be a pair (a, b) of ints, got {steps!r}")
    a, b = steps
    if not 0 <= a < b <= T:
        raise ValueError(f"steps window must satisfy 0 <= a < b <= {T}, got {(a, b)}")
    return a, b


def _rel(a: Params, b: Params) -> float:
    """``max |a - b| / max |b|`` over every tensor of the two dicts."""
    scale = max(max(float(v.abs().max()) for v in b.values()), torch.finfo(next(iter(b.values())).dtype).tiny)
    return max(float((a[k] - b[k]).abs().max()) for k in b) / scale


def _state(record_state: dict, dtype: torch.dtype) -> dict[str, Params]:
    return {k: {n: t.to(dtype) for n, t in v.items()} for k, v in record_state.items() if k in STATE_KEYS}


def metagradient(
    trajectory: Any,
    queries: Any,
    metric: Any = "correct_logprob",
    *,
    wrt: str = "train",
    components: Any = "head",
    step_bins: int | None = None,
    reduce: str | None = None,
    position: Any = None,
    steps: tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    tol: float | None = None,
    progress: bool = True,
) -> Attribution:
    """The derivative of each query's output after step ``b`` through the training run.

    * ``wrt="train"``: ``∂q(w_b) / ∂ε_i`` with respect to a weight ``ε_i`` on training example
      ``i``'s loss in every step of ``[a, b)`` that trained on it. To first order, leaving a set
      ``D`` of examples out of those steps changes the output by ``-Σ_{i ∈ D} ∂q/∂ε_i``.
    * ``wrt="component_step"``: ``∂q(w_b) / ∂α_{c,k}`` with respect to a scale ``α_{c,k}`` on
      component ``c``'s part of every update ``Δ_s = w_{s+1} - w_s`` (gradient step and weight
      decay; the optimizer state left as it is) in step bin ``k``: ``Σ_{s ∈ k} <λ_{s+1}, Δ_s|_c>``
      with ``λ_{s+1} = ∂q(w_b)/∂w_{s+1}`` the adjoint of the sweep. ``-∂q/∂α_{c,k}`` is the
      first-order effect of "component ``c`` not learning in that window", everything after it
      reacting; ExPLAIND's step x component entry is the same update's effect on ``q(w_{s+1})``
      alone.

    Args:
        trajectory: a recorded :class:`~explaind_tl.Trajectory`.
        queries: as for :func:`~explaind_tl.explain` (a ``[Q, pos]`` token tensor, a dict of
            ``[Q, ...]`` tensors or a ``datasets.Dataset``).
        metric: a built-in metric name or ``fn(logits, batch) -> [Q]``, as for ``explain``.
        wrt: ``"train"`` or ``"component_step"`` (see above).
        components: the component map of ``wrt="component_step"``: a granularity of
            :meth:`~explaind_tl.ComponentMap.from_model` (``"head"`` by default) or a map.
        step_bins: steps per bin of ``wrt="component_step"`` (``None``: one bin per step).
        reduce: ``None``: one column per query; ``"sum"`` / ``"mean"``: of the queries' outputs.
        position: the read position(s) of a built-in metric, as for ``explain``.
        steps: ``(a, b)``: differentiate ``q(w_b)`` through steps ``a .. b-1`` (default: the
            whole run).
        dtype: working dtype of the derivatives (default: the run's own, float32 or float64;
            in the run's dtype the recomputed gradients match the recorded ones most closely).
        tol: the largest accepted gradient and optimizer residual (see the module doc); default
            ``1e-6`` for a run recorded in float64, ``1e-3`` for float32 (the recorded update is
            rounded to float32, about ``6e-8 |w|``, a larger fraction of a small update).
        progress: a progress bar over the steps.

    Returns:
        :class:`~explaind_tl.Attribution` over ``("train", "query")`` (``("train",)`` with
        ``reduce``), coords ``train`` = example ids, ``query`` = query indices; or, for
        ``wrt="component_step"``, over ``("step", "component", "query")`` (``query`` dropped with
        ``reduce``), coords ``step`` = each bin's first step; ``completeness``
        is ``None`` (a derivative has no completeness identity); ``meta`` holds the residuals
        (``gradient_residual``, ``optimizer_residual``, ``step_residual``), ``tol``, ``ok``,
        ``steps``, ``seconds``.

    Raises:
        ValueError, TypeError, QueryError: bad arguments or queries (before any work).
    """
    t0 = time.perf_counter()
    position = check_position(metric, position)
    a, b = _check(trajectory, wrt, reduce, steps, dtype, 1.0 if tol is None else tol, step_bins)
    if wrt == "train" and not (isinstance(components, str) and components == "head"):
        raise ValueError("components applies to wrt='component_step' (wrt='train' has no component axis)")
    model = trajectory.model()
    recorded64 = next(model.parameters()).dtype == torch.float64
    if dtype is None:
        dtype = torch.float64 if recorded64 else torch.float32
    cmap = None
    if wrt == "component_step":
        from explaind_tl.model.components import ComponentMap

        cmap = components if isinstance(components, ComponentMap) else ComponentMap.from_model(
            model, components, param_names=list(trajectory.param_names))
        width = step_bins or 1
        n_bins = -(-(b - a) // width)
    tol = (1e-6 if recorded64 else 1e-3) if tol is None else float(tol)
    metric_fn, batch, _ = prepare_queries(queries, model, metric, position)
    device = trajectory.device
    batch = {k: v.to(device) for k, v in batch.items()}
    names = list(trajectory.param_names)
    qf = QueryFunction(model, names, metric_fn, dtype=dtype, cert_dtype=dtype, device=device)
    lossf = LossFunction(model, trajectory.loss_fn, dtype, device)
    n_q = next(iter(batch.values())).shape[0]

    # the adjoint at w_b: one row per query, or one for the reduced output
    w_b = {k: v.to(device, dtype) for k, v in trajectory.params_at(b).items()}
    if reduce is None:
        lam_w = {k: v[:, 0] for k, v in qf.per_query_grad(w_b, batch, resolve_outputs=False).items()}  # [Q, *shape]
    else:
        weights = torch.full((n_q,), 1.0 / n_q if reduce == "mean" else 1.0, dtype=dtype, device=device)
        lam_w = qf.aggregate_grad(w_b, batch, weights, resolve_outputs=False)  # [1, *shape]
    n_rows = next(iter(lam_w.values())).shape[0]
    lam_s: dict[str, Params] | None = None
    scores = torch.zeros(trajectory.num_train, n_rows, dtype=dtype, device=device)
    if cmap is not None:
        per_bin = torch.zeros(n_bins, n_rows, len(cmap.labels), dtype=torch.float64, device=device)
    clip = trajectory.clip_grad_norm
    res = {"gradient": 0.0, "optimizer": 0.0, "step": 0.0}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=b - a, desc="metagradient (reverse)", unit="step")
    # the next segment (backwards) is replayed on a background thread while this one is
    # differentiated, when there is a core to spare
    segments = prefetch.prefetched(trajectory.segments(a, b, reverse=True), torch.get_num_threads() > 1)
    for segment in segments:
        for rec in reversed(segment):
            ids = rec.batch_ids.to(device)
            rows = {k: v.to(device) for k, v in trajectory.batch(rec.batch_ids).items()}
            w = {k: v.to(device, dtype) for k, v in rec.params.items()}
            state = _state(rec.state_before, dtype)
            spec, lr, t = rec.spec or trajectory.optimizer_spec_at(rec.step), rec.lr, rec.step_count

            def step(w_s: Params, s_s: dict[str, Params], eps: Tensor, rows=rows, spec=spec, lr=lr, t=t):
                g = clipped(grad(lambda p: (lossf.losses(p, rows) * eps).mean())(w_s), clip)
                w_n, s_n = functional_step(spec, lr, t, w_s, s_s, g)
                return (w_n, s_n), g

            ones = torch.ones(len(ids), dtype=dtype, device=device)
            (w_next, s_next), pull, g_ours = vjp(step, w, state, ones, has_aux=True)
            # the differentiated step against the recorded one: its gradient, its optimizer
            # algebra (fed the recorded gradient) and the whole step
            nxt = {k: v.to(dtype) for k, v in rec.next_params.items()}
            g_rec = {k: v.to(dtype) for k, v in rec.grad.items()}
            moved = max(max(float((nxt[k] - w[k]).abs().max()) for k in w), torch.finfo(dtype).tiny)
            res["gradient"] = max(res["gradient"], _rel(g_ours, g_rec))
            with torch.no_grad():
                w_alg, _ = functional_step(spec, lr, t, w, state, g_rec)
            res["optimizer"] = max(res["optimizer"], max(float((w_alg[k] - nxt[k]).abs().max()) for k in w) / moved)
            res["step"] = max(res["step"], max(float((w_next[k] - nxt[k]).abs().max()) for k in w) / moved)
            if cmap is not None:  # <λ_{s+1}, Δ_s> per component, before λ is pulled back past step s
                prod = torch.cat([(lam_w[n] * (nxt[n] - w[n])).reshape(n_rows, -1) for n in cmap.param_names], 1)
                per_bin[(rec.step - a) // width] += cmap.reduce_flat(prod.to(torch.float64))
            if lam_s is None:  # nothing depends on the state after the last step
                lam_s = {k: {n: torch.zeros((n_rows, *x.shape), dtype=dtype, device=device) for n, x in v.items()}
                         for k, v in s_next.items()}
            lam_w, lam_s, lam_eps = vmap(pull)((lam_w, lam_s))
            scores.index_add_(0, ids, lam_eps.T)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    ok = res["gradient"] <= tol and res["optimizer"] <= tol
    if not ok:
        warnings.warn(
            f"metagradient: the differentiated step does not reproduce the recorded one (gradient to "
            f"{res['gradient']:.1e} of its size, optimizer update to {res['optimizer']:.1e}; tol {tol:.0e}): "
            "the derivative is of a different run",
            CertificateWarning,
            stacklevel=2,
        )
    if cmap is None:
        values = scores.to(torch.float64)
        dims: tuple[str, ...] = ("train", "query") if reduce is None else ("train",)
        coords: dict[str, list] = {"train": list(range(trajectory.num_train))}
    else:
        values = per_bin.transpose(1, 2)  # [bin, component, row]
        dims = ("step", "component", "query") if reduce is None else ("step", "component")
        coords = {"step": list(range(a, b, width)), "component": list(cmap.labels)}
    if reduce is None:
        coords["query"] = list(range(n_q))
    else:
        values = values[..., 0]
    meta = {
        "kind": "metagradient", "wrt": wrt, "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "callable"),
        "reduce": reduce, "steps": [a, b], "step_bins": step_bins, "gradient_residual": res["gradient"], "optimizer_residual": res["optimizer"],
        "step_residual": res["step"], "tol": tol, "ok": ok, "dtype": str(dtype),
        "seconds": time.perf_counter() - t0,
    }
    return Attribution(values, dims, coords, None, meta)
