"""The optimizer algebra against what torch.optim actually applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explaind_tl.errors import UnsupportedOptimizerError
from explaind_tl.optim import (
    OptimizerSpec,
    buffer_after,
    build_optimizer,
    load_optimizer_state,
    optimizer_state_to_tensors,
    reconstruct_update,
    spec_from_optimizer,
    state_dict_by_key,
    update_coefficients,
)

CASES = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-2, betas=(0.9, 0.98), weight_decay=0.5),
    "adam_l2": lambda ps: torch.optim.Adam(ps, lr=3e-2, weight_decay=0.1),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.05),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "sgd_dampening": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, dampening=0.3),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("case", list(CASES))
def test_reconstruct_update_matches_torch(case):
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    opt = CASES[case](params)
    spec = spec_from_optimizer(opt, model)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    for s, lr_scale in enumerate([1.0, 0.7, 1.3, 0.5, 1.0]):
        opt.param_groups[0]["lr"] = spec.lr * lr_scale
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        w_s = {n: p.detach().clone() for n, p in zip(names, params)}
        g_s = {n: p.grad.detach().clone() for n, p in zip(names, params)}
        first = not state_dict_by_key(opt, names)
        opt.step()
        state_after = state_dict_by_key(opt, names)
        coeffs = update_coefficients(spec, opt.param_groups[0]["lr"], s + 1, state_after, first)
        b = buffer_after(spec, state_after, g_s, w_s) if spec.has_buffer else None
        rec = reconstruct_update(spec, coeffs, w_s, g_s, b)
        for n, p in zip(names, params):
            true = p.detach().double() - w_s[n].double()
            err = (rec[n] - true).abs()
            tol = 1e-6 * (w_s[n].double().abs() + true.abs())
            assert bool((err <= tol).all()), f"{case} step {s} {n}: max err {err.max():.3g}"
            assert true.abs().max() > 0
        if spec.kind == "sgd" and spec.momentum:
            assert coeffs.c == (1.0 if s == 0 else 1.0 - spec.dampening)


def test_state_roundtrip_and_build():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 5)).sum().backward()
    opt.step()
    spec = spec_from_optimizer(opt, model)
    assert OptimizerSpec.from_dict(spec.to_dict()) == spec
    tensors = optimizer_state_to_tensors(opt, names)
    assert set(tensors) == {f"{k}/{n}" for k in ("step", "exp_avg", "exp_avg_sq") for n in names}
    assert tensors[f"step/{names[0]}"].dtype == torch.float32 and tensors[f"step/{names[0]}"].dim() == 0
    opt2 = build_optimizer(spec, model.parameters())
    assert type(opt2) is torch.optim.AdamW and opt2.param_groups[0]["foreach"] is False
    load_optimizer_state(opt2, tensors, names)
    again = optimizer_state_to_tensors(opt2, names)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.optim.Adagrad(m.parameters()),
        lambda m: torch.optim.Adam(m.parameters(), amsgrad=True),
        lambda m: torch.optim.AdamW(m.parameters(), maximize=True),
        lambda m: torch.optim.Adam(m.parameters(), decoupled_weight_decay=True),
        lambda m: torch.optim.SGD([{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.1}], lr=0.01),
        lambda m: torch.optim.SGD(m[0].parameters(), lr=0.01),
        lambda m: torch.optim.AdamW(m.parameters(), lr=torch.tensor(0.01)),
    ],
    ids=["adagrad", "amsgrad", "maximize", "adam_decoupled", "two_groups", "missing_params", "tensor_lr"],
)
def test_unsupported_optimizers(make):
    model = _model()
    with pytest.raises(UnsupportedOptimizerError, match="supported|exactly"):
        spec_from_optimizer(make(model), model)


@pytest.mark.parametrize("case", list(CASES))
def test_functional_step_matches_torch(case):
    """The pure, differentiable step against torch's own ``optimizer.step()`` in float64, over
    several steps with a changing learning rate (a schedule) and clipping applied first."""
    from explaind_tl.optim import step_hparams
    from explaind_tl.optim_step import clipped, functional_step

    torch.manual_seed(0)
    w0 = {"a": torch.randn(5, 3, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    ps = [nn.Parameter(v.clone()) for v in w0.values()]
    opt = CASES[case](ps)
    for group in opt.param_groups:
        group["foreach"] = False
    spec = spec_from_optimizer(opt, _Named(ps))
    w, state = dict(w0), {}
    for t in range(1, 5):
        opt.param_groups[0]["lr"] = 0.05 / t
        g = clipped({n: 3 * torch.randn_like(v) for n, v in w0.items()}, 1.0)
        for p, n in zip(ps, w0):
            p.grad = g[n].clone()
        hp = step_hparams(opt, spec.kind)
        opt.step()
        w, state = functional_step(spec, hp["lr"], t, w, state, g)
        for p, n in zip(ps, w0):
            assert torch.allclose(p.detach(), w[n], rtol=0, atol=1e-14 * float(p.detach().abs().max()))
    norm = torch.linalg.vector_norm(torch.cat([x.reshape(-1) for x in g.values()]))
    assert float(norm) == pytest.approx(1.0, rel=1e-5)  # clipping was active (3x gradients)


class _Named(nn.Module):
    """A module whose parameters are ``ps`` under the names ``a``, ``b`` (for spec_from_optimizer)."""

    def __init__(self, ps):
        super().__init__()
        self.a, self.b = ps


def test_guarded_sqrt_keeps_reverse_mode_finite_at_zero(monkeypatch):
    """An entry whose gradients were all 0 has Adam's ``v = 0``: reverse mode through the step
    stays finite with the guarded square root, and is NaN with the plain one (the
    counter-example)."""
    from torch.func import vjp

    import explaind_tl.optim_step as optim

    v = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(optim._sqrt_guarded(v).sum(), v)
    assert g.tolist() == [0.0, 0.25]
    spec = OptimizerSpec("adamw", 1e-2, (0.9, 0.98), 1e-8, 0.1)
    w = {"a": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    grad0 = {"a": torch.tensor([0.0, 0.5, -0.2], dtype=torch.float64)}  # entry 0: no gradient yet

    def pull(step):
        (w1, s1), f = vjp(lambda w_, g_: step(spec, 1e-2, 1, w_, {}, g_), w, grad0)
        ones = ({"a": torch.ones(3, dtype=torch.float64)}, {k: {"a": torch.ones(3, dtype=torch.float64)} for k in s1})
        return f(ones)

    lam_w, lam_g = pull(optim.functional_step)
    assert bool(torch.isfinite(lam_g["a"]).all()) and bool(torch.isfinite(lam_w["a"]).all())
    monkeypatch.setattr(optim, "_sqrt_guarded", torch.sqrt)
    _, lam_g_plain = pull(optim.functional_step)
    assert bool(torch.isnan(lam_g_plain["a"][0]))
