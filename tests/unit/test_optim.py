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
