"""Progress measures of induction (Olsson et al. 2022, "In-context learning and induction heads").

Pure functions of attention patterns and per-token losses (testable on constructed patterns),
and thin wrappers that read them from a model through TransformerLens's cache:

* previous-token score of a head: mean attention from position ``q`` to ``q - 1``;
* induction (prefix-matching) score: on a random sequence repeated twice, mean attention from a
  position of the second copy to the token *after* its earlier occurrence (``q - half + 1``);
* in-context-learning score: mean loss late in the context minus early in the context (negative
  once the model uses its context).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def previous_token_score(pattern: Float[Tensor, "batch head query key"]) -> Float[Tensor, "head"]:
    """Mean over batch and query positions ``q >= 1`` of ``pattern[..., q, q - 1]``."""
    diag = torch.diagonal(pattern, offset=-1, dim1=-2, dim2=-1)  # [batch, head, n-1]
    return diag.mean(dim=(0, 2))


def induction_score(pattern: Float[Tensor, "batch head query key"], half: int) -> Float[Tensor, "head"]:
    """On ``[r, r]`` sequences (``r`` of length ``half``): mean over the second copy's positions
    ``q`` of ``pattern[..., q, q - half + 1]`` (the token after the previous occurrence)."""
    diag = torch.diagonal(pattern, offset=-(half - 1), dim1=-2, dim2=-1)  # entries (q, q - half + 1)
    return diag[..., 1:].mean(dim=(0, 2))  # q = half .. 2 half - 1


def icl_score(token_loss: Float[Tensor, "batch pos"], early: slice, late: slice) -> float:
    """Mean per-token loss at the ``late`` predictions minus at the ``early`` ones."""
    return float(token_loss[:, late].mean() - token_loss[:, early].mean())


def icl_slices(n_ctx: int) -> tuple[slice, slice]:
    """Early and late predictions for a context of ``n_ctx`` (prediction ``p`` is of token
    ``p + 1``): the second to fifth predictions, and the last quarter."""
    return slice(1, 5), slice(n_ctx - 1 - max(4, n_ctx // 4), n_ctx - 1)


@torch.no_grad()
def token_losses(model, tokens: Tensor) -> Float[Tensor, "batch pos_minus_1"]:
    """Next-token cross entropy at every prediction (float64)."""
    logits = model(tokens).double()[:, :-1]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


@torch.no_grad()
def head_scores(model, tokens: Tensor, repeated: Tensor) -> dict[str, Tensor]:
    """``{"previous_token": [L, H], "induction": [L, H]}`` on ``tokens`` and on ``repeated``
    (``[r, r]`` sequences)."""
    n_layers = model.cfg.n_layers
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    prev = torch.stack([previous_token_score(cache[n].double()) for n in names])
    _, cache = model.run_with_cache(repeated, names_filter=lambda n: n in names)
    half = repeated.shape[1] // 2
    ind = torch.stack([induction_score(cache[n].double(), half) for n in names])
    return {"previous_token": prev, "induction": ind}


def repeated_random(n: int, half: int, d_vocab: int, seed: int) -> Tensor:
    """``n`` sequences ``[r, r]`` of uniformly random ``r`` (``2 * half`` tokens)."""
    g = torch.Generator().manual_seed(int(seed))
    r = torch.randint(0, d_vocab, (n, half), generator=g)
    return torch.cat([r, r], dim=1)
