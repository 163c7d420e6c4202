"""Per-example loss functions with the ``loss_fn(model, batch) -> [B]`` contract."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn


def last_token_cross_entropy(model: nn.Module, batch: dict[str, Tensor]) -> Float[Tensor, "batch"]:
    """Cross entropy of the logits at the last position against ``batch["label"]``.

    Args:
        model: Maps ``batch["tokens"]`` ``[B, n_ctx]`` to logits ``[B, n_ctx, d_vocab_out]``.
        batch: ``{"tokens": LongTensor[B, n_ctx], "label": LongTensor[B], ...}``.

    Returns:
        Per-example losses ``[B]``.
    """
    logits = model(batch["tokens"])[:, -1, :]
    return torch.nn.functional.cross_entropy(logits, batch["label"], reduction="none")


def next_token_cross_entropy(model: nn.Module, batch: dict[str, Tensor]) -> Float[Tensor, "batch"]:
    """Per-sequence language-model loss: the mean over predicted tokens of the cross entropy of
    the logits at position ``p`` against ``tokens[p + 1]``.

    Args:
        model: Maps ``batch["tokens"]`` ``[B, n_ctx]`` to logits ``[B, n_ctx, d_vocab]``.
        batch: ``{"tokens": LongTensor[B, n_ctx]}``, optionally ``"loss_mask"``
            ``BoolTensor[B, n_ctx]``: which tokens' predictions count (position 0 is never
            predicted); the mean is over those, and a sequence with none counts 0.

    Returns:
        Per-sequence losses ``[B]``.
    """
    tokens = batch["tokens"]
    logits = model(tokens)[:, :-1, :]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:].long(), reduction="none")  # [B, n-1]
    if "loss_mask" not in batch:
        return ce.mean(1)
    m = batch["loss_mask"][:, 1:].to(ce.dtype)
    return (ce * m).sum(1) / m.sum(1).clamp(min=1.0)
