"""The induction task: generated sequences, the model and the optimizer of each preset.

Data (no downloads; a pure function of the seed, :func:`make_sequences`): a mixture of

* **repeat sequences**: uniformly random tokens in which a random segment of ``seg_min`` to
  ``seg_max`` tokens is copied to a random later offset. Only an induction mechanism ("find the
  previous occurrence of the current token, predict what followed it") predicts the copied
  tokens after the first; the offset varies so that no head can cheat by position;
* **bigram sequences**: sampled from one fixed random bigram model (a seeded transition
  matrix): predictable from the current token alone, with nothing to copy.

Each row has ``tokens`` ``[n_ctx]``, ``copy_mask`` ``[n_ctx]`` (bool: the copied tokens after
the first, the ones induction can predict), ``is_repeat`` and ``copy_len``. The training loss is
:func:`explaind_tl.losses.next_token_cross_entropy` over every token; ``copy_mask`` becomes the
queries' ``loss_mask`` when explaining the in-context log-prob.

Presets (:data:`CONFIGS`): ``default`` (2 layers, attention only, LayerNorm, d_model 64, 4 heads,
context 32, vocabulary 32, 100k sequences, 75% of them repeat sequences, batch 64, AdamW lr 1e-3,
2,000 steps; measured on the 2-core machine: induction scores rise from 0.05 to ~0.5 between
steps 900 and 1,200, training ~40 s) and ``tiny`` (seconds, for tests; too short to form
induction heads).

Measured while choosing the default (2,000 steps each, same seeds): with half the sequences
repeats, no induction head formed (best induction score 0.06); with 75%, 90% and 100% they
formed between steps 700 and 1,200. A run that drew the copy's source first and the destination
uniformly after it (short distances dominate), with AdamW betas (0.9, 0.98), formed no
induction heads in 4,000 steps even with every sequence a repeat: its layer-0 heads attended
at a roughly fixed distance instead. With the destination drawn first and PyTorch's default
betas they formed; the two changes were not separated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CONFIGS", "InductionConfig", "get_config", "make_sequences"]


@dataclass(frozen=True)
class InductionConfig:
    """One preset of the induction study (all sizes in tokens)."""

    name: str
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_head: int = 16
    n_ctx: int = 32
    d_vocab: int = 32
    n_train: int = 100_000
    repeat_fraction: float = 0.75
    seg_min: int = 6
    seg_max: int = 12
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    checkpoint_every: int = 100
    log_every: int = 50
    n_eval: int = 512  # held-out sequences for the scores (each kind)
    n_queries: int = 64  # held-out repeat sequences explained
    window_steps: int = 300  # width of the phase-change window of the train-axis explain
    top_k: int = 10
    seed: int = 0
    backend: str = "auto"  # "hooked": HookedTransformer (TransformerLens 3); "bridge": TransformerBridge; "auto"

    def replace(self, **kw: Any) -> InductionConfig:
        return dataclasses.replace(self, **kw)

    def make_model(self):
        """A fresh seeded 2-layer attention-only transformer with LayerNorm: a ``HookedTransformer``,
        or (``backend="bridge"``) a ``TransformerBridge`` booted natively and initialised as the
        ``HookedTransformer`` is (the same numbers for the same seed)."""
        dims = dict(n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads, d_head=self.d_head,
                    n_ctx=self.n_ctx, d_vocab=self.d_vocab, attn_only=True, normalization_type="LN",
                    positional_embedding_type="standard")
        backend = resolve_backend(self.backend)
        if backend == "bridge":
            from transformer_lens.config import TransformerBridgeConfig
            from transformer_lens.model_bridge import TransformerBridge

            from explaind_tl.model.bridge import init_like_hooked_transformer

            return init_like_hooked_transformer(TransformerBridge.boot_native(TransformerBridgeConfig(**dims)), self.seed)
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        torch.manual_seed(self.seed)
        return HookedTransformer(HookedTransformerConfig(seed=self.seed, device="cpu", **dims))

    def make_optimizer(self, model):
        return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def resolve_backend(backend: str) -> str:
    """``"hooked"`` or ``"bridge"``; ``"auto"``: hooked where TransformerLens still has
    ``HookedTransformer`` (3.x), else bridge (4.x)."""
    if backend not in ("auto", "hooked", "bridge"):
        raise ValueError(f"backend must be 'auto', 'hooked' or 'bridge', got {backend!r}")
    if backend != "auto":
        return backend
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return "bridge"
    return "hooked"


CONFIGS = {
    "default": InductionConfig("default"),
    "tiny": InductionConfig(
        "tiny", d_model=16, n_heads=2, d_head=8, n_ctx=16, d_vocab=16, n_train=512, seg_min=3, seg_max=5, steps=40,
        batch_size=16, lr=5e-3, checkpoint_every=10, log_every=10, n_eval=32, n_queries=6, window_steps=10, top_k=5,
    ),
}


def get_config(name: str) -> InductionConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown induction config {name!r}; choose one of {sorted(CONFIGS)}")
    return CONFIGS[name]


def bigram_matrix(d_vocab: int, seed: int, temperature: float = 2.0) -> torch.Tensor:
    """The fixed random bigram model: row ``a`` is ``P(next | a)`` (``[d_vocab, d_vocab]``)."""
    g = torch.Generator().manual_seed(10_000 + int(seed))
    return torch.softmax(temperature * torch.randn(d_vocab, d_vocab, generator=g, dtype=torch.float64), dim=1)


def make_sequences(cfg: InductionConfig, n: int, seed: int, repeat_fraction: float | None = None) -> dict[str, torch.Tensor]:
    """``n`` sequences of the mixture (see the module docstring), a pure function of ``seed``.

    Returns:
        ``tokens`` ``[n, n_ctx]`` int64, ``copy_mask`` ``[n, n_ctx]`` bool, ``is_repeat`` ``[n]``
        bool, ``copy_len`` ``[n]`` int64 (0 for bigram rows).
    """
    frac = cfg.repeat_fraction if repeat_fraction is None else repeat_fraction
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"repeat_fraction must be in [0, 1], got {frac}")
    if not 2 <= cfg.seg_min <= cfg.seg_max or 2 * cfg.seg_max > cfg.n_ctx:
        raise ValueError(f"need 2 <= seg_min <= seg_max <= n_ctx / 2, got {cfg.seg_min}, {cfg.seg_max}, {cfg.n_ctx}")
    g = torch.Generator().manual_seed(int(seed))
    V, T = cfg.d_vocab, cfg.n_ctx
    is_repeat = torch.rand(n, generator=g) < frac
    tokens = torch.randint(0, V, (n, T), generator=g)
    # bigram rows: a chain from a uniform first token
    P = bigram_matrix(V, cfg.seed)
    chain = torch.empty(n, T, dtype=torch.long)
    chain[:, 0] = torch.randint(0, V, (n,), generator=g)
    for t in range(1, T):
        chain[:, t] = torch.multinomial(P[chain[:, t - 1]], 1, generator=g)[:, 0]
    tokens = torch.where(is_repeat[:, None], tokens, chain)
    # repeat rows: copy [a, a + L) to [b, b + L), b >= a + L; the destination first (uniform),
    # then the source (uniform before it), so the distance b - a is spread out
    L = torch.randint(cfg.seg_min, cfg.seg_max + 1, (n,), generator=g)
    b = L + (torch.rand(n, generator=g) * (T - 2 * L + 1)).long()
    a = (torch.rand(n, generator=g) * (b - L + 1)).long()
    pos = torch.arange(T)
    j = pos[None, :] - b[:, None]  # index inside the copy
    in_copy = (j >= 0) & (j < L[:, None]) & is_repeat[:, None]
    src = (a[:, None] + j).clamp(0, T - 1)
    tokens = torch.where(in_copy, tokens.gather(1, src), tokens)
    copy_mask = in_copy & (j >= 1)
    return {"tokens": tokens, "copy_mask": copy_mask, "is_repeat": is_repeat,
            "copy_len": torch.where(is_repeat, L, torch.zeros_like(L))}
