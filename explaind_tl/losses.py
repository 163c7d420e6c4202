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


def next_token_cross_entropy_per_token(model: nn.Module, batch: dict[str, Tensor]) -> Float[Tensor, "batch pos_minus_1"]:
    """:func:`next_token_cross_entropy` split into its token terms: ``[B, n_ctx - 1]``, term
    ``t - 1`` the share of predicting token ``t`` (``ce / (n_ctx - 1)``, or with a loss mask
    ``m_t ce / Σ m``); each row sums to the sequence's loss."""
    tokens = batch["tokens"]
    logits = model(tokens)[:, :-1, :]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:].long(), reduction="none")
    if "loss_mask" not in batch:
        return ce / ce.shape[1]
    m = batch["loss_mask"][:, 1:].to(ce.dtype)
    return ce * m / m.sum(1, keepdim=True).clamp(min=1.0)


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


# the token terms of the loss: what explain's by=("train", "train_position") splits by
next_token_cross_entropy.per_token = next_token_cross_entropy_per_token
