"""Read-out forward: a HookedTransformer's logits at the read positions, computing nothing else.

A metric read at position ``pos`` of a causal transformer depends only on tokens ``0..pos``,
and in the last layer only on the read-out position itself: its query, attention output, MLP
and unembedding. A metric read at several positions (the next-token metrics) needs every layer
up to the last read position and, in the last layer, only the read positions. TransformerLens computes every position of every layer, which for the short
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
Units the read-out forward does not compute (positions after the last read position, and every
position but the read ones in the last layer) are reported as 0 and cannot be forced; they
never reach the metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from explaind_tl.model import is_hooked_transformer
from explaind_tl.model.tape import ParamUse

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
    """Logits of a HookedTransformer at the read positions as a pure function of its parameters.

    Args:
        model: the HookedTransformer (its frozen parameters, attention scales and activation
            function are read from it; trainable parameters are passed to :meth:`logits`).
        position: the read-out position (negative counts from the end of the sequence), or a
            sequence of them (a next-token metric's read positions): :meth:`logits` then returns
            logits ``[batch, pos, vocab]`` at every position, exact at the read positions and 0
            at the others (which a metric reading those positions never sees).

    Raises:
        ValueError: the configuration is not supported (:func:`unsupported_reason`).
    """

    def __init__(self, model: nn.Module, position: int | Sequence[int]) -> None:
        why = unsupported_reason(model)
        if why is not None:
            raise ValueError(f"read-out forward does not support this model: {why}")
        self.cfg = model.cfg
        self.many = not isinstance(position, int)
        self.positions = [int(p) for p in position] if self.many else [int(position)]
        if not self.positions:
            raise ValueError("read-out forward needs at least one read position")
        self.position = self.positions[-1] if self.many else int(position)
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
        self,
        p: _Path,
        layer: int,
        x: Float[Tensor, "row pos d_model"],
        read: list[int] | None,
        tok: Tensor | None = None,
    ) -> Float[Tensor, "batch qpos d_model"]:
        """Attention output at the kept query positions: every position, or (``read``, the last
        layer) the read positions only.

        ``x`` is the normalised residual ``[batch, pos, d_model]``; or, with ``tok`` (layer 0),
        the table ``[d_vocab, pos, d_model]`` of every (token, position) pair, projected once
        and gathered by ``tok`` (``[batch, pos]``): layer-0 queries, keys and values depend on
        nothing else, and the table is smaller than the batch.
        """
        a = f"blocks.{layer}.attn."
        n = x.shape[1]

        def rows(t: Tensor, at: Tensor | None = None) -> Tensor:
            if tok is None:
                return t
            at = torch.arange(n, device=tok.device) if at is None else at
            return t[tok[:, at], torch.arange(len(at), device=tok.device)]

        k = rows(_project(x, p, a + "W_K", a + "b_K"))
        v = rows(_project(x, p, a + "W_V", a + "b_V"))
        if read is not None and read == [n - 1]:  # one query (the last position), which sees every kept key
            q = _project(x[:, -1], p, a + "W_Q", a + "b_Q")  # [batch, head, d_head]
            q = q if tok is None else q[tok[:, -1]]
            scores = (q[:, None] * k).sum(-1) / self.attn_scale[layer]  # [batch, kpos, head]
            z = (scores.softmax(1)[..., None] * v).sum(1)[:, None]  # [batch, 1, head, d_head]
        else:
            at = None if read is None else torch.tensor(read, device=x.device)
            q = rows(_project(x if at is None else x[:, at], p, a + "W_Q", a + "b_Q"), at)
            scores = einops.einsum(q, k, "batch qpos head d_head, batch kpos head d_head -> batch head qpos kpos")
            scores = scores / self.attn_scale[layer]
            qpos = torch.arange(n, device=x.device) if at is None else at
            causal = torch.arange(n, device=x.device)[None, :] <= qpos[:, None]  # [qpos, kpos]
            scores = torch.where(causal, scores, torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))
            z = einops.einsum(scores.softmax(-1), v, "batch head qpos kpos, batch kpos head d_head -> batch qpos head d_head")
        z = einops.rearrange(z, "batch qpos head d_head -> batch qpos (head d_head)")
        return p.add(p.mm(z, a + "W_O", "head d_head d_model -> (head d_head) d_model"), a + "b_O")

    def _mlp(
        self,
        p: _Path,
        layer: int,
        x: Float[Tensor, "batch qpos d_model"],
        slot: tuple[int, list[int]],
        force: tuple[Bool[Tensor, "batch unit"], Bool[Tensor, "batch unit"]] | None,
        store: list | None,
    ) -> Float[Tensor, "batch qpos d_model"]:
        """MLP output at the kept positions; ``slot = (first unit of the layer, kept positions)``
        locates its units in the flattened layout."""
        m = f"blocks.{layer}.mlp."
        pre = p.add(p.mm(x, m + "W_in"), m + "b_in")
        if store is not None:
            store.append((slot, pre.detach()))
        if force is not None and self.relu:
            n_q, d_mlp = pre.shape[1], pre.shape[2]
            cols = _unit_columns(slot, d_mlp)
            mask = force[0][:, cols].reshape(-1, n_q, d_mlp)
            on = force[1][:, cols].reshape(-1, n_q, d_mlp)
            # a 0/1 gate (the forced state, else the unit's own): a product, whose derivative under
            # a batched backward is one multiplication (nested torch.where falls back to a loop)
            post = pre * torch.where(mask, on, pre > 0).to(pre.dtype)
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
        path: tuple[Params, Float[Tensor, "row_or_node"]] | None = None,
        tape: list[ParamUse] | None = None,
        shared: int = 1,
    ) -> tuple[Float[Tensor, "batch vocab"], Float[Tensor, "batch unit"] | None]:
        """Logits at the read position(s) and, optionally, the MLP pre-activations.

        Args:
            params: trainable parameters by TransformerLens name (others come from the model).
            tokens: ``[batch, pos]`` token ids.
            force: ``(mask, on)`` over the flattened unit layout: forced ReLU states.
            preacts: also return the pre-activations ``[batch, n_layers * pos * d_mlp]``.
            path: ``(delta, t)``: ``t`` with one value per batch row (row ``b`` at
                ``params + t[b] * delta``), or one per group of rows (the batch is ``len(t)``
                equal groups, node-major; group ``j`` at ``params + t[j] * delta``); ``delta``
                over some trainable parameters (:class:`_Path`: the two forms and their costs).
            tape: a list that receives every use of a parameter in ``params`` (:class:`ParamUse`),
                for :func:`~explaind_tl.model.tape.tape_jacobians`.
            shared: the batch is runs of this many consecutive rows with the same tokens and
                path ``t`` that differ only in ``force`` (a kinked query's pieces): each run is
                evaluated once up to the first MLP, where forcing starts to matter, and fanned
                out there.

        Raises:
            ValueError: ``shared`` does not divide the batch, or a run's rows differ in tokens
                or ``t``.

        Returns:
            ``(logits, preacts or None)``: logits ``[batch, d_vocab_out]`` at the read-out
            position, or (several read positions) ``[batch, pos, d_vocab_out]``, 0 at positions
            not read.
        """
        cfg = self.cfg
        n_rows, n_pos = tokens.shape
        delta, t = path or (None, None)
        full_path = dict(p={**self.base, **params}, delta=delta, t=t, batch=n_rows, tape=tape, trainable=frozenset(params))
        if shared > 1:
            tokens, t = _runs(tokens, t, shared)
        p = _Path(**{**full_path, "t": t, "batch": tokens.shape[0]})
        read = sorted({q % n_pos for q in self.positions})
        top = read[-1]
        tok = tokens[:, : top + 1]
        # layer-0 attention from the (token, position) table when it is smaller than the batch;
        # then a one-layer model reads the embedded residual at the read positions only
        table = p.delta is None and tape is None and p["embed.W_E"].shape[0] * tok.shape[1] <= tok.numel()
        only_read = table and cfg.n_layers == 1
        at = torch.tensor(read, device=tokens.device)
        if only_read:
            x = p.rows("embed.W_E", tok[:, at]) + p.rows("pos_embed.W_pos", at)
        else:
            x = p.rows("embed.W_E", tok) + p.rows("pos_embed.W_pos", slice(0, top + 1))
        store: list | None = [] if preacts else None
        per_layer = n_pos * cfg.d_mlp
        every = list(range(top + 1))
        for layer in range(cfg.n_layers):
            last = layer == cfg.n_layers - 1
            if layer == 0 and table:
                emb = p["embed.W_E"][:, None] + p["pos_embed.W_pos"][None, : top + 1]  # [d_vocab, pos, d_model]
                x_attn = self._attention(p, 0, self._norm(p, "blocks.0.ln1", emb), read if last else None, tok)
            else:
                x_attn = self._attention(p, layer, self._norm(p, f"blocks.{layer}.ln1", x), read if last else None)
            x = (x if only_read or not last else x[:, at]) + x_attn
            if shared > 1 and layer == 0 and not cfg.attn_only:  # forcing starts to matter here
                x, p = x.repeat_interleave(shared, dim=0), _Path(**full_path)
            if not cfg.attn_only:
                slot = (layer * per_layer, read if last else every)
                x = x + self._mlp(p, layer, self._norm(p, f"blocks.{layer}.ln2", x), slot, force, store)
        if shared > 1 and cfg.attn_only:
            x, p = x.repeat_interleave(shared, dim=0), _Path(**full_path)
        x = self._norm(p, "ln_final", x)  # [batch, read, d_model]
        logits = p.add(p.mm(x if self.many else x[:, -1], "unembed.W_U"), "unembed.b_U")
        if self.many:  # every position, 0 where nothing is read (out of place: vmap-safe)
            full = torch.zeros(n_rows, n_pos, logits.shape[-1], dtype=logits.dtype, device=logits.device)
            logits = full.index_copy(1, at, logits)
        if not preacts:
            return logits, None
        z = torch.zeros(n_rows, cfg.n_layers * per_layer, dtype=logits.dtype, device=logits.device)
        for slot, pre in store:
            z[:, _unit_columns(slot, cfg.d_mlp)] = pre.reshape(pre.shape[0], -1)
        return logits, z

    # ------------------------------------------------------------------ check
    def check(
        self,
        reference: nn.Module,
        tokens: Int[Tensor, "batch pos"],
        params: Params | None = None,
    ) -> float:
        """Largest relative difference from TransformerLens's own forward, in float64.

        Compares the read-out logits (at every read position) and, for ReLU models, the pre-activations of every unit the
        read-out forward computes, on ``tokens``, with ``reference`` (a float64 copy of the
        model) at its own parameters overridden by ``params``.

        Returns:
            ``max |ours - TL| / max(1, max |TL|)`` over logits and pre-activations.
        """
        full = {n: q.detach() for n, q in reference.named_parameters()}
        full.update(params or {})
        # every parameter is passed (none comes from self.base): nothing here mutates the
        # read-out object, so another thread may evaluate it meanwhile
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
                ref = torch.func.functional_call(reference, full, (tokens,))
        read = sorted({q % tokens.shape[1] for q in self.positions})
        ours = ours[:, read] if self.many else ours
        ref = ref[:, read] if self.many else ref[:, self.position % tokens.shape[1]]
        err = float((ours - ref).abs().max() / ref.abs().max().clamp_min(1.0))
        if z is not None:
            zr = torch.cat(store, dim=1)
            keep = readout_units(self.cfg, tokens.shape[1], self.positions).to(z.device)
            err = max(err, float((z - zr)[:, keep].abs().max() / zr[:, keep].abs().max().clamp_min(1.0)))
        return err


class _Path:
    """Parameters along a path ``w + t Δ``, one ``t`` per batch row or per group of rows.

    Two forms, chosen by the length of ``t`` (``batch`` rows):

    * **per row** (``len(t) == batch``): row ``b`` at ``w + t_b Δ``, applied linearly,
      ``x @ W + t_b (x @ ΔW)``. Every weight matrix enters one product over all rows whatever
      their ``t``, so its gradient is one product too, not one per distinct ``t`` summed
      afterwards: :meth:`QueryFunction.per_query_quadrature` stacks the quadrature nodes of a
      query as rows and gets one ``[outputs, *W.shape]`` block per query, where ``x (W + t_b ΔW)``
      would make one per node.
    * **grouped** (``batch = n * m`` rows, ``len(t) = n``): the rows are ``n`` equal groups,
      node-major, group ``j`` at ``w + t_j Δ``. Each weight matrix is formed once per node
      (``[n, *shape]``, tiny next to the activations) and applied to its group by one batched
      product: the forward and backward cost what the plain ones cost over the same rows, where
      the linear form doubles every product. :meth:`QueryFunction.aggregate_quadrature` stacks
      a step's nodes over all queries this way and takes one gradient of their weighted sum.

    ``delta`` is ``None`` for the plain forward at ``w``.

    With a ``tape`` (a list), every use of a parameter named in ``trainable`` appends a
    :class:`ParamUse`: the operation, its input and its output, from which :func:`~explaind_tl.model.tape.tape_jacobians`
    forms per-row-group parameter gradients out of the outputs' cotangents. Parameters then
    enter only through :meth:`mm`, :meth:`add`, :meth:`mul` and :meth:`rows`, and each output
    keeps the batch axis first (what :meth:`Readout.logits` does with a tape).
    """

    def __init__(self, p: Params, delta: Params | None = None, t: Tensor | None = None, batch: int = 0,
                 tape: list[ParamUse] | None = None, trainable: frozenset[str] = frozenset()) -> None:
        self.p, self.delta, self.t = p, delta, t
        self.grouped = t is not None and len(t) != batch
        if self.grouped and (len(t) == 0 or batch % len(t)):
            raise ValueError(f"path: {len(t)} values of t for {batch} rows (one per row, or one per equal group)")
        self.rows_per_node = batch // len(t) if self.grouped else 1
        self.batch, self.tape, self.trainable = batch, tape, trainable

    def _record(self, kind: str, name: str, x: Tensor | None, y: Tensor, extra=None) -> Tensor:
        if self.tape is not None and name in self.trainable:
            if not y.requires_grad:  # a use that depends on no earlier one (an embedding): a leaf
                y.requires_grad_()
            self.tape.append(ParamUse(kind, name, x, y, extra))
        return y

    def __getitem__(self, name: str) -> Tensor:
        return self.p[name]

    def d(self, name: str) -> Tensor | None:
        return None if self.delta is None else self.delta.get(name)

    def _t(self, like: Tensor) -> Tensor:
        return self.t.view(-1, *([1] * (like.dim() - 1)))

    def _at_nodes(self, name: str) -> Tensor:
        """``w + t_j Δ`` for every node ``j``, ``[n, *shape]`` (grouped form)."""
        w, dw = self.p[name], self.d(name)
        return w.unsqueeze(0) + self.t.view(-1, *([1] * w.dim())) * dw.unsqueeze(0)

    def _grouped(self, y: Tensor, w: Tensor, op) -> Tensor:
        """``op(y, w_j)`` on each node's rows of ``y``, ``w_j`` broadcast over ``y``'s middle axes."""
        n = w.shape[0]
        yv = y.reshape(n, y.shape[0] // n, *y.shape[1:])
        return op(yv, w.view(n, *([1] * (y.dim() - w.dim() + 1)), *w.shape[1:])).reshape(y.shape)

    def mm(self, x: Tensor, name: str, pattern: str | None = None) -> Tensor:
        """``x @ W`` (``W`` rearranged by the einops ``pattern`` first, when given)."""
        dw = self.d(name)
        if dw is not None and self.grouped:
            w = self._at_nodes(name)
            if pattern is not None:
                left, right = pattern.split("->")
                w = einops.rearrange(w, f"node {left} -> node {right}")
            y = x.reshape(w.shape[0], -1, x.shape[-1]) @ w  # [node, rows of the node * ..., out]
            return self._record("mm", name, x, y.reshape(*x.shape[:-1], w.shape[-1]), pattern)
        w = self.p[name]
        if pattern is not None:
            w = einops.rearrange(w, pattern)
        y = x @ w
        if dw is not None:
            if pattern is not None:
                dw = einops.rearrange(dw, pattern)
            y = y + self._t(y) * (x @ dw)
        return self._record("mm", name, x, y, pattern)

    def add(self, y: Tensor, name: str) -> Tensor:
        """``y + b``, ``b`` broadcast over ``y``'s leading axes (its first is the batch)."""
        b, db = self.p[name], self.d(name)
        if db is not None and self.grouped:
            return self._record("add", name, None, self._grouped(y, self._at_nodes(name), torch.add))
        out = y + b if db is None else y + b + self._t(y) * db
        return self._record("add", name, None, out)

    def mul(self, y: Tensor, name: str) -> Tensor:
        """``y * w`` elementwise (a LayerNorm scale)."""
        w, dw = self.p[name], self.d(name)
        if dw is not None and self.grouped:
            return self._record("mul", name, y, self._grouped(y, self._at_nodes(name), torch.mul))
        out = y * w if dw is None else y * w + self._t(y) * (y * dw)
        return self._record("mul", name, y, out)

    def rows(self, name: str, index: Tensor | slice) -> Tensor:
        """``W[index]`` (embedding rows): ``[batch, pos, d]`` for token ids ``[batch, pos]``;
        for positions (a slice or 1-D ids) ``[pos, d]``, or ``[batch, pos, d]`` on a path or
        with a tape."""
        out = self._rows(name, index)
        if self.tape is None or name not in self.trainable:
            return out
        if isinstance(index, Tensor) and index.dim() == 2:
            at = index
        else:  # positions: each row's own copy, so its cotangent stays its own
            at = torch.arange(self.p[name].shape[0], device=out.device)[index] if isinstance(index, slice) else index
            at = at.expand(self.batch, -1)
            out = out.expand(self.batch, *out.shape[-2:])
        return self._record("rows", name, None, out, at)

    def _rows(self, name: str, index: Tensor | slice) -> Tensor:
        w, dw = self.p[name], self.d(name)
        if dw is None:
            return w[index]
        if self.grouped:
            wn = self._at_nodes(name)
            n = wn.shape[0]
            if isinstance(index, Tensor) and index.dim() == 2:  # token ids [batch, pos]
                node = torch.arange(n, device=index.device).repeat_interleave(index.shape[0] // n)
                return wn[node[:, None], index]
            return wn[:, index].repeat_interleave(self.rows_per_node, dim=0)
        return w[index] + self.t.view(-1, 1, 1) * dw[index]


def _runs(tokens: Int[Tensor, "batch pos"], t: Tensor | None, k: int) -> tuple[Tensor, Tensor | None]:
    """The first row of each run of ``k`` rows (tokens, and a per-row ``t``), checked to be the
    run's common value (:meth:`Readout.logits` ``shared``)."""
    if tokens.shape[0] % k:
        raise ValueError(f"shared={k} does not divide the batch of {tokens.shape[0]} rows")
    runs = tokens.reshape(-1, k, tokens.shape[1])
    if not torch.equal(runs, runs[:, :1].expand_as(runs)):
        raise ValueError(f"shared={k}: rows of a run have different tokens")
    if t is not None and len(t) == tokens.shape[0]:  # per-row path form
        tr = t.reshape(-1, k)
        if not torch.equal(tr, tr[:, :1].expand_as(tr)):
            raise ValueError(f"shared={k}: rows of a run are at different points of the path")
        t = t[::k]
    return runs[:, 0], t


def _project(x: Float[Tensor, "... d_model"], p: _Path, w: str, b: str) -> Float[Tensor, "... head d_head"]:
    """``x @ W + b`` for every head at once, as one matrix product."""
    n_head, _, d_head = p[w].shape
    return p.add(p.mm(x, w, "head d_model d_head -> d_model (head d_head)").unflatten(-1, (n_head, d_head)), b)


def readout_units(cfg, n_pos: int, position: int | Sequence[int]) -> Bool[Tensor, "unit"]:
    """Which flattened MLP units (``hook_pre`` layout) can reach the logits at ``position`` (or at
    any of several positions).

    In a causal transformer, units at positions after the (last) read position never reach it,
    and in the last layer only the read positions themselves do.
    """
    read = sorted({p % n_pos for p in ([position] if isinstance(position, int) else position)})
    keep = []
    for layer in range(cfg.n_layers):
        m = torch.zeros(n_pos, cfg.d_mlp, dtype=torch.bool)
        if layer == cfg.n_layers - 1:
            m[read] = True
        else:
            m[: read[-1] + 1] = True
        keep.append(m.reshape(-1))
    return torch.cat(keep)


def _unit_columns(slot: tuple[int, list[int]], d_mlp: int) -> slice | Tensor:
    """Columns of the flattened unit layout of the units at ``slot = (first unit of the layer,
    positions)``, position-major: a slice when the positions are contiguous."""
    start, where = slot
    if where == list(range(where[0], where[0] + len(where))):
        return slice(start + where[0] * d_mlp, start + (where[-1] + 1) * d_mlp)
    at = torch.tensor(where)[:, None] * d_mlp + torch.arange(d_mlp)[None, :]
    return (start + at).reshape(-1)
