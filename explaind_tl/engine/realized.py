"""The realized clock: a forward sweep over the window (docs/design.md §3, §4).

Each entry of step ``s`` is ``<φ̂_s, v>`` for a flat update vector ``v``: ``Δ_s`` itself, or,
with a source axis, its pieces (data, momentum history carried into the window, weight decay,
coupled-L2 regularization, and the update residual left by the reconstruction), restricted to
each component.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from explaind_tl.engine import prefetch
from explaind_tl.engine.certify import Certifier
from explaind_tl.engine.resume import Resume
from explaind_tl.engine.setup import Setup
from explaind_tl.optim import reconstruct_update


def run_realized(ctx: Setup, cert: Certifier, progress: bool, acc: Tensor, resume: Resume | None) -> None:
    """Forward sweep on the realized clock: the entries of every step, into ``acc [bin, row,
    component, x]`` (``x``: the sources, or one column without a source axis)."""
    plan = ctx.plan
    a, b = ctx.sweep_window
    want_sources = "source" in plan.by
    state = resume.load() if resume else None
    start = a
    H = Rb = None
    q0 = None
    if state is not None:
        start = state["next_step"]
        acc.copy_(state["acc"])
        H, Rb = state["H"], state["Rb"]
        cert.restore(state)
    bar = prefetch.progress_bar(progress, total=b - a, initial=start - a, desc="explain (step x component)")
    # with a background replay, the certificate's forwards at w_{s+1} run on that thread too
    measure = (lambda seg: [cert.measure(r.next_params) for r in seg]) if ctx.prefetch and cert.measures_in_background() else None
    for item in prefetch.prefetched(ctx.traj.segments(start, b), ctx.prefetch, measure):
        seg, measured = item if measure is not None else (item, None)
        for i, rec in enumerate(seg):
            s = rec.step
            if q0 is None:
                q0 = cert.endpoint(rec.params, s)
            q1 = cert.endpoint(rec.next_params, s + 1, measured=None if measured is None else measured[i])
            vectors = realized_vectors(ctx, rec, want_sources, H, Rb)
            if want_sources:
                vectors, H, Rb = vectors
            k = plan.bin_of(s)
            if ctx.directional:
                V = ctx.per_component(torch.stack(vectors))  # one tangent per (vector, component)
                vals = cert.phi(s, rec.params, rec.next_params, q0, q1, vectors=V)  # [R, X*C]
                acc[k] += vals.reshape(vals.shape[0], len(vectors), ctx.n_comp).transpose(1, 2).cpu()
            else:
                phi = cert.phi(s, rec.params, rec.next_params, q0, q1)
                for x, vec in enumerate(vectors):
                    acc[k, :, :, x] += ctx.reduce(phi * vec[None, :]).cpu()
            q0 = q1
            bar.update(1)
        if resume is not None:
            resume.save({"next_step": seg[-1].step + 1, "acc": acc, "H": H, "Rb": Rb, **cert.snapshot()})
    bar.close()

def realized_vectors(ctx: Setup, rec: Any, want_sources: bool, H: Tensor | None, Rb: Tensor | None):
    """Flat float64 vectors whose inner products with ``φ̂_s`` give the entries of step ``s``."""
    w64 = ctx.flat64(rec.params)
    delta = ctx.flat64(rec.next_params) - w64
    if not want_sources:
        return [delta]
    spec = ctx.step_spec(rec)
    co = ctx.coefficients(rec)
    g64 = ctx.flat64(rec.grad)
    P = ctx.flat64(co.P)
    e = ctx.flat64(co.e) if co.e is not None else None
    if co.has_buffer:
        b_next = ctx.buffer(rec.state_after, spec)
    else:
        b_next = g64 + co.coupled_wd * w64
    if H is None:  # window start: momentum carried in from before the window
        H = ctx.buffer(rec.state_before, spec)
        Rb = torch.zeros_like(H)
    # b_{s+1} = β_s b_s + c_s gt_s with this step's β_s, c_s: the history part
    # H_{s+1} = β_s H_s (H_a = b_a) and the coupled-L2 part Rb_{s+1} = β_s Rb_s + c_s λ_s w_s
    if co.has_buffer:
        H = co.beta * H
        Rb = co.beta * Rb + co.c * co.coupled_wd * w64
    else:
        H = torch.zeros_like(w64)
        Rb = co.coupled_wd * w64
    dhat = ctx.layout.flatten(
        reconstruct_update(spec, co, rec.params, rec.grad, ctx.layout.unflatten(b_next)), dtype=torch.float64
    ).to(ctx.device)
    vec = {
        "data": P * (b_next - H - Rb) + (e * g64 if e is not None else 0.0),
        "history": P * H,
        "weight_decay": -co.decoupled_wd * w64,
        "regularization": P * Rb + (e * co.coupled_wd * w64 if e is not None else 0.0),
        "update_residual": delta - dhat,
    }
    return [vec[lbl] for lbl in ctx.plan.x_labels], H, Rb
