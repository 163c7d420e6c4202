"""The ExPLAIND decomposition engine: ``explain(trajectory, queries, ...) -> Attribution``.

The trained model's output change over a window of steps ``[a, b)`` is rewritten exactly as

    q(w_b) - q(w_a) = Σ_s <φ_s, Δ_s> + (measured quadrature residual)

and each ``<φ_s, Δ_s>`` is split along the axes the user asks for (docs/design.md §1-4):

* ``component``: a partition of the parameter coordinates (``ComponentMap``);
* ``source``: the update's pieces: ``data`` (gradients of training examples seen in the
  window), ``history`` (momentum carried into the window), ``weight_decay`` (AdamW's decoupled
  decay), ``regularization`` (coupled L2 as a pseudo-example) and ``update_residual`` (the
  floating-point gap between the stored update and its algebraic reconstruction);
* ``train``: per training example (seen clock, adjoint recursion of docs/design.md §4, memory
  ``O(rows · P)``, never ``N_train · P``), plus the pseudo-entries of ``source``;
* ``step`` (realized clock by default; the seen clock when ``train`` is asked for), optionally
  binned; ``query`` and ``output``.

Every result carries its completeness certificate: per step, ``q(w_{s+1}) - q(w_s)`` measured
with two forward passes in float64 against the attributed change, and a bound per step
(``tol`` relative plus the working dtype's rounding floor). Steps whose residual exceeds it are
refined (more Gauss–Legendre nodes); on ReLU models the segment is first cut where
pre-activations change sign (kink-aware quadrature). A step that still misses its bound (at
``max_nodes``, or when refinement stops improving) is flagged: ``Completeness.ok`` is False,
``failed_steps`` lists it, and ``explain`` warns (``CertificateWarning``) or, with
``strict=True``, raises ``CertificateError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from explaind_tl.engine import distributed
from explaind_tl.engine.assemble import finish, sweep_facts
from explaind_tl.engine.certify import Certifier
from explaind_tl.engine.options import QUERY_GRADS, UNSET, ExplainOptions
from explaind_tl.engine.plan import (
    default_query_chunk,
    make_plan,
    normalize_queries,
    prepare_queries,
    probe_outputs,
)
from explaind_tl.engine.realized import run_realized
from explaind_tl.engine.resume import Resume, fingerprint
from explaind_tl.engine.seen import run_seen
from explaind_tl.engine.setup import Setup
from explaind_tl.engine.validate import as_trajectory, check_arguments, check_flag
from explaind_tl.model.components import ComponentMap
from explaind_tl.run.step import torch_threads


def explain(
    trajectory,
    queries: Any,
    metric: str | Callable = "correct_logprob",
    by: Sequence[str] | str = ("step", "component"),
    components: Any = None,
    reduce: str = "sum",
    tol: float = UNSET,
    steps: tuple[int, int] | None = None,
    step_bins: int | None = None,
    position: Any = None,
    nodes: int = UNSET,
    max_nodes: int = UNSET,
    kink_aware: bool | str = UNSET,
    dtype: torch.dtype | None = UNSET,
    device: str | torch.device | None = None,
    query_chunk: int | None = UNSET,
    train_chunk: int = UNSET,
    jacobian_mb: float = UNSET,
    replay_mb: float | str | None = UNSET,
    progress: bool = True,
    resume_dir: str | Path | None = None,
    fast_forward: bool = UNSET,
    train_grads: str = UNSET,
    query_grads: str = UNSET,
    adaptive_nodes: bool = UNSET,
    strict: bool = False,
    *,
    options: ExplainOptions | None = None,
    trust_remote_code: bool = False,
    world_size: int | None = None,
    split: str = "auto",
    gather: str = "all",
    threads_per_worker: int | None = None,
):
    """Rewrite the trained model's output change exactly as a sum over steps, components, examples.

    Every argument is checked before any replay starts, all but the queries before the model is
    built (wrong types: ``TypeError``; wrong values: ``ValueError``; bad queries:
    :class:`~explaind_tl.errors.QueryError`).

    Args:
        trajectory: a recorded run (:class:`explaind_tl.Trajectory`) or its run directory
            (``str``/``PathLike``, loaded with :meth:`Trajectory.load`).
        queries: test inputs: a ``[Q, pos]`` token tensor, a dict of tensors or a
            ``datasets.Dataset`` with a ``"tokens"`` column and ``"label"`` where the metric needs
            it (``"alt_label"`` for ``"logit_diff"``).
        metric: ``"correct_logit"``, ``"correct_logprob"``, ``"loss"``, ``"logit_diff"``,
            ``"logits"``, ``"next_token_logprob"``, ``"next_token_loss"`` or a callable
            ``(logits, batch) -> [Q]`` or ``[Q, O]``.
        by: axes to keep, any subset of ``("step", "component", "source", "query", "output",
            "position", "train", "train_position")``; every other axis is summed. ``"position"``
            (next-token metrics only) keeps each read position's share of the per-query mean
            (coords: the positions; the shares add up to the averaged metric).
            ``"train_position"`` (with ``"train"``; a training loss with a ``per_token`` split,
            e.g. ``losses.next_token_cross_entropy``) splits each training example's entry by the
            token terms of its loss: coords the predicted token ``1..n-1``, plus ``"none"``,
            where the pseudo-entries sit. ``"train"`` switches to the seen clock
            (example seen at step ``k``) and the adjoint recursion; it cannot be combined with
            ``"source"`` (its pseudo-entries already carry that split). ``by=()`` sums everything:
            a 0-d Attribution holding the total.
        components: ``None`` (one component per parameter tensor), a granularity name
            (``"head"``, ``"block"``, ``"neuron"``, ``"parameter"``) or a ``ComponentMap``.
        reduce: ``"sum"`` or ``"mean"`` over queries when ``"query"`` is not in ``by``.
        tol: per-step relative tolerance of the certificate (finite, > 0): a step passes when
            ``|residual| <= tol * |step change| + 16 * eps * Σ_p |φ_p Δ_p| + 8 * eps64 * L`` (the
            rounding floors of the working dtype and of the float64 forwards, ``L`` the largest
            logit magnitude at the step's ends); failing steps get more nodes, up to ``max_nodes``.
        steps: window ``(a, b)``: explain ``q(w_b) - q(w_a)``; default the whole run.
        step_bins: width of step bins (``None``: one bin per step); needs ``"step"`` in ``by``.
        position: token position(s) the built-in metrics read. Classifier metrics: an int in
            ``[-pos, pos)`` of the ``[Q, pos]`` query tokens (default: the last). Next-token
            metrics (``"next_token_logprob"``, ``"next_token_loss"``: the label is the query's
            own next token): an int, a slice, a list of ints or ``"all"`` (the default: every
            position that has a next token), averaged per query; a ``"loss_mask"`` ``[Q, pos]``
            bool column in the queries restricts them per query to the marked predicted tokens.
        nodes: Gauss–Legendre nodes per smooth piece to start a step with.
        adaptive_nodes: after a step met its certificate at its starting count with a 10x margin,
            start the next with half as many nodes (down to 1); after a step that needed
            refinement, start again from ``nodes``; at every multiple of 16 steps the controller
            starts afresh. Every step is still checked against ``tol``.
        max_nodes: cap for adaptive refinement.
        kink_aware: cut segments where ReLU pre-activations change sign (``"auto"``: when the
            model has observable ReLUs).
        dtype: working dtype of gradients, ``torch.float32`` or ``torch.float64`` (default: the
            trajectory's); sums are accumulated in float64 and certificates are measured in
            float64. Half precision is refused: it leaves percent-level residuals per step (measured
            on the test models), far above any useful certificate.
        device: ``"cpu"``, ``"cuda"``... (default: CUDA when available).
        query_chunk: queries per chunk (default: 4096 aggregated, 256 with a query axis; with
            per-query gradients, which a chunk holds at once, as many as fit ~256 MB);
            train_chunk: training examples per
            chunk of per-example gradients.
        jacobian_mb: the most megabytes of per-query Jacobians (``[queries, outputs, P]``) one
            call holds (default 16); a chunk with more queries takes several calls of even sizes. Lower saves
            peak memory at some per-call cost. On the train axis with per-query rows and one
            thread, a chunk is one call, folded into the adjoint as soon as it is certified.
        replay_mb: the most megabytes of replayed step records (parameters and optimizer
            state) the train-axis sweep holds; a longer checkpoint segment is replayed in
            sub-segments of ``ceil(sqrt(n))`` steps after one more replay of it (one training
            step per step more). ``"auto"`` (default): 8 with more than one thread (the replay
            runs on the spare core), else whole segments; ``None``: whole segments.
        progress: show tqdm progress bars.
        resume_dir: persist partial sums after every checkpoint segment and continue from them
            (with several processes, one subdirectory ``shard-R-of-N`` per shard)
            (``explain_state.safetensors``: safetensors + JSON, no pickle; an old
            ``explain_state.pt`` is refused, see ``python -m explaind_tl.run.migrate``).
        trust_remote_code: with ``trajectory`` given as a path: passed to
            :meth:`Trajectory.load` (import the loss function / model factory its manifest names
            even when they are not explaind_tl's). Only for run directories you trust.
        fast_forward: evaluate the model with the read-out forward (:mod:`explaind_tl.model.readout`:
            only what reaches the metric's position is computed) when it is a supported
            HookedTransformer and the metric a built-in one, for gradients and certificate alike.
            It is compared with TransformerLens's own forward in float64 on the queries before
            use (switched off, with a warning, if they differ) and at the window's ends and every
            checkpoint inside it (``RuntimeError`` if they differ);
            ``meta["readout_error"]`` is the largest relative difference seen. ``False``:
            TransformerLens's forward throughout.
        train_grads: how the train axis gets ``<Ã_s, ∇ℓ(x_i; w_s)>``: ``"jvp"`` (forward-mode
            derivatives of the per-example losses, one pass per row and component, no
            per-example gradients), ``"per_example"`` (``vmap`` per-example gradients,
            contracted), or ``"auto"``: ``"jvp"`` when rows x components <= 12.
        query_grads: how per-query rows (``"query"`` in ``by``, realized clock) get their
            entries: ``"jvp"`` (forward-mode derivatives along each update vector restricted to
            each component: one pass per (source, component), all queries and outputs at once,
            no per-query gradient vectors), ``"grad"`` (per-query gradients, then inner
            products), or ``"auto"``: ``"jvp"`` when sources x components <= 64.
        strict: raise :class:`~explaind_tl.errors.CertificateError` (it carries the result as
            ``.attribution``) instead of warning when the certificate fails.
        options: the numerical options (``tol``, ``nodes``, ``max_nodes``, ``kink_aware``,
            ``adaptive_nodes``, ``dtype``, ``fast_forward``, ``train_grads``, ``query_grads``,
            ``query_chunk``, ``train_chunk``, ``jacobian_mb``, ``replay_mb``) as one
            :class:`~explaind_tl.engine.options.ExplainOptions`; any of those keywords given as
            well replaces its field. Defaults: ``ExplainOptions()``, i.e. the values listed here.
        world_size: split the work over this many processes (``torch.distributed``, gloo): with
            no process group initialised, ``world_size`` worker processes are started on this
            machine: forked from this one on Linux/CPU with one thread per worker (they inherit
            the prepared job), else spawned (then the trajectory must be in a run directory and
            ``metric`` and ``components`` must be picklable); under ``torchrun`` (a default group already initialised) the
            group's ranks share the work and ``world_size`` may be left unset. ``1``: this
            process only, even inside a group. The result is the same ``Attribution``,
            certificate merged: in float64 equal to one process's to rounding (with a query
            split, to one process with the same ``query_chunk``; the split lowers it to
            ``ceil(Q / world_size)`` when there are fewer chunks than ranks).
        split: ``"steps"`` (each rank a contiguous range of the window; realized clock without a
            source axis), ``"queries"`` (each rank a slice of the queries, the whole window), or
            ``"auto"``: steps where allowed, else queries (docs/design.md §7).
        gather: under a process group, ``"all"`` returns the result on every rank, ``"rank0"``
            on rank 0 only (``None`` elsewhere).
        threads_per_worker: CPU threads of each started worker (default: this process's
            threads divided by ``world_size``, at least 1).

    Returns:
        :class:`explaind_tl.Attribution` with ``values`` ``[*dims]`` (``"component"`` first when
        present), labelled ``coords`` and the ``completeness`` certificate. ``meta`` records the
        settings, the number of ReLU kinks cut and ``replay_mismatch``: the largest difference
        between a replayed segment's end and its stored checkpoint inside the window (0 for an
        exactly replayable run; anything else shows up as residual at the checkpoint steps), and
        ``float64_steps``: the steps with a query chunk that missed its bound in float32 and was
        computed once more in float64 (float32 gradients of saturated log-probs lose digits the
        certificate's rounding allowance does not cover).

    Raises:
        TypeError, ValueError, QueryError: a bad argument (before any work).
        ExplainWorkerError: a worker process died or raised (its rank and shard are named); with
            ``resume_dir``, a rerun with the same ``world_size`` continues from the finished shards.
        TrajectoryError: ``trajectory`` is a path that is not a valid run directory.
        CertificateError: ``strict=True`` and some step (or the total) missed its bound.

    Warns:
        CertificateWarning: some step (or the total) missed its bound (``strict=False``): how
            many, the worst residual and its bound, and what to try. The result's
            ``completeness.ok`` is False and ``completeness.failed_steps`` lists them.
    """
    t_start = time.perf_counter()
    # ------------------------------------------------ validate: every argument, before any work
    by, steps, step_bins, position = check_arguments(
        by, metric, components, reduce, steps, step_bins, position, device, progress, strict, resume_dir
    )
    opts = ExplainOptions.merge(
        options, tol=tol, nodes=nodes, max_nodes=max_nodes, kink_aware=kink_aware, adaptive_nodes=adaptive_nodes,
        dtype=dtype, fast_forward=fast_forward, train_grads=train_grads, query_grads=query_grads,
        query_chunk=query_chunk, train_chunk=train_chunk, jacobian_mb=jacobian_mb, replay_mb=replay_mb,
    )
    check_flag("trust_remote_code", trust_remote_code)
    world_size, threads = distributed.check_arguments(world_size, split, gather, threads_per_worker)
    group = distributed.current_group(world_size)
    trajectory = as_trajectory(trajectory, trust_remote_code)
    method = distributed.start_method(threads, device)  # after loading: a GPU run initialises CUDA
    if (world_size or 1) > 1 and group is None and method == "spawn":
        distributed.check_picklable("metric", metric)
        distributed.check_picklable("components", components)
    job = prepare(trajectory, queries, metric, by, components, reduce, steps, step_bins, position, opts, device)
    plan, opts = job.plan, job.options  # opts now with the resolved dtype and query_chunk

    # ------------------------------------------------ sweep: here, on worker processes, or over a group
    world = group[1] if group is not None else (world_size or 1)
    if world == 1:
        part = run_shard(job, None, progress, resume_dir)
    else:
        kind = distributed.choose_split(plan.clock, plan.by, split)
        if kind == "queries":
            opts = job.options = opts.replace(query_chunk=distributed.shard_chunk(plan.n_query, opts.query_chunk, world))
        shards = distributed.plan_shards(
            kind, world, plan.window, plan.n_query, list(trajectory.checkpoint_steps), query_chunk=job.options.query_chunk
        )
        if group is not None:
            rank = group[0]
            part = distributed.in_group(
                lambda sh: run_shard(job, sh, progress and rank == 0, resume_dir), shards, rank, gather, plan.resolve_query
            )
            if part is None:  # gather="rank0" on another rank
                return None
        elif method == "fork":  # the workers inherit the prepared job
            job_args = dict(job=job, progress=progress, resume_dir=resume_dir)
            part = distributed.spawn(run_forked_shard, job_args, shards, threads, plan.resolve_query, method="fork")
        else:
            if trajectory.run_dir is None:
                raise ValueError(
                    "world_size > 1 with spawned workers (more than one thread per worker, or a GPU) needs a "
                    "trajectory saved in a run directory (the workers load it from there)"
                )
            job_args = dict(
                run_dir=str(trajectory.run_dir), trust_remote_code=trust_remote_code, queries=job.batch, metric=metric,
                by=by, components=components, reduce=reduce, steps=steps, step_bins=step_bins, position=position,
                options=opts, device=str(job.device), progress=progress, resume_dir=resume_dir,
            )
            part = distributed.spawn(run_job_shard, job_args, shards, threads, plan.resolve_query)
        part["facts"].update(world_size=world, split=kind)

    # ------------------------------------------------ assemble
    return finish(
        plan, trajectory, part["facts"], part["cert"], part["acc"], opts, job.metric_fn, metric, reduce, t_start, strict
    )


@dataclass
class Job:
    """An explain call after validation and planning: what every shard of it shares."""

    trajectory: Any
    batch: dict[str, torch.Tensor]
    metric_fn: Callable
    plan: Any
    cmap: Any
    options: ExplainOptions
    device: torch.device
    position: int | None
    directional: bool
    config: dict


def prepare(trajectory, queries, metric, by, components, reduce, steps, step_bins, position, opts, device) -> Job:
    """Build the model, normalise the queries, plan the rows and resolve the defaults."""
    T = trajectory.num_steps
    a, b = (0, T) if steps is None else steps
    if not 0 <= a < b <= T:
        raise ValueError(f"steps window must satisfy 0 <= a < b <= {T}, got {(a, b)}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = trajectory.model()
    if opts.dtype is None:
        dtype = next(model.parameters()).dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"the trajectory's parameters are {dtype}; the certificate needs float32 or float64 "
                "gradients: pass dtype=torch.float32 or torch.float64"
            )
        opts = opts.replace(dtype=dtype)
    metric_fn, batch, position = prepare_queries(queries, model, metric, position, by_position="position" in by)

    # ------------------------------------------------ plan: rows, axes, components, chunks
    cmap = None
    if "component" in by:
        if components is None:
            components = "parameter"
        cmap = components if isinstance(components, ComponentMap) else ComponentMap.from_model(
            model, components, param_names=list(trajectory.param_names)
        )
    plan = make_plan(
        by, int(next(iter(batch.values())).shape[0]), probe_outputs(model, metric_fn, batch), reduce, (a, b),
        step_bins, list(cmap.labels) if cmap is not None else None, trajectory.num_train,
        output_labels=list(position) if "position" in by else None,
        n_terms=token_terms(trajectory, model) if "train_position" in by else 0,
    )
    n_tangents = len(plan.x_labels) * (len(cmap.labels) if cmap is not None else 1)
    directional = plan.clock == "realized" and plan.resolve_query and n_tangents <= QUERY_GRADS[opts.query_grads]
    if opts.query_chunk is None:
        names = set(trajectory.param_names)
        n_params = sum(p.numel() for n, p in model.named_parameters() if n in names)
        opts = opts.replace(query_chunk=default_query_chunk(plan, directional, n_params, opts.dtype))
    config = {
        "metric": getattr(metric_fn, "__name__", str(metric)),
        "by": by,
        "components": cmap.labels if cmap is not None else None,
        "reduce": reduce,
        "tol": opts.tol,
        "window": (a, b),
        "bins": plan.bin_width,
        "nodes": opts.nodes,
        "max_nodes": opts.max_nodes,
        "dtype": str(opts.dtype),
        "position": position,
    }
    return Job(trajectory, batch, metric_fn, plan, cmap, opts, device, position, directional, config)


def token_terms(trajectory, model) -> int:
    """How many token terms each training example's loss has (``loss_fn.per_token``).

    Raises:
        ValueError: the run's loss function has no ``per_token`` split.
    """
    per_token = getattr(trajectory.loss_fn, "per_token", None)
    if not callable(per_token):
        raise ValueError(
            "by=(..., 'train_position') needs a training loss split into token terms: a loss_fn with a "
            "per_token(model, batch) -> [B, terms] attribute whose rows sum to the loss, such as "
            "explaind_tl.losses.next_token_cross_entropy"
        )
    with torch.no_grad():
        terms = per_token(model, trajectory.batch(torch.arange(1)))
    return int(terms.shape[1])


def run_shard(job: Job, shard: distributed.Shard | None, progress: bool, resume_dir: str | Path | None) -> dict:
    """One sweep: the whole job (``shard=None``) or one shard of it. Returns the partial sums
    ``{"acc", "cert", "facts"}`` that :func:`~explaind_tl.engine.distributed.merge_parts` merges."""
    plan, batch = job.plan, job.batch
    sweep_window = plan.window
    if shard is not None and shard.kind == "queries":
        idx = torch.arange(shard.lo, shard.hi)
        batch = {k: v[idx] for k, v in batch.items()}
        plan = replace(plan, n_query=len(idx), weights=plan.weights[idx])  # the whole set's weights
    elif shard is not None:
        sweep_window = (shard.lo, shard.hi)
    ctx = Setup(
        job.trajectory, batch, job.metric_fn, plan, job.cmap, job.options, job.device,
        position=job.position, directional=job.directional, sweep_window=sweep_window,
    )
    cert = Certifier(ctx, job.options)
    acc = torch.zeros(plan.n_bins, plan.n_rows, ctx.n_comp, len(plan.x_labels), dtype=torch.float64)
    resume = None
    if resume_dir is not None:
        where, config = Path(resume_dir), dict(job.config)
        if shard is not None:
            where = where / f"shard-{shard.rank}-of-{shard.world}"
            config["shard"] = [shard.kind, shard.lo, shard.hi]
        resume = Resume(where, fingerprint(job.trajectory, batch, config))
    # with a background replay (one thread, as recorded) the engine keeps the other cores
    n_threads, t0 = torch.get_num_threads(), time.perf_counter()
    with torch_threads(n_threads - 1 if ctx.prefetch else None):
        sweep = run_seen if plan.clock == "seen" else run_realized
        sweep(ctx, cert, progress, acc, resume)
    facts = sweep_facts(ctx) | {"seconds": time.perf_counter() - t0}
    return {"acc": acc, "cert": cert.snapshot(), "facts": facts}


def run_forked_shard(job_args: dict, shard: distributed.Shard) -> dict:
    """A forked worker's shard: the caller's prepared job, inherited."""
    return run_shard(job_args["job"], shard, job_args["progress"] and shard.rank == 0, job_args["resume_dir"])


def run_job_shard(job_args: dict, shard: distributed.Shard) -> dict:
    """A worker process's shard (:func:`explaind_tl.engine.distributed.spawn`): load the run,
    prepare the same job as the caller, sweep the shard."""
    from explaind_tl.run.trajectory import Trajectory

    args = dict(job_args)
    trajectory = Trajectory.load(args.pop("run_dir"), trust_remote_code=args.pop("trust_remote_code"))
    progress, resume_dir = args.pop("progress") and shard.rank == 0, args.pop("resume_dir")
    opts = args.pop("options")
    job = prepare(trajectory, args.pop("queries"), args.pop("metric"), opts=opts, **args)
    return run_shard(job, shard, progress, resume_dir)


__all__ = ["ExplainOptions", "Job", "explain", "normalize_queries", "prepare", "run_shard"]
