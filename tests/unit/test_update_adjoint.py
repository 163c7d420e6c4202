"""The adjoint's buffer update ``out = coef · prev + Pw ⊙ phi`` (:func:`update_adjoint`) against
the expression itself in float64, for each way ``out`` may alias its inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled

from explaind_tl.engine.seen import update_adjoint


@pytest.mark.parametrize("coef", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("alias", ["none", "prev", "phi"])
def test_update_adjoint_against_the_expression(coef, alias):
    g = torch.Generator().manual_seed(0)
    prev, phi = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    Pw = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    want = coef * prev + Pw * phi
    prev_in, phi_in = prev.clone(), phi.clone()
    out = {"none": torch.full((5, 7), float("nan"), dtype=torch.float64), "prev": prev_in, "phi": phi_in}[alias]
    update_adjoint(out, prev_in, phi_in, Pw, coef)
    assert_close_scaled(out, want, 1e-15)
    if alias != "prev":
        assert torch.equal(prev_in, prev)  # an input it does not write is left as it was
    if alias != "phi":
        assert torch.equal(phi_in, phi)
