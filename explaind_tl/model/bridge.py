"""TransformerLens's ``TransformerBridge`` behind the model seam (TransformerLens 4, and 3.x's
``transformer_lens.model_bridge``).

A bridge built with ``TransformerBridge.boot_native(TransformerBridgeConfig(...))`` wraps plain
``nn.Linear`` / ``nn.Embedding`` modules: its parameters are named
``layers.{l}._original_component.attn._original_component.q._original_component.weight`` and so
on, the heads fused in ``[n_heads * d_head, d_model]`` (q, k, v) and ``[d_model, n_heads * d_head]``
(o) weights. :func:`bridge_assign` maps each parameter to the labels a ``HookedTransformer``'s
parameters get (``embed``, ``pos_embed``, ``L{l}H{h}``, ``L{l}.attn.b_O``, ``L{l}.mlp``,
``L{l}N{n}``, ``L{l}.mlp.b_out``, ``L{l}.ln1/ln2``, ``ln_final``, ``unembed``), splitting the
fused weights by head (rows of q/k/v, columns of o) and the MLP by neuron (rows of ``fc_in``,
columns of ``fc_out``). Nothing here imports transformer_lens.

A run stores a bridge by its config (:func:`bridge_config_to_dict`; rebuilt by
:func:`build_bridge`, ``boot_native``) or, when one is given, by a ``model_factory``. Explain
uses the model's own forward (no read-out forward); ReLU kinks are observed and forced through
the bridge's hook points on the MLP's input and output linear layers.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch

_WRAP = "._original_component"
_EMBED = re.compile(r"^tok_embed\.weight$")
_POS = re.compile(r"^pos\.weight$")
_LN = re.compile(r"^layers\.(\d+)\.(ln1|ln2)\.(weight|bias)$")
_ATTN = re.compile(r"^layers\.(\d+)\.attn\.(q|k|v|o)\.(weight|bias)$")
_MLP = re.compile(r"^layers\.(\d+)\.mlp\.(fc_in|fc_out)\.(weight|bias)$")
_LN_FINAL = re.compile(r"^ln_out\.(weight|bias)$")
_HEAD = re.compile(r"^head\.(weight|bias)$")


def is_transformer_bridge(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge`` (decided by the class
    hierarchy, without importing transformer_lens)."""
    for cls in type(model).__mro__:
        if cls.__name__ == "TransformerBridge" and cls.__module__.startswith("transformer_lens"):
            return True
    return False


def bridge_name(name: str) -> str:
    """A bridge parameter name without its ``._original_component`` wrappers
    (``layers.0.attn.q.weight``)."""
    return name.replace(_WRAP, "")


_HOOKED_NAMES = {"tok_embed.weight": "embed.W_E", "pos.weight": "pos_embed.W_pos", "head.weight": "unembed.W_U",
                 "head.bias": "unembed.b_U", "ln_out.weight": "ln_final.w", "ln_out.bias": "ln_final.b"}
_HOOKED_LAYER = {"ln1.weight": "ln1.w", "ln1.bias": "ln1.b", "ln2.weight": "ln2.w", "ln2.bias": "ln2.b",
                 "attn.o.bias": "attn.b_O", "mlp.fc_in.weight": "mlp.W_in", "mlp.fc_in.bias": "mlp.b_in",
                 "mlp.fc_out.weight": "mlp.W_out", "mlp.fc_out.bias": "mlp.b_out"}


def hooked_name(name: str) -> str:
    """The ``HookedTransformer`` name of the parameter a bridge parameter holds (its layout may
    differ: ``fc_in.weight`` is ``W_in`` transposed; the fused q/k/v/o weights have no single
    name and keep theirs). Other names are returned as they are."""
    short = bridge_name(name)
    if short in _HOOKED_NAMES:
        return _HOOKED_NAMES[short]
    m = re.match(r"^layers\.(\d+)\.(.*)$", short)
    if m and m.group(2) in _HOOKED_LAYER:
        return f"blocks.{m.group(1)}.{_HOOKED_LAYER[m.group(2)]}"
    return name


