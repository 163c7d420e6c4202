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
