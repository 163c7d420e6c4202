"""The standard partition of a ``HookedTransformer``'s parameters (TransformerLens naming).

:func:`tl_assign` maps one parameter name (``blocks.0.attn.W_Q``, ``blocks.0.mlp.W_in``, ...)
to its components at a granularity, with the hook point each serves; :func:`tl_sort_key` orders
the labels as the model computes them. The labels and hook points are tabulated in
:mod:`explaind_tl.model.components`. A model family with other parameter names (e.g.
TransformerLens 4's ``TransformerBridge``) gets a module like this one next to it.
"""

from __future__ import annotations

import re
from typing import Any

import torch

IndexExpr = Any  # int | slice | Ellipsis | None | tuple of those | index tensor

_ATTN_HEAD = re.compile(r"^blocks\.(\d+)\.attn\.(W_Q|W_K|W_V|W_O|b_Q|b_K|b_V)$")
_ATTN_KV = re.compile(r"^blocks\.(\d+)\.attn\.(_W_K|_W_V|_b_K|_b_V)$")
_ATTN_BO = re.compile(r"^blocks\.(\d+)\.attn\.b_O$")
_ATTN_ANY = re.compile(r"^blocks\.(\d+)\.attn\.")
_MLP = re.compile(r"^blocks\.(\d+)\.mlp\.(W_in|W_gate|b_in|b_gate|W_out|b_out)$")
_MLP_ANY = re.compile(r"^blocks\.(\d+)\.mlp\.")
_LN = re.compile(r"^blocks\.(\d+)\.(ln1|ln2)\.(w|b)$")
_LN_FINAL = re.compile(r"^ln_final\.(w|b)$")


def tl_assign(
    name: str, shape: torch.Size, granularity: str, cfg: Any
) -> list[tuple[str, IndexExpr, str]] | None:
    """Assignments ``(label, index_expr, hook)`` for one HookedTransformer parameter.

    Returns ``None`` for a parameter the granularity does not know (caller falls back).
    """
    whole = (Ellipsis,)
    if name == "embed.W_E":
        return [("embed", whole, "hook_embed")]
    if name == "pos_embed.W_pos":
        return [("pos_embed", whole, "hook_pos_embed")]
    if name in ("unembed.W_U", "unembed.b_U"):
        return [("unembed", whole, "logits")]
    if _LN_FINAL.match(name):
        return [("ln_final", whole, "ln_final.hook_scale")]
    if m := _LN.match(name):
        layer, ln = int(m.group(1)), m.group(2)
        return [(f"L{layer}.{ln}", whole, f"blocks.{layer}.{ln}.hook_scale")]

    if m := _ATTN_ANY.match(name):
        layer = int(m.group(1))
        if granularity == "block":
            return [(f"L{layer}.attn", whole, f"blocks.{layer}.hook_attn_out")]
        if _ATTN_BO.match(name):
            return [(f"L{layer}.attn.b_O", whole, f"blocks.{layer}.hook_attn_out")]
        hook = f"blocks.{layer}.attn.hook_z"
        if _ATTN_HEAD.match(name) and len(shape) >= 1 and shape[0] == cfg.n_heads:
            return [(f"L{layer}H{h}", (h,), hook) for h in range(shape[0])]
        n_kv = getattr(cfg, "n_key_value_heads", None)
        if _ATTN_KV.match(name) and len(shape) >= 1 and n_kv is not None and shape[0] == n_kv:
            return [(f"L{layer}KV{g}", (g,), hook) for g in range(shape[0])]
        return None

    if m := _MLP_ANY.match(name):
        layer = int(m.group(1))
        if granularity in ("head", "block"):
            return [(f"L{layer}.mlp", whole, f"blocks.{layer}.mlp.hook_post")]
        mm = _MLP.match(name)
        if mm is None:
            return None
        kind = mm.group(2)
        if kind == "b_out":
            return [(f"L{layer}.mlp.b_out", whole, f"blocks.{layer}.hook_mlp_out")]
        axis = 1 if kind in ("W_in", "W_gate") else 0
        d_mlp = getattr(cfg, "d_mlp", None)
        if len(shape) <= axis or (d_mlp is not None and shape[axis] != d_mlp):
            return None
        hook = f"blocks.{layer}.mlp.hook_post"
        if axis == 0:
            return [(f"L{layer}N{n}", (n,), hook) for n in range(shape[0])]
        return [(f"L{layer}N{n}", (slice(None), n), hook) for n in range(shape[1])]
    return None


def tl_sort_key(label: str) -> tuple:
    """Canonical order: embeddings, then per layer ln1, heads, b_O, ln2, mlp, then final."""
    if label == "embed":
        return (0, 0, 0, 0)
    if label == "pos_embed":
        return (0, 1, 0, 0)
    if m := re.match(r"^L(\d+)\.ln1$", label):
        return (1, int(m.group(1)), 0, 0)
    if m := re.match(r"^L(\d+)H(\d+)$", label):
        return (1, int(m.group(1)), 1, int(m.group(2)))
    if m := re.match(r"^L(\d+)KV(\d+)$", label):
        return (1, int(m.group(1)), 2, int(m.group(2)))
    if m := re.match(r"^L(\d+)\.attn(\.b_O)?$", label):
        return (1, int(m.group(1)), 3, 0)
    if m := re.match(r"^L(\d+)\.ln2$", label):
        return (1, int(m.group(1)), 4, 0)
    if m := re.match(r"^L(\d+)\.mlp$", label):
        return (1, int(m.group(1)), 5, 0)
    if m := re.match(r"^L(\d+)N(\d+)$", label):
        return (1, int(m.group(1)), 5, int(m.group(2)))
    if m := re.match(r"^L(\d+)\.mlp\.b_out$", label):
        return (1, int(m.group(1)), 6, 0)
    if label == "ln_final":
        return (2, 0, 0, 0)
    if label == "unembed":
        return (2, 1, 0, 0)
    return (3, 0, 0, 0)  # fallbacks keep their first-appearance order (stable sort)
