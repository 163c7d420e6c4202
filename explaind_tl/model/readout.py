"""Read-out forward: a HookedTransformer's logits at one position, computing nothing else.

A metric read at position ``pos`` of a causal transformer depends only on tokens ``0..pos``,
and in the last layer only on the read-out position itself: its query, attention output, MLP
and unembedding. TransformerLens computes every position of every layer, which for the short
sequences of algorithmic tasks is most of the work (on the 3-token grokking model, two thirds
of the MLP and unembedding FLOPs are positions the metric never reads). :class:`Readout` is a
pure-tensor re-implementation of the forward for the configurations listed in
:func:`unsupported_reason` that evaluates only what reaches the read-out logits, with the ReLU
capture and forcing the kink-aware quadrature needs. It is used for the engine's gradients
(about 3x faster on the grokking model) and for the float64 certificate forwards; before use,
and again at every checkpoint of the explained window, it is checked against TransformerLens's
own forward in float64 on the actual queries (:meth:`Readout.check`).

Pre-activations use the same flattened layout as hooks on ``blocks.{l}.mlp.hook_pre`` over the
full sequence: ``[batch, n_layers * n_pos * d_mlp]``, layer-major, then position, then neuron.
Units the read-out forward does not compute (positions after ``pos``, and every position but
``pos`` in the last layer) are reported as 0 and cannot be forced; they never reach the metric.
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from explaind_tl.model import is_hooked_transformer

Params = dict[str, Tensor]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`Readout` cannot reproduce ``model`` (``None`` when it can)."""
    if not is_hooked_transformer(model):
        return "not a HookedTransformer"
    if type(model).__name__ != "HookedTransformer":
        return f"a subclass of HookedTransformer ({type(model).__qualname__}), whose forward may differ"
    cfg = model.cfg
    checks = {
        "positional_embedding_type != 'standard'": cfg.positional_embedding_type != "standard",
        "normalization_type not in (None, 'LN', 'LNPre')": cfg.normalization_type not in (None, "LN", "LNPre"),
        "attention_dir != 'causal'": getattr(cfg, "attention_dir", "causal") != "causal",
        "gated or parallel MLP": bool(getattr(cfg, "gated_mlp", False) or getattr(cfg, "parallel_attn_mlp", False)),
        "original_architecture set (pretrained-model specifics)": getattr(cfg, "original_architecture", None) is not None,
        "grouped-query attention": getattr(cfg, "n_key_value_heads", None) is not None,
        "mixture of experts": getattr(cfg, "num_experts", None) is not None,
        "normalization before and after": bool(getattr(cfg, "use_normalization_before_and_after", False)),
        "final RMS norm": bool(getattr(cfg, "final_rms", False)),
        "attention sinks / logn scaling / qkv clipping": bool(
            getattr(cfg, "use_attention_sinks", False) or getattr(cfg, "use_logn_attn", False) or getattr(cfg, "clip_qkv", None)
        ),
        "soft-capped attention scores or logits": bool(
            (getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0 or (getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0
        ),
        "activation is a LayerNorm activation (SoLU)": bool(cfg.is_layer_norm_activation()) if not cfg.attn_only else False,
    }
    for why, bad in checks.items():
        if bad:
            return why
    for block in model.blocks:
        if type(block.attn).__name__ != "Attention":
            return f"attention class {type(block.attn).__name__}"
        if not cfg.attn_only and type(block.mlp).__name__ != "MLP":
            return f"MLP class {type(block.mlp).__name__}"
    return None


class Readout:
    """Logits of a HookedTransformer at one position as a pure function of its parameters.

    Args:
        model: the HookedTransformer (its frozen parameters, attention scales and activation
            function are read from it; trainable parameters are passed to :meth:`logits`).
        position: the read-out position (negative counts from the end of the sequence).

    Raises:
        ValueError: the configuration is not supported (:func:`unsupported_reason`).
    """

    def __init__(self, model: nn.Module, position: int) -> None:
        why = unsupported_reason(model)
        if why is not None:
            raise ValueError(f"read-out forward does not support this model: {why}")
        self.cfg = model.cfg
        self.position = int(position)
        self.base = {n: p.detach() for n, p in model.named_parameters()}
        self.attn_scale = [float(b.attn.attn_scale) for b in model.blocks]
        self.act_fn = None if self.cfg.attn_only else model.blocks[0].mlp.act_fn
        self.relu = (not self.cfg.attn_only) and str(self.cfg.act_fn).lower() == "relu"

    # ----------------------------------------------------------------- pieces
    def _norm(self, p: Params, name: str, x: Float[Tensor, "batch pos d_model"]) -> Tensor:
        kind = self.cfg.normalization_type
        if kind is None:
            return x
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + self.cfg.eps).sqrt()
        return x * p[f"{name}.w"] + p[f"{name}.b"] if kind == "LN" else x

    def _attention(
        self, p: Params, layer: int, x: Float[Tensor, "row pos d_model"], last: bool, tok: Tensor | None = None
    ) -> Float[Tensor, "batch qpos d_model"]:
        """Attention output at the kept query positions.

        ``x`` is the normalised residual ``[batch, pos, d_model]``; or, with ``tok`` (layer 0),
        the table ``[d_vocab, pos, d_model]`` of every (token, position) pair, projected once
        and gathered by ``tok`` (``[batch, pos]``): layer-0 queries, keys and values depend on
        nothing else, and the table is smaller than the batch.
        """
        a = f"blocks.{layer}.attn."

        def rows(t: Tensor) -> Tensor:
            return t if tok is None else t[tok, torch.arange(tok.shape[1], device=tok.device)]

        k = rows(_project(x, p[a + "W_K"], p[a + "b_K"]))
        v = rows(_project(x, p[a + "W_V"], p[a + "b_V"]))
        if last:  # one query (the read-out position), which sees every kept key
            q = _project(x[:, -1], p[a + "W_Q"], p[a + "b_Q"])  # [batch, head, d_head]
            q = q if tok is None else q[tok[:, -1]]
            scores = (q[:, None] * k).sum(-1) / self.attn_scale[layer]  # [batch, kpos, head]
            z = (scores.softmax(1)[..., None] * v).sum(1)[:, None]  # [batch, 1, head, d_head]
        else:
            q = rows(_project(x, p[a + "W_Q"], p[a + "b_Q"]))
            scores = einops.einsum(q, k, "batch qpos head d_head, batch kpos head d_head -> batch head qpos kpos")
            scores = scores / self.attn_scale[layer]
            n = k.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            scores = torch.where(causal, scores, torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))
            z = einops.einsum(scores.softmax(-1), v, "batch head qpos kpos, batch kpos head d_head -> batch qpos head d_head")
        w_o = einops.rearrange(p[a + "W_O"], "head d_head d_model -> (head d_head) d_model")
        return einops.rearrange(z, "batch qpos head d_head -> batch qpos (head d_head)") @ w_o + p[a + "b_O"]

    def _mlp(
        self,
        p: Params,
        layer: int,
        x: Float[Tensor, "batch qpos d_model"],
        slot: tuple[int, int],
        force: tuple[Bool[Tensor, "batch unit"], Bool[Tensor, "batch unit"]] | None,
        store: list | None,
    ) -> Float[Tensor, "batch qpos d_model"]:
        m = f"blocks.{layer}.mlp."
        pre = x @ p[m + "W_in"] + p[m + "b_in"]
        if store is not None:
            store.append((slot, pre.detach()))
        if force is not None and self.relu:
            start, qpos0 = slot
            n_q, d_mlp = pre.shape[1], pre.shape[2]
            lo = start + qpos0 * d_mlp
            mask = force[0][:, lo : lo + n_q * d_mlp].reshape(-1, n_q, d_mlp)
            on = force[1][:, lo : lo + n_q * d_mlp].reshape(-1, n_q, d_mlp)
            post = torch.where(mask, torch.where(on, pre, torch.zeros_like(pre)), pre.relu())
        else:
            post = self.act_fn(pre)
        return post @ p[m + "W_out"] + p[m + "b_out"]

    # ---------------------------------------------------------------- forward
    def logits(
        self,
        params: Params,
        tokens: Int[Tensor, "batch pos"],
        force: tuple[Bool[Tensor, "batch unit"], Bool[Tensor, "batch unit"]] | None = None,
        preacts: bool = False,
    ) -> tuple[Float[Tensor, "batch vocab"], Float[Tensor, "batch unit"] | None]:
        """Logits at the read-out position and, optionally, the MLP pre-activations.

        Args:
            params: trainable parameters by TransformerLens name (others come from the model).
            tokens: ``[batch, pos]`` token ids.
            force: ``(mask, on)`` over the flattened unit layout: forced ReLU states.
            preacts: also return the pre-activations ``[batch, n_layers * pos * d_mlp]``.

        Returns:
            ``(logits [batch, d_vocab_out], preacts or None)``.
        """
        cfg = self.cfg
        p = {**self.base, **params}
        n_pos = tokens.shape[1]
        pos = self.position % n_pos
        tok = tokens[:, : pos + 1]
        # layer-0 attention from the (token, position) table when it is smaller than the batch;
        # then a one-layer model reads the embedded residual at the read-out position only
        table = p["embed.W_E"].shape[0] * tok.shape[1] <= tok.numel()
        resid_tok = tok[:, -1:] if table and cfg.n_layers == 1 else tok
        x = p["embed.W_E"][resid_tok] + p["pos_embed.W_pos"][pos + 1 - resid_tok.shape[1] : pos + 1]
        store: list | None = [] if preacts else None
        per_layer = n_pos * cfg.d_mlp
        for layer in range(cfg.n_layers):
            last = layer == cfg.n_layers - 1
            if layer == 0 and table:
                every = p["embed.W_E"][:, None] + p["pos_embed.W_pos"][None, : pos + 1]  # [d_vocab, pos, d_model]
                x_attn = self._attention(p, 0, self._norm(p, "blocks.0.ln1", every), last, tok)
            else:
                x_attn = self._attention(p, layer, self._norm(p, f"blocks.{layer}.ln1", x), last)
            x = (x[:, -1:] if last else x) + x_attn
            if not cfg.attn_only:
                slot = (layer * per_layer, pos if last else 0)
                x = x + self._mlp(p, layer, self._norm(p, f"blocks.{layer}.ln2", x), slot, force, store)
        x = self._norm(p, "ln_final", x)[:, -1]
        logits = x @ p["unembed.W_U"] + p["unembed.b_U"]
        if not preacts:
            return logits, None
        z = torch.zeros(tokens.shape[0], cfg.n_layers * per_layer, dtype=logits.dtype, device=logits.device)
        for (start, qpos0), pre in store:
            lo = start + qpos0 * cfg.d_mlp
            z[:, lo : lo + pre.shape[1] * cfg.d_mlp] = pre.reshape(pre.shape[0], -1)
        return logits, z

    # ------------------------------------------------------------------ check
    def check(
        self,
        reference: nn.Module,
        tokens: Int[Tensor, "batch pos"],
        params: Params | None = None,
    ) -> float:
        """Largest relative difference from TransformerLens's own forward, in float64.

        Compares the read-out logits and, for ReLU models, the pre-activations of every unit the
        read-out forward computes, on ``tokens``, with ``reference`` (a float64 copy of the
        model) at its own parameters overridden by ``params``.

        Returns:
            ``max |ours - TL| / max(1, max |TL|)`` over logits and pre-activations.
        """
        full = {n: q.detach() for n, q in reference.named_parameters()}
        full.update(params or {})
        saved = self.base
        self.base = full
        try:
            with torch.no_grad():
                ours, z = self.logits(full, tokens, preacts=self.relu)
                store: list[Tensor] = []
                hooks = []
                if self.relu:
                    hooks = [
                        (f"blocks.{layer}.mlp.hook_pre", lambda act, hook: store.append(act.reshape(act.shape[0], -1)))
                        for layer in range(self.cfg.n_layers)
                    ]
                with reference.hooks(fwd_hooks=hooks):
                    ref = torch.func.functional_call(reference, full, (tokens,))[:, self.position % tokens.shape[1]]
        finally:
            self.base = saved
        err = float((ours - ref).abs().max() / ref.abs().max().clamp_min(1.0))
        if z is not None:
            zr = torch.cat(store, dim=1)
            keep = readout_units(self.cfg, tokens.shape[1], self.position).to(z.device)
            err = max(err, float((z - zr)[:, keep].abs().max() / zr[:, keep].abs().max().clamp_min(1.0)))
        return err


def _project(
    x: Float[Tensor, "... d_model"], w: Float[Tensor, "head d_model d_head"], b: Float[Tensor, "head d_head"]
) -> Float[Tensor, "... head d_head"]:
    """``x @ W + b`` for every head at once, as one matrix product."""
    n_head, _, d_head = w.shape
    flat = einops.rearrange(w, "head d_model d_head -> d_model (head d_head)")
    return (x @ flat).unflatten(-1, (n_head, d_head)) + b


def readout_units(cfg, n_pos: int, position: int) -> Bool[Tensor, "unit"]:
    """Which flattened MLP units (``hook_pre`` layout) can reach the logits at ``position``.

    In a causal transformer, units at positions after ``position`` never reach it, and in the
    last layer only the read-out position itself does.
    """
    pos = position % n_pos
    keep = []
    for layer in range(cfg.n_layers):
        m = torch.zeros(n_pos, cfg.d_mlp, dtype=torch.bool)
        if layer == cfg.n_layers - 1:
            m[pos] = True
        else:
            m[: pos + 1] = True
        keep.append(m.reshape(-1))
    return torch.cat(keep)
