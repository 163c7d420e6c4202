"""The seen clock: the adjoint sweep, backwards over the window (docs/design.md §4).

Entries are booked to the step at which a training example's gradient was taken. The adjoint
``Ã_s`` carries every later step's ``φ̂`` back through the optimizer's momentum, so the train
axis costs ``O(rows · P)`` memory, never ``N_train · P``; the non-data pieces of each update
follow the training examples as pseudo-entries (:data:`explaind_tl.axes.PSEUDO`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from jaxtyping import Float
from torch import Tensor

from explaind_tl.axes import PSEUDO
from explaind_tl.engine import prefetch
from explaind_tl.engine.certify import Certifier
from explaind_tl.engine.resume import Resume
from explaind_tl.engine.setup import Setup
from explaind_tl.model.functional import Params
from explaind_tl.model.training_loss import LossFunction

# Ã is held as a float64 scale times its buffer; the scale (a product of the β's) restarts at 1
# before it falls below this (float32 buffers then stay far from overflow)
RESCALE_BELOW = 2.0**-60


def loss_function(ctx: Setup) -> LossFunction:
    """The training loss as a pure function (read-out forward checked on up to 64 training rows)."""
    lossf = LossFunction(ctx.traj.model(), ctx.traj.loss_fn, ctx.dtype, ctx.device, ctx.fast_forward)
    rows = ctx.traj.batch(torch.arange(min(64, ctx.traj.num_train)))
    if "tokens" in rows:
        ctx.note_readout_error(lossf.check_readout(rows["tokens"]))
    else:
        lossf.readout = None
    return lossf


def run_seen(ctx: Setup, cert: Certifier, progress: bool, acc: Tensor, resume: Resume | None) -> None:
    """Adjoint sweep (docs/design.md §4): ``Ã_s = P_s ⊙ φ_s + β_{s+1} Ã_{s+1}``, backwards over segments.

    With ``b_{s+1} = β_s b_s + c_s gt_s`` and ``Δ_s = P_s ⊙ b_{s+1} + e_s ⊙ gt_s - λ'_s w_s``,
    the gradient ``gt_k`` reaches every later update through ``Π_{j=k+1..s} β_j``, so
    ``Ã_k = Σ_{s>=k} P_s φ_s Π_{j=k+1..s} β_j`` and the recursion multiplies ``Ã_{s+1}`` by
    the *next* step's ``β_{s+1}`` (schedulers such as OneCycleLR change β every step).
    ``gt_s`` enters with ``G_s = c_s Ã_s + e_s φ_s``; the momentum carried into the window,
    ``b_a``, with ``β_a Ã_a``.

    The ``[rows, P]`` state (``φ̂_s``, ``Ã_s``) lives in preallocated buffers in the working
    dtype, columns in the component blocks' order (:class:`~explaind_tl.contraction.Blocks`),
    updated in place; ``Ã_s`` is held as a float64 scale times its buffer, the scale being the
    product of the β's since it last restarted, so that each step's update of the buffer is one
    pass, ``A_s = A_{s+1} + (P_s / scale_s) ⊙ φ_s``, and the scale goes into the GEMMs'
    factor and the flat vectors (:data:`RESCALE_BELOW`); the data entries are one GEMM per component block with the step's
    per-example gradients, and every other entry is a float64 contraction with a flat vector
    (docs/design.md §4, "the sweep's arithmetic").
    """
    plan = ctx.plan
    a, b = plan.window
    n_data = ctx.traj.num_train * max(plan.n_terms, 1)  # data columns (per token term with train_position)
    col = {lbl: n_data + i for i, lbl in enumerate(PSEUDO)}
    blocks = ctx.blocks
    R, P = plan.n_rows, ctx.layout.numel
    state = resume.load() if resume else None
    # With a core to spare, each step's data entries (per-example gradients and their GEMM with
    # Ã_s) run in a worker thread while the main thread computes the next φ̂: Ã is then
    # double-buffered (the worker reads Ã_s while Ã_{s-1} is written into the other buffer).
    # Double-buffered, φ̂_s is written into the free buffer (sorted into it, with a permutation)
    # and turned into Ã_s there in place, so no [rows, P] matrix is held beside the two; the
    # worker does that update too, first in its job, while the main thread measures the next
    # step's ends, and the main thread waits for it before it writes into Ã_{s+1}'s buffer.
    overlap = ctx.prefetch
    A_bufs = [torch.zeros(R, P, dtype=ctx.dtype, device=ctx.device) for _ in range(2 if overlap else 1)]
    cur = 0  # A_bufs[cur] holds Ã_{s+1} (blocks' order)
    # φ̂_s as the certifier writes it (layout order), and sorted into the blocks' order; streamed
    # (ctx.stream_phi: one thread), a chunk's rows at a time, folded into Ã as each is certified
    stream = ctx.stream_phi
    phi_rows = ctx.query_chunk * plan.rows_per_query if stream else R
    phi_out = None if overlap and blocks.perm is None else torch.empty(phi_rows, P, dtype=ctx.dtype, device=ctx.device)
    phi_sorted = torch.empty(R, P, dtype=ctx.dtype, device=ctx.device) if blocks.perm is not None and not overlap else None
    beta_next = 0.0  # β_{s+1} of the step after the current one (Ã_b = 0 at the window's end)
    a_scale = 1.0  # Ã_{s+1} = a_scale · A_bufs[cur]
    done_before = b
    q1 = None
    lossf = loss_function(ctx)
    pool = ThreadPoolExecutor(1, thread_name_prefix="explaind-data") if overlap else None
    pending: Future | None = None
    ready: threading.Event | None = None  # set once the pending job has updated Ã's buffer

    def data_job(prepare: Callable[[], Tensor], g_scale: float, ids: Tensor, w_work: Params, k: int, scale: float,
                 A: Tensor, on_A: dict[str, Tensor], beta: float):
        G = prepare()  # Ã_s's buffer update first (the main thread waits for it before it writes φ̂ again)
        parts, data_sum = [], torch.zeros(R, ctx.n_comp, dtype=torch.float64)
        for cid, contrib in data_entries(ctx, lossf, G, g_scale, ids, w_work):
            contrib = scale * contrib.cpu()
            parts.append((cid.cpu(), contrib))
            data_sum += contrib.sum(-1)
        # the float64 contractions of Ã_s with flat vectors run here too: Ã_s is not written
        # while the job runs, and the main thread has the next φ̂ to compute
        return k, parts, data_sum, _contract(blocks, A, on_A), beta

    def book(result) -> None:
        # <G, gt_s> (the data and regularization entries) leaves the update-residual entry (see
        # the loop), which also takes the Ã_s part of X
        k, parts, data_sum, dA, beta = result
        for cid, contrib in parts:
            acc[k].index_add_(2, cid, contrib)
        acc[k, :, :, col["update_residual"]] -= data_sum
        if "reg" in dA:
            acc[k, :, :, col["regularization"]] += dA["reg"]
            acc[k, :, :, col["update_residual"]] -= dA["reg"]
        if "X" in dA:
            acc[k, :, :, col["update_residual"]] += dA["X"]
        if "history" in dA:
            # b_{s+1} ∋ Π_{j=a..s} β_j b_a, so b_a enters with β_a Ã_a (β_a: this step's)
            acc[k, :, :, col["history"]] += beta * dA["history"]

    def settle() -> None:
        nonlocal pending
        if pending is not None:
            book(pending.result())
            pending = None

    if state is not None:
        acc.copy_(state["acc"])
        A_bufs[0].copy_(blocks.sort(state["A"].to(ctx.device, ctx.dtype)))
        done_before = state["done_before"]
        beta_next = ctx.beta_of(done_before) if done_before < b else 0.0
        cert.restore(state)
    bar = prefetch.progress_bar(progress, total=b - a, initial=b - done_before, desc="explain (train, adjoint)")
    try:
        segs = ctx.traj.segments(a, done_before, reverse=True, grads=False, hold=ctx.replay_hold())
        # with a spare core the certificate's float64 forwards at each w_s run on the replay
        # thread, beside the main thread's Jacobians (they only need the replayed parameters)
        measure = (lambda seg: [cert.measure(r.params) for r in seg]) if ctx.prefetch and cert.measures_in_background() else None
        for item in prefetch.prefetched(segs, ctx.prefetch, measure):
            seg, measured = item if measure is not None else (item, None)
            for i in reversed(range(len(seg))):
                rec = seg[i]
                s = rec.step
                if q1 is None:
                    q1 = cert.endpoint(rec.next_params, s + 1)
                q0 = cert.endpoint(rec.params, s, measured=None if measured is None else measured[i])
                spec = ctx.step_spec(rec)
                co = ctx.coefficients(rec)
                Pv = ctx.sorted64(co.P)
                e = ctx.sorted64(co.e) if co.e is not None else None
                w64 = ctx.sorted64(rec.params)
                # the flat vectors φ_s and Ã_s are contracted with (none of them depends on φ_s)
                delta = ctx.sorted64(rec.next_params) - w64
                kept = delta + co.decoupled_wd * w64
                on_A, on_phi = {}, {}
                if co.has_buffer:
                    # ε_s = b_{s+1} - β_s b_s - c_s gt_s (this step's β_s) reaches the output through Ã_s
                    b_next = ctx.buffer(rec.state_after, spec, sort=True)
                    b_prev = ctx.buffer(rec.state_before, spec, sort=True)
                    on_A["X"] = b_next - co.beta * b_prev
                    on_phi["X"] = kept - Pv * b_next
                    if s == a:
                        on_A["history"] = b_prev
                else:  # plain SGD: A = P ⊙ φ = G
                    on_phi["X"] = kept
                if co.coupled_wd:
                    on_A["reg"] = co.c * co.coupled_wd * w64
                    if e is not None:
                        on_phi["reg"] = co.coupled_wd * e * w64
                if co.decoupled_wd:
                    on_phi["wd"] = -co.decoupled_wd * w64
                # φ̂_s, and its contractions with on_phi from the certificate's own float64 pass
                # over it when its columns are already in the blocks' order
                fuse = blocks.perm is None
                kw = {"on_phi": torch.stack(list(on_phi.values()), 1)} if fuse else {}
                nxt = (cur + 1) % len(A_bufs)
                A = A_bufs[nxt]
                if ready is not None:  # the worker still reads this buffer (Ã_{s+2}) for its update
                    _wait(ready, pending)
                    ready = None
                # Ã_s = P_s ⊙ φ_s + β_{s+1} Ã_{s+1} with Ã = scale · (buffer): Ã_{s+1} enters Ã_s
                # with the factor `carried`, which becomes Ã_s's scale, so the buffer's update
                # A_s = A_{s+1} + (P_s / scale_s) ⊙ φ_s is one pass (coef 1); below
                # RESCALE_BELOW the scale restarts at 1 (A_s = P_s ⊙ φ_s + carried · A_{s+1})
                carried = beta_next * a_scale if co.has_buffer else 0.0
                new_scale = carried if carried >= RESCALE_BELOW else 1.0
                coef = carried / new_scale
                Pw = (Pv / new_scale).to(ctx.dtype)
                if stream:
                    if e is not None:
                        raise RuntimeError("streamed φ̂ needs an update without e_s ⊙ gt_s (not Nesterov)")

                    def fold(rs: slice, part: Tensor, A=A, Pw=Pw, coef=coef) -> None:
                        update_adjoint(A[rs], A[rs], part, Pw, coef)  # these rows (A_{s+1} is in A: one buffer)

                    got = cert.phi(s, rec.params, rec.next_params, q0, q1, out=phi_out, sink=fold, **kw)
                elif overlap and phi_out is None:
                    got = cert.phi(s, rec.params, rec.next_params, q0, q1, out=A, **kw)
                else:
                    got = cert.phi(s, rec.params, rec.next_params, q0, q1, out=phi_out, **kw)
                phi, phi_dots = got if fuse else (got, None)
                if not stream and phi is not A:
                    phi = blocks.sort_into(phi, A if overlap else phi_sorted)
                q1 = q0
                if fuse:
                    dphi = {name: phi_dots[:, :, j].cpu() for j, name in enumerate(on_phi)}
                else:  # before φ_s may become Ã_s in place
                    dphi = _contract(blocks, phi, on_phi)
                e_phi = torch.mul(phi, e.to(ctx.dtype)) if e is not None else None
                updated = threading.Event()

                def prepare(A=A, prev=A_bufs[cur], phi=phi, Pw=Pw, coef=coef, e_phi=e_phi, alpha=co.c * new_scale,
                            updated=updated) -> Tensor:
                    # the buffer's update (in the other buffer when double-buffered; φ_s may sit
                    # there), then G_s = c_s Ã_s + e_s ⊙ φ_s (without e_s: the GEMMs on Ã_s take c_s)
                    if not stream:  # streamed: folded chunk by chunk already
                        update_adjoint(A, prev, phi, Pw, coef)
                    updated.set()  # prev (Ã_{s+1}'s buffer) is free for φ̂_{s-1}
                    return e_phi.add_(A, alpha=alpha) if e_phi is not None else A

                cur, a_scale = nxt, new_scale
                beta_next = co.beta if co.has_buffer else 0.0
                g_scale = 1.0 if e_phi is not None else co.c * a_scale
                on_A = {name: a_scale * v for name, v in on_A.items()}  # contracted with the buffer
                k = plan.bin_of(s)
                # training examples seen at step s: their entries (the worker's, with overlap)
                ids = rec.batch_ids.to(torch.long)
                # and every other entry: float64 contractions of Ã_s (in the job) and of φ̂_s
                # (dphi, above) with flat vectors
                job = (prepare, g_scale, ids, ctx.to_work(rec.params), k, rec.clip_factor / len(ids) * g_scale, A, on_A, co.beta)
                settle()
                if pool is not None:
                    pending, ready = pool.submit(data_job, *job), updated
                else:
                    book(data_job(*job))
                if "reg" in dphi:
                    acc[k, :, :, col["regularization"]] += dphi["reg"]
                if co.decoupled_wd:
                    acc[k, :, :, col["weight_decay"]] += dphi["wd"]
                # update residual: with the reconstruction Δ_s = -λ' w_s + P ⊙ b_{s+1} + e ⊙ gt_s + ρ_s,
                # b_{s+1} = β b_s + c gt_s + ε_s, its entry <A, ε_s> + <φ, ρ_s> is
                # X - <G, gt_s>, X = <A, b_{s+1} - β b_s> + <φ, Δ_s + λ' w_s - P ⊙ b_{s+1}>, and
                # <G, gt_s> is what the data and regularization entries of step s add up to (the
                # parts on Ã_s are booked in book()). So the entry also carries their rounding
                # (working-dtype GEMMs, float32 gradients of saturated losses) and every step's
                # entries add up to exactly what its φ and Δ say.
                acc[k, :, :, col["update_residual"]] += dphi["X"] - dphi.get("reg", 0.0)
                bar.update(1)
            done_before = seg[0].step
            # partial sums persist at checkpoint steps (and the window's start), not after every sub-segment
            if resume is not None and (done_before in ctx.checkpoints or done_before == a):
                settle()
                A_layout = a_scale * blocks.unsort(A_bufs[cur]).to(torch.float64).cpu()
                resume.save({"done_before": done_before, "acc": acc, "A": A_layout, **cert.snapshot()})
        settle()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _wait(event: threading.Event, job: Future | None) -> None:
    """Wait for ``event``, or for ``job`` to fail before it sets it (its error is raised)."""
    while not event.wait(0.05):
        if job is not None and job.done():
            job.result()  # raises the job's error
            return


def update_adjoint(out: Float[Tensor, "row param"], prev: Float[Tensor, "row param"], phi: Float[Tensor, "row param"],
                   Pw: Float[Tensor, " param"], coef: float) -> None:
    """``out = coef · prev + Pw ⊙ phi``, one pass when ``coef`` is 0 or 1 (the adjoint's buffer
    update, see :func:`run_seen`); ``out`` may be ``prev`` or ``phi`` itself."""
    if coef == 0.0:
        torch.mul(phi, Pw, out=out)
    elif coef == 1.0:
        torch.addcmul(prev, phi, Pw, out=out)
    elif out.data_ptr() == phi.data_ptr():
        out.mul_(Pw).add_(prev, alpha=coef)
    else:
        (out.mul_(coef) if out.data_ptr() == prev.data_ptr() else torch.mul(prev, coef, out=out)).addcmul_(phi, Pw)


def _contract(blocks, M: Tensor, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{name: [rows, C] float64}``: per-component ``<M_r, v>`` for each flat vector, one pass over ``M``."""
    if not vectors:
        return {}
    out = blocks.dots(M, torch.stack(list(vectors.values()), 1)).cpu()
    return {name: out[:, :, j] for j, name in enumerate(vectors)}


