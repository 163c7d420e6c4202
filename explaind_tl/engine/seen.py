"""The seen clock: the adjoint sweep, backwards over the window (docs/design.md §4).

Entries are booked to the step at which a training example's gradient was taken. The adjoint
``Ã_s`` carries every later step's ``φ̂`` back through the optimizer's momentum, so the train
axis costs ``O(rows · P)`` memory, never ``N_train · P``; the non-data pieces of each update
follow the training examples as pseudo-entries (:data:`explaind_tl.axes.PSEUDO`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from explaind_tl.axes import PSEUDO
from explaind_tl.engine import prefetch
from explaind_tl.engine.certify import Certifier
from explaind_tl.engine.resume import Resume
from explaind_tl.engine.setup import Setup
from explaind_tl.model.functional import LossFunction, Params


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
    """
    plan = ctx.plan
    a, b = plan.window
    n_train = ctx.traj.num_train
    col = {lbl: n_train + i for i, lbl in enumerate(PSEUDO)}
    state = resume.load() if resume else None
    A = torch.zeros(plan.n_rows, ctx.layout.numel, dtype=torch.float64, device=ctx.device)
    beta_next = 0.0  # β_{s+1} of the step after the current one (Ã_b = 0 at the window's end)
    done_before = b
    q1 = None
    lossf = None
    if state is not None:
        acc.copy_(state["acc"])
        A = state["A"].to(ctx.device)
        done_before = state["done_before"]
        beta_next = ctx.beta_of(done_before) if done_before < b else 0.0
        cert.restore(state)
    bar = prefetch.progress_bar(progress, total=b - a, initial=b - done_before, desc="explain (train, adjoint)")
    perm = blocks = None
    if ctx.flat_index is not None:
        perm = torch.argsort(ctx.flat_index, stable=True)
        blocks = torch.bincount(ctx.flat_index, minlength=ctx.n_comp).tolist()
    for seg in prefetch.prefetched(ctx.traj.segments(a, done_before, reverse=True), ctx.prefetch):
        for rec in reversed(seg):
            s = rec.step
            if q1 is None:
                q1 = cert.endpoint(rec.next_params, s + 1)
            q0 = cert.endpoint(rec.params, s)
            phi = cert.phi(s, rec.params, rec.next_params, q0, q1)
            q1 = q0
            spec = ctx.step_spec(rec)
            co = ctx.coefficients(rec)
            P = ctx.flat64(co.P)
            e = ctx.flat64(co.e) if co.e is not None else None
            w64 = ctx.flat64(rec.params)
            # Ã_s = P_s ⊙ φ_s + β_{s+1} Ã_{s+1}; gradient gt_s enters with G_s = c_s Ã_s + e_s ⊙ φ_s
            A = P[None, :] * phi + (beta_next * A if co.has_buffer else 0.0)
            beta_next = co.beta if co.has_buffer else 0.0
            G = co.c * A
            if e is not None:
                G = G + e[None, :] * phi
            k = plan.bin_of(s)
            # training examples seen at step s
            ids = rec.batch_ids.to(torch.long)
            scale = rec.clip_factor / len(ids)
            data_sum = torch.zeros(plan.n_rows, ctx.n_comp, dtype=torch.float64)
            if lossf is None:
                lossf = loss_function(ctx)
            for cid, contrib in data_entries(ctx, lossf, G, ids, ctx.to_work(rec.params), perm, blocks):
                contrib = scale * contrib.cpu()
                acc[k].index_add_(2, cid.cpu(), contrib)
                data_sum += contrib.sum(-1)
            # pseudo-examples
            reg = torch.zeros_like(data_sum)
            if co.coupled_wd:
                reg = ctx.reduce(G * (co.coupled_wd * w64)[None, :]).cpu()
                acc[k, :, :, col["regularization"]] += reg
            if co.decoupled_wd:
                acc[k, :, :, col["weight_decay"]] += ctx.reduce(phi * (-co.decoupled_wd * w64)[None, :]).cpu()
            # update residual: with the reconstruction Δ_s = -λ' w_s + P ⊙ b_{s+1} + e ⊙ gt_s + ρ_s,
            # b_{s+1} = β b_s + c gt_s + ε_s, its entry <A, ε_s> + <φ, ρ_s> is
            # X - <G, gt_s>, X = <A, b_{s+1} - β b_s> + <φ, Δ_s + λ' w_s - P ⊙ b_{s+1}>, and
            # <G, gt_s> is what the data and regularization entries of step s add up to. So the
            # entry also carries their rounding (float32 gradients of saturated losses) and every
            # step's entries add up to exactly what its φ and Δ say.
            delta = ctx.flat64(rec.next_params) - w64
            kept = delta + co.decoupled_wd * w64
            if co.has_buffer:
                # ε_s = b_{s+1} - β_s b_s - c_s gt_s (this step's β_s) reaches the output through Ã_s
                b_next = ctx.buffer(rec.state_after, spec)
                b_prev = ctx.buffer(rec.state_before, spec)
                X = ctx.reduce(A * (b_next - co.beta * b_prev)[None, :] + phi * (kept - P * b_next)[None, :])
            else:  # plain SGD: A = P ⊙ φ = G
                X = ctx.reduce(phi * kept[None, :])
            acc[k, :, :, col["update_residual"]] += X.cpu() - data_sum - reg
            if s == a and co.has_buffer:
                # b_{s+1} ∋ Π_{j=a..s} β_j b_a, so b_a enters with β_a Ã_a (β_a: this step's)
                b_a = ctx.buffer(rec.state_before, spec)
                acc[k, :, :, col["history"]] += ctx.reduce(co.beta * A * b_a[None, :]).cpu()
            bar.update(1)
        done_before = seg[0].step
        if resume is not None:
            resume.save({"done_before": done_before, "acc": acc, "A": A.cpu(), **cert.snapshot()})
    bar.close()

