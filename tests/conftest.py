"""Shared fixtures and helpers: a tiny HookedTransformer config, a tiny modular-addition dataset,
and float comparisons whose tolerance is scaled to the size of the compared quantity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

# Tiny models: intra-op threads only add overhead, and on a shared 2-core CI box spinning
# OpenMP workers make small ops ~100x slower. Replay uses the recorded thread count anyway.
torch.set_num_threads(1)

TINY = torch.finfo(torch.float64).tiny


def _as64(x) -> torch.Tensor:
    """``x`` (tensor, array, pandas column, number) as a float64 tensor."""
    return x.detach().double() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float64))


def max_abs(*xs) -> float:
    """The largest magnitude over ``xs``: tensors, arrays, numbers, or dicts of them (a family)."""
    m = 0.0
    for x in xs:
        if isinstance(x, dict):
            m = max(m, max_abs(*x.values()))
        elif (t := _as64(x)).numel():
            m = max(m, float(t.abs().max()))
    return m


def assert_close_scaled(actual, expected, k: float, *, scale: float | None = None, rtol: float = 0.0) -> None:
    """Assert ``|actual - expected| <= k * scale + rtol * |expected|`` elementwise.

    CPUs round differently (Intel, AMD and ARM BLAS and vectorised reductions sum in different
    orders), so an absolute tolerance one machine happens to meet says nothing on another. The
    absolute part is therefore relative to the size of the quantity: ``scale`` defaults to the
    largest magnitude of ``expected`` -- over all its tensors when it is a dict (a family such as
    all parameter gradients, whose rounding is set by the largest of them, so an analytically
    zero member is judged against the family, not against its own rounding noise).

    Args:
        actual: A tensor, array, pandas column or number, or a dict of them.
        expected: The reference, with the same structure (and keys) as ``actual``.
        k: Tolerance relative to ``scale`` (float64: about 1e-12 to 1e-10; float32: about 1e-5).
        scale: The magnitude the rounding is relative to (for a sum of signed terms: the sum of
            their absolute values). Default ``max_abs(expected)``; floored at the smallest normal
            float64, so an all-zero reference demands (near) exact zeros.
        rtol: An extra elementwise relative tolerance.
    """
    scale = max(max_abs(expected) if scale is None else float(scale), TINY)
    atol = k * scale
    if isinstance(expected, dict):
        assert set(actual) == set(expected), set(actual) ^ set(expected)
        pairs = [(key, actual[key], expected[key]) for key in expected]
    else:
        pairs = [("", actual, expected)]
    for key, a, e in pairs:
        note = f"{key} (atol {atol:.3g} = {k:g} x scale {scale:.3g}, rtol {rtol:g})"
        torch.testing.assert_close(_as64(a), _as64(e), rtol=rtol, atol=atol, msg=lambda m, note=note: f"{note}: {m}")


def assert_steps_certified(completeness, tol: float, floor: float = 1e-12) -> None:
    """Every step's certificate residual is within ``tol`` of its own measured change.

    The engine accepts a step at ``tol * |change| + 16 eps * sum|phi * delta|``; the second term
    (the rounding floor of the step's inner product) is not stored, so the floor here is
    ``floor`` times the largest step change of the run instead of an absolute number.
    """
    sm = completeness.step_measured.abs()
    bound = tol * sm + floor * float(sm.max())
    assert bool((completeness.step_residual.abs() <= bound).all()), completeness.step_residual


def hooked_transformer_classes():
    """``(HookedTransformer, HookedTransformerConfig)``; the test is skipped where TransformerLens
    has none (4.x, where ``make test-tl4`` runs the suite that does not need them)."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as exc:
        pytest.skip(f"needs HookedTransformer (TransformerLens 3.x): {exc}")
    return HookedTransformer, HookedTransformerConfig


def tiny_config(p: int = 7, **overrides):
    """A 1-layer, ReLU, LayerNorm-free HookedTransformerConfig for modular addition mod ``p``."""
    _, HookedTransformerConfig = hooked_transformer_classes()

    kw = dict(
        n_layers=1,
        d_model=16,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=p + 1,
        d_vocab_out=p,
        n_ctx=3,
        act_fn="relu",
        normalization_type=None,
        seed=0,
    )
    kw.update(overrides)
    return HookedTransformerConfig(**kw)


def tiny_model(p: int = 7, seed: int = 0, **overrides):
    """A freshly initialised tiny HookedTransformer (seeded)."""
    HookedTransformer, _ = hooked_transformer_classes()

    torch.manual_seed(seed)
    return HookedTransformer(tiny_config(p, **overrides))


def modular_addition(p: int = 7, frac: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows ``tokens = [a, b, p]``, ``label = (a + b) mod p``; a seeded ``frac`` subset."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    label = (a + b) % p
    if frac < 1.0:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(p * p, generator=g)[: int(frac * p * p)]
        tokens, label = tokens[keep], label[keep]
    return {"tokens": tokens, "label": label}


def modular_data(p: int = 7, n_train: int = 14, n_test: int = 5, seed: int = 0):
    """A seeded permutation of all ``p**2`` pairs: ``n_train`` training rows, then ``n_test`` test rows."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(p * p, generator=g)
    a, b = perm // p, perm % p
    tokens = torch.stack([a, b, torch.full_like(a, p)], 1)
    labels = (a + b) % p
    train = {"tokens": tokens[:n_train], "label": labels[:n_train]}
    test = {"tokens": tokens[n_train : n_train + n_test], "label": labels[n_train : n_train + n_test]}
    return train, test


@pytest.fixture
def tiny_data():
    return modular_addition(7)


class DiesAfterOneSegment:
    """A trajectory whose replay dies after its first checkpoint segment (a killed explain job)."""

    def __init__(self, traj) -> None:
        self._traj = traj

    def __getattr__(self, name):
        return getattr(self._traj, name)

    def segments(self, *args, **kwargs):
        it = self._traj.segments(*args, **kwargs)
        yield next(it)
        raise RuntimeError("killed")