def data_entries(
    ctx: Setup,
    lossf: LossFunction,
    G: Float[Tensor, "row param"],
    g_scale: float,
    ids: Tensor,
    w_work: Params,
) -> Iterator[tuple[Tensor, Float[Tensor, "row component chunk"]]]:
    """``<G_r|_c, ∇ℓ(x_i; w_s)> / g_scale`` for the training examples ``ids``, chunk by chunk.

    ``G`` is in the component blocks' order and the working dtype; ``g_scale`` is the factor
    the caller applies to the entries (``G = g_scale · (the matrix passed)``), so the jvp path
    divides nothing and the GEMM path never forms the scaled matrix.

    Yields ``(columns, entries [R, C, b] float64)``: the chunk's example ids, or with token terms
    (``plan.n_terms``, always forward mode) the columns ``i * n_terms + t`` of each example's
    terms and ``[R, C, b * n_terms]`` entries. With few tangents (rows x components,
    ``ctx.train_jvp``) the entries are forward-mode directional derivatives of the
    per-example losses, so no ``b x P`` per-example gradients are formed; otherwise the
    per-example gradients are contracted with ``G`` one parameter at a time, one GEMM per
    parameter and component block it meets (:meth:`~explaind_tl.contraction.Blocks.gram_pieces`,
    no ``[b, P]`` concatenation), or, when the components are permuted into blocks, flattened
    once in the working dtype, sorted and contracted in one GEMM per block
    (:meth:`~explaind_tl.contraction.Blocks.gram`).
    """
    R, C = G.shape[0], ctx.n_comp
    if ctx.train_jvp:
        tangents = ctx.layout.unflatten(ctx.per_component(ctx.blocks.unsort(G)).to(ctx.dtype))
        for start in range(0, len(ids), ctx.jvp_chunk):
            cid = ids[start : start + ctx.jvp_chunk]
            tb = {kk: v.to(ctx.device) for kk, v in ctx.traj.batch(cid).items()}
            terms = ctx.plan.n_terms
            dots = lossf.per_example_dots(w_work, tb, tangents, per_token=terms > 0).to(torch.float64)  # [R*C, b(, T)]
            if terms:
                cols = (cid[:, None] * terms + torch.arange(terms)).reshape(-1)
                yield cols, dots.reshape(R, C, -1)
            else:
                yield cid, dots.reshape(R, C, -1)
        return
    slices = ctx.layout.slices
    for start in range(0, len(ids), ctx.train_chunk):
        cid = ids[start : start + ctx.train_chunk]
        tb = {kk: v.to(ctx.device) for kk, v in ctx.traj.batch(cid).items()}
        grads = lossf.per_example_grad(w_work, tb)
        if ctx.blocks.perm is None:  # each parameter's block of gradients as it is: no [b, P] copy
            yield cid, ctx.blocks.gram_pieces(G, [(slices[n].start, grads[n].reshape(len(cid), -1))
                                                   for n in ctx.layout.names])
        else:
            yield cid, ctx.blocks.gram(G, ctx.blocks.sort(ctx.layout.flatten(grads, lead=1, dtype=ctx.dtype)))