def embedding_matrix(model: Any) -> torch.Tensor:
    """The token embedding ``W_E`` ``[d_vocab, d_model]`` of a ``HookedTransformer`` or a bridge."""
    if is_transformer_bridge(model):
        return dict(model.named_parameters())["tok_embed._original_component.weight"]
    return model.W_E


def bridge_assign(name: str, shape: torch.Size, granularity: str, cfg: Any) -> list[tuple[str, Any, str]] | None:
    """Assignments ``(label, index_expr, hook)`` of one bridge parameter at a granularity, with
    the labels and hook points of the equivalent ``HookedTransformer`` parameter; ``None`` for a
    parameter it does not know (the caller gives it its own component)."""
    whole = (Ellipsis,)
    short = bridge_name(name)
    if _EMBED.match(short):
        return [("embed", whole, "hook_embed")]
    if _POS.match(short):
        return [("pos_embed", whole, "hook_pos_embed")]
    if _HEAD.match(short):
        return [("unembed", whole, "logits")]
    if _LN_FINAL.match(short):
        return [("ln_final", whole, "ln_final.hook_scale")]
    if m := _LN.match(short):
        layer, ln = int(m.group(1)), m.group(2)
        return [(f"L{layer}.{ln}", whole, f"blocks.{layer}.{ln}.hook_scale")]
    if m := _ATTN.match(short):
        layer, proj, kind = int(m.group(1)), m.group(2), m.group(3)
        if granularity == "block":
            return [(f"L{layer}.attn", whole, f"blocks.{layer}.hook_attn_out")]
        if proj == "o" and kind == "bias":
            return [(f"L{layer}.attn.b_O", whole, f"blocks.{layer}.hook_attn_out")]
        n_heads, d_head = int(cfg.n_heads), int(cfg.d_head)
        fused = shape[1] if proj == "o" else shape[0]
        if fused != n_heads * d_head:
            return None
        hook = f"blocks.{layer}.attn.hook_z"
        rows = [slice(h * d_head, (h + 1) * d_head) for h in range(n_heads)]
        if proj == "o":  # [d_model, n_heads * d_head]: head h's columns
            return [(f"L{layer}H{h}", (slice(None), r), hook) for h, r in enumerate(rows)]
        return [(f"L{layer}H{h}", (r,), hook) for h, r in enumerate(rows)]
    if m := _MLP.match(short):
        layer, lin, kind = int(m.group(1)), m.group(2), m.group(3)
        if granularity in ("head", "block"):
            return [(f"L{layer}.mlp", whole, f"blocks.{layer}.mlp.hook_post")]
        if lin == "fc_out" and kind == "bias":
            return [(f"L{layer}.mlp.b_out", whole, f"blocks.{layer}.hook_mlp_out")]
        d_mlp = int(cfg.d_mlp)
        axis = 1 if lin == "fc_out" and kind == "weight" else 0
        if len(shape) <= axis or shape[axis] != d_mlp:
            return None
        hook = f"blocks.{layer}.mlp.hook_post"
        if axis == 0:
            return [(f"L{layer}N{n}", (n,), hook) for n in range(d_mlp)]
        return [(f"L{layer}N{n}", (slice(None), n), hook) for n in range(d_mlp)]
    return None


def bridge_relu_hooks(model: Any) -> list[tuple[str, str]]:
    """``(pre-activation hook, post-activation hook)`` per MLP layer of a ReLU bridge model (the
    output of its ``fc_in`` and the input of its ``fc_out``), ``[]`` for other activations."""
    cfg = model.cfg
    if getattr(cfg, "attn_only", False) or str(getattr(cfg, "act_fn", "")).lower() != "relu":
        return []
    return [(f"blocks.{layer}.mlp.in.hook_out", f"blocks.{layer}.mlp.out.hook_in") for layer in range(int(cfg.n_layers))]


