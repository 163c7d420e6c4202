"""The scaled float comparisons of conftest: rounding passes, a real difference fails."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled, assert_steps_certified, max_abs

from explaind_tl.attribution import Completeness


def test_scale_is_the_family_maximum():
    grads = {"W": torch.tensor([9e3, -2.0], dtype=torch.float64), "b_K": torch.tensor([0.0], dtype=torch.float64)}
    noisy = {"W": grads["W"] * (1 + 1e-15), "b_K": torch.tensor([1e-12], dtype=torch.float64)}
    assert max_abs(grads) == 9e3 and max_abs(2.5, [-3.0]) == 3.0
    assert_close_scaled(noisy, grads, 1e-12)  # noise on an analytically zero member passes
    with pytest.raises(AssertionError, match="b_K"):
        assert_close_scaled({**noisy, "b_K": torch.tensor([1e-6], dtype=torch.float64)}, grads, 1e-12)
    with pytest.raises(AssertionError):
        assert_close_scaled({"W": grads["W"]}, grads, 1e-12)  # a missing member


def test_explicit_scale_rtol_and_zero_reference():
    assert_close_scaled(1.0 + 1e-9, 1.0, 1e-12, scale=1e4)  # a sum of |terms| of 1e4
    with pytest.raises(AssertionError):
        assert_close_scaled(1.0 + 1e-9, 1.0, 1e-12)
    assert_close_scaled([2.0, 4.0 + 2e-10], [2.0, 4.0], 0.0, rtol=1e-10)
    with pytest.raises(AssertionError):
        assert_close_scaled([2.0, 4.0 + 8e-10], [2.0, 4.0], 0.0, rtol=1e-10)
    assert_close_scaled(torch.zeros(3), torch.zeros(3), 1e-12)
    with pytest.raises(AssertionError):
        assert_close_scaled(torch.full((3,), 1e-300, dtype=torch.float64), torch.zeros(3), 1e-12)


def test_steps_certified():
    meas = torch.tensor([[1.0], [1e-3], [0.0]], dtype=torch.float64)
    ok = Completeness(measured=meas.sum(0), attributed=meas.sum(0), step_measured=meas,
                      step_residual=torch.tensor([[5e-7], [5e-10], [1e-13]], dtype=torch.float64),
                      nodes=torch.tensor([2, 2, 2]))
    assert_steps_certified(ok, 1e-6)
    ok.step_residual[1, 0] = 2e-9  # 2e-6 of its own change: not certified to 1e-6
    with pytest.raises(AssertionError):
        assert_steps_certified(ok, 1e-6)
