"""The optimizer step as a pure, differentiable function (what :func:`explaind_tl.metagradient`
differentiates through).

:mod:`explaind_tl.optim` holds the optimizer algebra in the linear form the decomposition uses;
this module writes the same step term for term as torch's single-tensor implementation, as a
function ``(w_s, state_s, g_s) -> (w_{s+1}, state_{s+1})`` that reverse mode can go through
(tested against ``optimizer.step()`` in float64), and the clipping of
:func:`explaind_tl.run.step.clip_grad_norm` as a differentiable function of the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from explaind_tl.optim import OptimizerSpec, StateDict


def _sqrt_guarded(v: Tensor) -> Tensor:
    """``sqrt(v)`` with derivative 0 (not ``inf``) where ``v = 0``: an entry whose every gradient
    so far was 0 (an unused embedding row) has ``v = 0``, and ``m = 0`` there too, so Adam's
    update does not depend on it; the plain ``sqrt`` would make reverse mode return NaN."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def clipped(g: Mapping[str, Tensor], max_norm: float | None) -> dict[str, Tensor]:
    """``κ g`` with ``κ = min(1, max_norm / (‖g‖ + 1e-6))`` over the global 2-norm, as a
    differentiable function of ``g`` (what :func:`explaind_tl.run.step.clip_grad_norm` does in
    place); ``g`` itself without clipping."""
    if max_norm is None:
        return dict(g)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x, 2.0) for x in g.values()]), 2.0)
    kappa = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return {n: x * kappa for n, x in g.items()}


def functional_step(
    spec: OptimizerSpec,
    lr: float,
    step_count: int,
    w: Mapping[str, Tensor],
    state: StateDict,
    g: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], StateDict]:
    """One optimizer step ``(w_s, state_s, g_s) -> (w_{s+1}, state_{s+1})`` as a pure,
    differentiable function, term for term torch's single-tensor implementation.

    Args:
        spec: the step's spec (:func:`spec_for_step`: its betas, eps, decays, momentum).
        lr: the step's learning rate.
        step_count: torch's step counter after the step, ``t = s + 1``.
        w: parameters before the step.
        state: optimizer state before the step (``{"exp_avg": ..., "exp_avg_sq": ...}`` for
            Adam/AdamW, ``{"momentum_buffer": ...}`` for SGD with momentum); ``{}`` (or missing
            entries) before the first step, as torch initialises it.
        g: the gradient the optimizer sees (clipped, before coupled L2).

    Returns:
        ``(w_next, state_next)``; no tensor passed in is modified.
    """
    lr = float(lr)
    wd = spec.weight_decay
    if spec.kind in ("adam", "adamw"):
        b1, b2 = spec.betas
        t = int(step_count)
        step_size = lr / (1 - b1**t)
        bc2_sqrt = math.sqrt(1 - b2**t)
        m_prev, v_prev = state.get("exp_avg", {}), state.get("exp_avg_sq", {})
        w_next, m_next, v_next = {}, {}, {}
        for n, x in w.items():
            gn = g[n]
            if spec.kind == "adamw":
                x = x * (1 - lr * wd)
            elif wd != 0.0:
                gn = gn + wd * x
            m = m_prev[n] if n in m_prev else torch.zeros_like(gn)
            v = v_prev[n] if n in v_prev else torch.zeros_like(gn)
            m = m + (gn - m) * (1 - b1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
            v = v * b2 + gn * gn * (1 - b2)
            denom = _sqrt_guarded(v) / bc2_sqrt + spec.eps
            w_next[n] = x - step_size * (m / denom)
            m_next[n], v_next[n] = m, v
        return w_next, {"exp_avg": m_next, "exp_avg_sq": v_next}
    mu = spec.momentum
    buf_prev = state.get("momentum_buffer", {})
    w_next, buf_next = {}, {}
    for n, x in w.items():
        gn = g[n] if wd == 0.0 else g[n] + wd * x
        if mu != 0.0:
            buf = gn if n not in buf_prev else buf_prev[n] * mu + gn * (1 - spec.dampening)
            buf_next[n] = buf
            gn = gn + mu * buf if spec.nesterov else buf
        w_next[n] = x - lr * gn
    return w_next, ({"momentum_buffer": buf_next} if mu != 0.0 else {})