def bridge_config_to_dict(cfg: Any) -> dict[str, Any]:
    """The constructor arguments of a ``TransformerBridgeConfig`` as JSON (dtype as a string):
    what :func:`build_bridge` needs to boot the same architecture again."""
    from explaind_tl.run.storage import to_jsonable

    accepted = set(inspect.signature(type(cfg).__init__).parameters) - {"self", "kwargs"}
    if dataclasses.is_dataclass(cfg):  # fields set through **kwargs (d_mlp) too
        accepted |= {f.name for f in dataclasses.fields(cfg)}
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    return to_jsonable({k: v for k, v in d.items() if k in accepted and k not in ("device", "seed", "n_params")})


def build_bridge(config: Mapping[str, Any]) -> Any:
    """``TransformerBridge.boot_native`` of a stored config (:func:`bridge_config_to_dict`), on the CPU."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    kw = dict(config)
    if isinstance(kw.get("dtype"), str) and kw["dtype"].startswith("torch."):
        kw["dtype"] = getattr(torch, kw["dtype"].split(".", 1)[1])
    kw["device"] = "cpu"
    return TransformerBridge.boot_native(TransformerBridgeConfig(**kw))


def init_like_hooked_transformer(model: Any, seed: int | None = None) -> Any:
    """Re-initialise a bridge as a ``HookedTransformer`` of the same config initialises itself
    (TransformerLens 3, ``init_mode="gpt2"``): every weight matrix ``N(0, initializer_range)``
    (``0.8 / sqrt(d_model)`` unless the config sets it), biases 0, LayerNorm scales 1. With the
    same ``seed``, the numbers are the ones the ``HookedTransformer`` draws (its order:
    ``W_E``, ``W_pos``, per layer ``W_Q, W_O, W_K, W_V`` then ``W_in, W_out``, then ``W_U``),
    laid out in the bridge's fused weights. ``boot_native``'s own initialisation has another
    scale, with which the grokking and induction runs do not reproduce. Returns ``model``.
    """
    import einops

    cfg = model.cfg
    d = int(cfg.d_model)
    std = float(getattr(cfg, "initializer_range", -1.0) or -1.0)
    std = std if std > 0 else 0.8 / d**0.5
    if seed is not None:
        torch.manual_seed(seed)
    params = {bridge_name(n): p for n, p in model.named_parameters()}
    dtype = next(iter(params.values())).dtype

    def draw(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype).normal_(0.0, std)

    with torch.no_grad():
        for name, p in params.items():
            if name.endswith(".bias"):
                p.zero_()
            elif re.search(r"(^|\.)(ln1|ln2|ln_out)\.weight$", name):
                p.fill_(1.0)
        params["tok_embed.weight"].copy_(draw(*params["tok_embed.weight"].shape))
        if "pos.weight" in params:
            params["pos.weight"].copy_(draw(*params["pos.weight"].shape))
        H, dh = int(cfg.n_heads), int(cfg.d_head)
        for layer in range(int(cfg.n_layers)):
            a = f"layers.{layer}.attn."
            for proj in ("q", "o", "k", "v"):
                if proj == "o":
                    w = einops.rearrange(draw(H, dh, d), "head d_head d_model -> d_model (head d_head)")
                else:
                    w = einops.rearrange(draw(H, d, dh), "head d_model d_head -> (head d_head) d_model")
                params[a + f"{proj}.weight"].copy_(w)
            m = f"layers.{layer}.mlp."
            if m + "fc_in.weight" in params:
                d_mlp = int(cfg.d_mlp)
                params[m + "fc_in.weight"].copy_(draw(d, d_mlp).T)
                params[m + "fc_out.weight"].copy_(draw(d_mlp, d).T)
        params["head.weight"].copy_(draw(*params["head.weight"].shape[::-1]).T)
    return model