def data_entries(
    ctx: Setup,
    lossf: LossFunction,
    G: Float[Tensor, "row param"],
    ids: Tensor,
    w_work: Params,
    perm: Tensor | None,
    blocks: list[int] | None,
) -> Iterator[tuple[Tensor, Float[Tensor, "row component chunk"]]]:
    """``<G_r|_c, ∇ℓ(x_i; w_s)>`` for the training examples ``ids``, chunk by chunk.

    Yields ``(chunk ids, entries [R, C, b])``. With few tangents (rows x components,
    ``ctx.train_jvp``) the entries are forward-mode directional derivatives of the
    per-example losses, so no ``b x P`` per-example gradients are formed; otherwise
    per-example gradients are materialised and contracted.
    """
    R, C = G.shape[0], ctx.n_comp
    if ctx.train_jvp:
        tangents = ctx.layout.unflatten(ctx.per_component(G).to(ctx.dtype))
        for start in range(0, len(ids), ctx.jvp_chunk):
            cid = ids[start : start + ctx.jvp_chunk]
            tb = {kk: v.to(ctx.device) for kk, v in ctx.traj.batch(cid).items()}
            dots = lossf.per_example_dots(w_work, tb, tangents).to(torch.float64)  # [R*C, b]
            yield cid, dots.reshape(R, C, -1)
        return
    for start in range(0, len(ids), ctx.train_chunk):
        cid = ids[start : start + ctx.train_chunk]
        tb = {kk: v.to(ctx.device) for kk, v in ctx.traj.batch(cid).items()}
        grads = ctx.layout.flatten(lossf.per_example_grad(w_work, tb), lead=1, dtype=torch.float64)
        if perm is None:
            contrib = (G @ grads.T)[:, None, :]  # [R, 1, b]
        else:
            Gs, gs = G[:, perm], grads[:, perm]
            contrib = torch.stack(
                [gb_ @ Gb_.T for Gb_, gb_ in zip(torch.split(Gs, blocks, 1), torch.split(gs, blocks, 1))], 1
            ).permute(2, 1, 0)  # [b, C, R] -> [R, C, b]
        yield cid, contrib
