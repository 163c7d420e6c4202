"""Shared fixtures: a tiny HookedTransformer config and a tiny modular-addition dataset."""

from __future__ import annotations

import pytest
import torch

# Tiny models: intra-op threads only add overhead, and on a shared 2-core CI box spinning
# OpenMP workers make small ops ~100x slower. Replay uses the recorded thread count anyway.
torch.set_num_threads(1)


def tiny_config(p: int = 7, **overrides):
    """A 1-layer, ReLU, LayerNorm-free HookedTransformerConfig for modular addition mod ``p``."""
    from transformer_lens import HookedTransformerConfig

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
    from transformer_lens import HookedTransformer

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
