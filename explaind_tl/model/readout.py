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
    def _norm(self, p: _Path, name: str, x: Float[Tensor, "batch pos d_model"]) -> Tensor:
        kind = self.cfg.normalization_type
        if kind is None:
            return x
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + self.cfg.eps).sqrt()
        return p.add(p.mul(x, f"{name}.w"), f"{name}.b") if kind == "LN" else x

    def _attention(
        self, p: _Path, layer: int, x: Float[Tensor, "row pos d_model"], last: bool, tok: Tensor | None = None
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

        k = rows(_project(x, p, a + "W_K", a + "b_K"))
        v = rows(_project(x, p, a + "W_V", a + "b_V"))
        if last:  # one query (the read-out position), which sees every kept key
            q = _project(x[:, -1], p, a + "W_Q", a + "b_Q")  # [batch, head, d_head]
            q = q if tok is None else q[tok[:, -1]]
            scores = (q[:, None] * k).sum(-1) / self.attn_scale[layer]  # [batch, kpos, head]
            z = (scores.softmax(1)[..., None] * v).sum(1)[:, None]  # [batch, 1, head, d_head]
        else:
            q = rows(_project(x, p, a + "W_Q", a + "b_Q"))
            scores = einops.einsum(q, k, "batch qpos head d_head, batch kpos head d_head -> batch head qpos kpos")
            scores = scores / self.attn_scale[layer]
            n = k.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            scores = torch.where(causal, scores, torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))
            z = einops.einsum(scores.softmax(-1), v, "batch head qpos kpos, batch kpos head d_head -> batch qpos head d_head")
        z = einops.rearrange(z, "batch qpos head d_head -> batch qpos (head d_head)")
        return p.add(p.mm(z, a + "W_O", "head d_head d_model -> (head d_head) d_model"), a + "b_O")

    def _mlp(
        self,
        p: _Path,
        layer: int,
        x: Float[Tensor, "batch qpos d_model"],
        slot: tuple[int, int],
        force: tuple[Bool[Tensor, "batch unit"], Bool[Tensor, "batch unit"]] | None,
        store: list | None,
    ) -> Float[Tensor, "batch qpos d_model"]:
        m = f"blocks.{layer}.mlp."
        pre = p.add(p.mm(x, m + "W_in"), m + "b_in")
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
        return p.add(p.mm(post, m + "W_out"), m + "b_out")

    # ---------------------------------------------------------------- forward
    def logits(
        self,
        params: Params,
        tokens: Int[Tensor, "batch pos"],
        force: tuple[Bool[Tensor, "batch unit"], Bool[Tensor, "batch unit"]] | None = None,
        preacts: bool = False,
        path: tuple[Params, Float[Tensor, "batch"]] | None = None,
    ) -> tuple[Float[Tensor, "batch vocab"], Float[Tensor, "batch unit"] | None]:
        """Logits at the read-out position and, optionally, the MLP pre-activations.

        Args:
            params: trainable parameters by TransformerLens name (others come from the model).
            tokens: ``[batch, pos]`` token ids.
            force: ``(mask, on)`` over the flattened unit layout: forced ReLU states.
            preacts: also return the pre-activations ``[batch, n_layers * pos * d_mlp]``.
            path: ``(delta, t)``: batch row ``b`` is evaluated at ``params + t[b] * delta``
                (``delta`` over some trainable parameters), with every weight matrix in one
                product over the batch (:class:`_Path`).

        Returns:
            ``(logits [batch, d_vocab_out], preacts or None)``.
        """
        cfg = self.cfg
        p = _Path({**self.base, **params}, *(path or (None, None)))
        n_pos = tokens.shape[1]
        pos = self.position % n_pos
        tok = tokens[:, : pos + 1]
        # layer-0 attention from the (token, position) table when it is smaller than the batch;
        # then a one-layer model reads the embedded residual at the read-out position only
        table = p.delta is None and p["embed.W_E"].shape[0] * tok.shape[1] <= tok.numel()
        resid_tok = tok[:, -1:] if table and cfg.n_layers == 1 else tok
        x = p.rows("embed.W_E", resid_tok) + p.rows("pos_embed.W_pos", slice(pos + 1 - resid_tok.shape[1], pos + 1))
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
        logits = p.add(p.mm(x, "unembed.W_U"), "unembed.b_U")
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


class _Path:
    """Parameters ``w + t_b Δ`` per batch row ``b``, applied linearly (``x @ W + t_b (x @ ΔW)``).

    Written this way, every weight matrix enters one matrix product over all rows of the batch
    (whatever their ``t``), so the backward's gradient for it is one product too, not one per
    distinct ``t`` summed afterwards: :meth:`QueryFunction.per_query_quadrature` stacks the
    quadrature nodes of a query as batch rows and gets the node sum of its gradients from one
    block. ``delta`` is ``None`` for the plain forward at ``w``.
    """

    def __init__(self, p: Params, delta: Params | None = None, t: Float[Tensor, "batch"] | None = None) -> None:
        self.p, self.delta, self.t = p, delta, t

    def __getitem__(self, name: str) -> Tensor:
        return self.p[name]

    def d(self, name: str) -> Tensor | None:
        return None if self.delta is None else self.delta.get(name)

    def _t(self, like: Tensor) -> Tensor:
        return self.t.view(-1, *([1] * (like.dim() - 1)))

    def mm(self, x: Tensor, name: str, pattern: str | None = None) -> Tensor:
        """``x @ W`` (``W`` rearranged by the einops ``pattern`` first, when given)."""
        w, dw = self.p[name], self.d(name)
        if pattern is not None:
            w = einops.rearrange(w, pattern)
        y = x @ w
        if dw is None:
            return y
        if pattern is not None:
            dw = einops.rearrange(dw, pattern)
        return y + self._t(y) * (x @ dw)

    def add(self, y: Tensor, name: str) -> Tensor:
        """``y + b``, ``b`` broadcast over ``y``'s leading axes (its first is the batch)."""
        b, db = self.p[name], self.d(name)
        y = y + b
        return y if db is None else y + self._t(y) * db

    def mul(self, y: Tensor, name: str) -> Tensor:
        """``y * w`` elementwise (a LayerNorm scale)."""
        w, dw = self.p[name], self.d(name)
        return y * w if dw is None else y * w + self._t(y) * (y * dw)

    def rows(self, name: str, index: Tensor | slice) -> Tensor:
        """``W[index]`` (embedding rows), ``[batch, pos, d]`` on a path (``[batch, pos]`` token
        ids, or a slice of positions)."""
        w, dw = self.p[name], self.d(name)
        y = w[index]
        return y if dw is None else y + self.t.view(-1, 1, 1) * dw[index]


def _project(x: Float[Tensor, "... d_model"], p: _Path, w: str, b: str) -> Float[Tensor, "... head d_head"]:
    """``x @ W + b`` for every head at once, as one matrix product."""
    n_head, _, d_head = p[w].shape
    return p.add(p.mm(x, w, "head d_model d_head -> d_model (head d_head)").unflatten(-1, (n_head, d_head)), b)


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
