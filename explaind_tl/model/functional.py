"""Model plumbing for ``torch.func``: flat parameter vectors, query values, gradients, kinks.

Everything the engine needs from a model goes through :class:`QueryFunction`: the metric's
values (for the certificate), gradients of aggregated or per-query metrics at a point
``w_s + t Δ_s`` of a segment (``t`` shared or one per query), and the pre-activations of the
model's ReLUs (for kink-aware quadrature). Parameters are ``dict[str, Tensor]`` keyed by the
trainable parameter names; flat vectors concatenate them in that order.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from explaind_tl.model import is_hooked_transformer, move_model
from explaind_tl.model.bridge import bridge_relu_hooks, is_transformer_bridge
from explaind_tl.model.readout import Readout, readout_units, unsupported_reason
from explaind_tl.model.tape import tape_cotangents, tape_jacobians

Params = dict[str, Tensor]


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of the trainable parameters in a flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def slices(self) -> dict[str, slice]:
        """Where each parameter sits in a flat vector."""
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name] = slice(start, start + size)
            start += size
        return out

    def flatten(self, d: Params, lead: int = 0, dtype: torch.dtype | None = None) -> Tensor:
        """Concatenate ``d`` into ``[*lead_dims, P]`` (``lead`` leading batch dims).

        Writes every tensor straight into one output buffer (converting to ``dtype`` on the way),
        so a large batch of gradients is copied once, without per-tensor temporaries.
        """
        first = d[self.names[0]]
        lead_shape = first.shape[:lead]
        out = torch.empty(*lead_shape, self.numel, dtype=dtype or first.dtype, device=first.device)
        start = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[..., start : start + size].view(*lead_shape, *shape).copy_(d[name])
            start += size
        return out

    def unflatten(self, v: Tensor) -> Params:
        """Split ``[..., P]`` back into a dict of ``[..., *shape]`` views."""
        out, start = {}, 0
        lead = v.shape[:-1]
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = v[..., start : start + size].reshape(*lead, *shape)
            start += size
        return out


def model_input(batch: dict[str, Tensor]) -> Tensor:
    """The tensor a model is called on: ``batch["tokens"]`` (or ``batch["input"]``)."""
    if "tokens" in batch:
        return batch["tokens"]
    if "input" in batch:
        return batch["input"]
    raise KeyError("queries need a 'tokens' (or 'input') column")


def batch_of_one(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """One example's entries as a batch of one (a leading axis of 1), for a forward under ``vmap``."""
    return {k: v.unsqueeze(0) for k, v in batch.items()}


class QueryFunction:
    """A metric of a model as a pure function of the trainable parameters.

    Args:
        model: the model (its non-trainable parameters and buffers are used as they are).
        names: trainable parameter names.
        metric: ``fn(logits, batch) -> [Q] or [Q, O]``.
        dtype: working dtype of the gradients.
        cert_dtype: dtype of the certificate forwards (float64 by default).
        position: the position a built-in metric reads, or the list of positions a next-token
            metric reads (its logits then come as ``[Q, pos, vocab]``, 0 at the positions not
            read); when given and the model is a supported HookedTransformer, every forward
            uses the read-out forward (:mod:`explaind_tl.model.readout`), which
            :meth:`check_readout` compares with the model's own.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        metric: Callable[[Tensor, dict], Tensor],
        dtype: torch.dtype = torch.float32,
        cert_dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        position: int | list[int] | None = None,
    ) -> None:
        self.names = list(names)
        self.metric = metric
        self.dtype = dtype
        self.cert_dtype = cert_dtype
        self.device = torch.device(device)
        self.model = self._copy(model, dtype)
        self.cert_model = self.model if cert_dtype == dtype else self._copy(model, cert_dtype)
        self.hook_names = self._relu_hook_names(self.model)
        # ReLU pre-activations at every position along a path, one point per row: where the
        # kinks of ReLUs after the first MLP layer are located on the true function
        # (:meth:`preacts_along`); a HookedTransformer the read-out forward supports only
        self.path_preacts = None
        if self.hook_names and len(self.hook_names) > 1 and unsupported_reason(self.model) is None:
            self.path_preacts = Readout(self.model, list(range(self.model.cfg.n_ctx)))
        # the read-out forward, where the model and metric allow it: working dtype for gradients
        # and node pre-activations, cert_dtype for the certificate (checked by check_readout)
        self.readout = self.cert_readout = None
        if position is not None and unsupported_reason(self.model) is None:
            self.readout = Readout(self.model, position)
            self.cert_readout = self.readout if self.cert_model is self.model else Readout(self.cert_model, position)

    def _copy(self, model: nn.Module, dtype: torch.dtype) -> nn.Module:
        return frozen_copy(model, dtype, self.device)

    # ----------------------------------------------------------------- forward
    def _values(
        self,
        params: Params,
        batch: dict[str, Tensor],
        cert: bool = False,
        store: list[Tensor] | None = None,
        scale: list[Tensor] | None = None,
        path: tuple[Params, Tensor] | None = None,
        tape: list | None = None,
        shared: int = 1,
    ) -> Tensor:
        """Metric values ``[Q, O]``; ReLU pre-activations ``[Q, U]`` are appended to ``store``,
        each query's largest logit magnitude ``[Q]`` to ``scale``.

        ``cert=True`` evaluates in ``cert_dtype`` (the certificate), otherwise in the working
        dtype; either through the read-out forward when it is in use, else the model's own.
        ``path=(delta, t)`` (read-out forward only): row ``i`` at ``params + t[i] * delta``
        (:meth:`aggregate_quadrature`, :meth:`per_query_quadrature`); ``tape`` (read-out
        forward only) receives the parameters' uses (:func:`~explaind_tl.model.tape.tape_jacobians`),
        ``shared`` rows share their forward up to the first MLP (:meth:`Readout.logits`).
        """
        batch = dict(batch)
        kmask, kval = batch.pop(KINK_MASK, None), batch.pop(KINK_ON, None)
        model = self.cert_model if cert else self.model
        readout = self.cert_readout if cert else self.readout
        if readout is not None:
            force = (kmask, kval) if kmask is not None else None
            logits, z = readout.logits(params, model_input(batch), force, preacts=store is not None, path=path, tape=tape, shared=shared)
            if store is not None:
                store.append(z)
        else:
            if path is not None or tape is not None or shared != 1:
                raise ValueError("path=, tape= and shared= need the read-out forward")
            x = model_input(batch)
            if x.is_floating_point():
                x = x.to(next(iter(params.values())).dtype)
            forced = self._forced_relus(model, kmask, kval) if kmask is not None else contextlib.nullcontext()
            captured = self._capture(model, store) if store is not None else contextlib.nullcontext()
            with forced, captured:
                logits = functional_call(model, params, (x,))
            if store is not None:
                store[:] = [torch.cat(store, dim=1)]
        if scale is not None:
            scale.append(logits.detach().abs().flatten(1).amax(1))
        v = self.metric(logits, batch)
        return v if v.ndim == 2 else v.unsqueeze(-1)

    def check_readout(self, tokens: Tensor, params: Params | None = None, tol: float = 1e-9, strict: bool = False) -> float | None:
        """Check the read-out forward against the model's own forward, in float64, on ``tokens``.

        Args:
            tokens: ``[Q, pos]`` queries.
            params: trainable parameters to compare at (default: the model's own).
            tol: largest accepted relative difference of logits and pre-activations.
            strict: raise instead of switching the read-out forward off.

        Returns:
            The measured difference (``None`` when no read-out forward is in use). Above ``tol``
            the read-out forward is switched off with a warning (the model's own forward is used
            from then on), or, with ``strict``, a ``RuntimeError`` is raised.
        """
        if self.readout is None:
            return None
        ref = self.cert_model if self.cert_dtype == torch.float64 else frozen_copy(self.model, torch.float64, self.device)
        p64 = None if params is None else {k: v.to(self.device, torch.float64) for k, v in params.items()}
        err = compare_readout(self.readout, ref, tokens.to(self.device), p64, tol, strict, "this model")
        if not err <= tol:
            self.readout = self.cert_readout = None
        return err

    def values(
        self, params: Params, batch: dict[str, Tensor], cert: bool = True, scale: list[Tensor] | None = None
    ) -> Float[Tensor, "query output"]:
        """Metric values ``[Q, O]`` (``O = 1`` for a scalar metric), no gradient; each query's
        largest logit magnitude ``[Q]`` is appended to ``scale`` when given."""
        with torch.no_grad():
            return self._values(params, batch, cert, scale=scale)

    # ------------------------------------------------------------------ kinks
    @staticmethod
    def _relu_hook_names(model: nn.Module) -> list[str]:
        """Where the ReLU pre-activations are observed: TransformerLens hook points (a
        ``HookedTransformer``'s ``hook_pre``, a bridge's MLP input-layer output), else the
        inputs of ``nn.ReLU`` modules."""
        if is_hooked_transformer(model):
            if str(model.cfg.act_fn).lower() != "relu" or model.cfg.attn_only:
                return []
            return [f"blocks.{layer}.mlp.hook_pre" for layer in range(model.cfg.n_layers)]
        if is_transformer_bridge(model):
            return [pre for pre, _ in bridge_relu_hooks(model)]
        return [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]

    @staticmethod
    def _post_hook(model: nn.Module, pre: str) -> str:
        """The hook point of the post-activation that belongs to pre-activation hook ``pre``."""
        if is_transformer_bridge(model):
            return dict(bridge_relu_hooks(model))[pre]
        return pre.replace("hook_pre", "hook_post")

    @property
    def has_kinks(self) -> bool:
        """Whether the model has ReLU units whose pre-activations can be observed."""
        return bool(self.hook_names)

    @contextlib.contextmanager
    def _capture(self, model: nn.Module, store: list[Tensor]) -> Iterator[None]:
        """Record every ReLU pre-activation (flattened per example) during a forward."""
        if is_hooked_transformer(model) or is_transformer_bridge(model):

            def hook(act: Tensor, hook) -> Tensor:  # noqa: ARG001
                store.append(act.detach().reshape(act.shape[0], -1))
                return act

            with model.hooks(fwd_hooks=[(n, hook) for n in self.hook_names]):
                yield
            return
        modules = dict(model.named_modules())

        def fwd_hook(mod, inputs, out):  # noqa: ARG001
            store.append(inputs[0].detach().reshape(inputs[0].shape[0], -1))

        handles = [modules[n].register_forward_hook(fwd_hook) for n in self.hook_names]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def _forced_relus(self, model: nn.Module, kmask: Tensor, kval: Tensor) -> Iterator[None]:
        """Force the state of selected ReLU units (per example): ``post = z`` (on) or ``0`` (off).

        ``kmask``/``kval`` are ``[B, U]`` over the flattened pre-activations of all hooked ReLUs
        in forward order; unforced units keep their natural state.
        """
        offset = [0]

        def adjust(z: Tensor, post: Tensor) -> Tensor:
            n = z[0].numel() if z.ndim > 1 else 1
            sl = slice(offset[0], offset[0] + n)
            offset[0] += n
            m = kmask[:, sl].reshape(z.shape).to(z.dtype)
            on = kval[:, sl].reshape(z.shape).to(z.dtype)
            return post + m * (z * on - post)

        if is_hooked_transformer(model) or is_transformer_bridge(model):
            pre: dict[str, Tensor] = {}
            pre_of = {self._post_hook(model, n): n for n in self.hook_names}

            def pre_hook(act: Tensor, hook) -> Tensor:
                pre[hook.name] = act
                return act

            def post_hook(act: Tensor, hook) -> Tensor:
                return adjust(pre.pop(pre_of[hook.name]), act)

            hooks = []
            for n in self.hook_names:
                hooks += [(n, pre_hook), (self._post_hook(model, n), post_hook)]
            with model.hooks(fwd_hooks=hooks):
                yield
            return
        modules = dict(model.named_modules())
        handles = [
            modules[n].register_forward_hook(lambda mod, inputs, out: adjust(inputs[0], out)) for n in self.hook_names
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def preacts_along(
        self, params: Params, delta: Params, tokens: Int[Tensor, "row pos"], t: Float[Tensor, "row"]
    ) -> Float[Tensor, "row unit"]:
        """Every ReLU pre-activation of row ``i`` at ``params + t[i] * delta`` (working dtype, no
        gradient), in the flattened unit layout of :meth:`values_and_preacts`.

        Raises:
            ValueError: without the read-out forward for this model (``path_preacts`` is None).
        """
        if self.path_preacts is None:
            raise ValueError("pre-activations along a path need the read-out forward (a supported HookedTransformer)")
        with torch.no_grad():
            d = {k: v.to(self.dtype) for k, v in delta.items()}
            _, z = self.path_preacts.logits(params, tokens, preacts=True, path=(d, t.to(self.dtype)))
        return z

    def relevant_units(self, n_pos: int, position: int | list[int] | None) -> Tensor | None:
        """Which flattened ReLU units can influence a metric read at ``position`` (or at any of
        several positions).

        In a causal HookedTransformer, MLP units at positions after the read-out position never
        reach it, and in the last layer only the read-out position itself does. Kinks of the
        other units change nothing and are ignored. ``None`` (all units) for other models or
        when the position is unknown (callable metrics).
        """
        if position is None or not is_hooked_transformer(self.model) or not self.hook_names:
            return None
        if getattr(self.model.cfg, "attention_dir", "causal") != "causal":
            return None
        return readout_units(self.model.cfg, n_pos, position)

    def values_and_preacts(
        self, params: Params, batch: dict[str, Tensor], cert: bool = True, scale: list[Tensor] | None = None
    ) -> tuple[Float[Tensor, "query output"], Float[Tensor, "query unit"] | None]:
        """Metric values and the ReLU pre-activations (flattened per query); see :meth:`values`."""
        if not self.has_kinks:
            return self.values(params, batch, cert, scale), None
        store: list[Tensor] = []
        with torch.no_grad():
            v = self._values(params, batch, cert, store, scale)
        return v, store[0]

    # --------------------------------------------------------------- gradients
    def aggregate_grad(
        self,
        params: Params,
        batch: dict[str, Tensor],
        weights: Float[Tensor, "query"],
        resolve_outputs: bool,
    ) -> dict[str, Tensor]:
        """Gradient of ``Σ_i weights_i · metric_i`` (one batched backward per output row).

        Returns:
            dict of ``[R, *shape]`` with ``R = O`` when ``resolve_outputs`` else ``R = 1``.
        """
        w = weights.to(self.dtype)

        def f(p: Params) -> Tensor:
            v = self._values(p, batch)  # [Q, O]
            out = (v * w[:, None]).sum(0)
            return out if resolve_outputs else out.sum().reshape(1)

        return _rows_grad(f, params, resolve_outputs)

    def aggregate_quadrature(
        self,
        params: Params,
        delta: Params,
        t_nodes: list[float],
        weights: Float[Tensor, "query node"],
        batch: dict[str, Tensor],
        resolve_outputs: bool,
    ) -> dict[str, Tensor]:
        """``Σ_i Σ_j weights[i, j] ∇q_i(params + t_j delta)``: the node-weighted gradient of the
        weighted query sum, ``[R, *shape]`` (``R = O`` when ``resolve_outputs`` else 1).

        With the read-out forward the nodes are stacked as rows of one batch evaluated along the
        path (``n`` nodes x ``Q`` queries, one forward and one backward, every weight matrix in
        one product); otherwise one :meth:`aggregate_grad` per node, summed.
        """
        n = len(t_nodes)
        w = weights.to(self.dtype)
        if self.readout is None or n == 1:
            total: dict[str, Tensor] | None = None
            for j, tj in enumerate(t_nodes):
                g = self.aggregate_grad({k: params[k] + tj * delta[k] for k in params}, batch, w[:, j], resolve_outputs)
                total = g if total is None else {k: total[k] + g[k] for k in g}
            return total
        t = torch.tensor(t_nodes, dtype=self.dtype, device=self.device)  # one per group of Q rows, node-major
        d = {k: v.to(self.dtype) for k, v in delta.items()}
        stacked = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in batch.items()}
        w_rows = w.T.reshape(-1)  # row j * Q + i: weights[i, j]

        def f(p: Params) -> Tensor:
            v = self._values(p, stacked, path=(d, t))  # [n * Q, O]
            out = (v * w_rows[:, None]).sum(0)
            return out if resolve_outputs else out.sum().reshape(1)

        return _rows_grad(f, params, resolve_outputs)

    def per_query_directional(
        self, params: Params, batch: dict[str, Tensor], tangents: Params, resolve_outputs: bool
    ) -> Float[Tensor, "tangent query output"]:
        """Directional derivatives ``<∇ metric_i, t>`` of every query (and output) along every
        tangent ``t`` (dict of ``[T, *shape]``): one forward-mode pass over the batch per tangent.

        Returns:
            ``[T, Q, R]`` with ``R = O`` when ``resolve_outputs`` else ``R = 1`` (outputs summed).
        """

        def f(p: Params) -> Tensor:
            v = self._values(p, batch)  # [Q, O]
            return v if resolve_outputs else v.sum(1, keepdim=True)

        return vmap(lambda t: jvp(f, (params,), (t,))[1])(tangents)

    def per_query_grad(self, params: Params, batch: dict[str, Tensor], resolve_outputs: bool) -> dict[str, Tensor]:
        """Per-query gradients ``[Q, R, *shape]`` (``vmap`` over queries)."""

        def f(p: Params, example: dict[str, Tensor]) -> Tensor:
            v = self._values(p, batch_of_one(example))[0]
            return v if resolve_outputs else v.sum().reshape(1)

        return vmap(jacrev(f), in_dims=(None, 0))(params, batch)

    def per_query_quadrature(
        self,
        params: Params,
        delta: Params,
        t_nodes: list[float],
        weights: Float[Tensor, "query piece node"] | Float[Tensor, "query node"],
        batch: dict[str, Tensor],
        resolve_outputs: bool,
        out: dict[str, Tensor] | None = None,
        index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``Σ_k Σ_j weights[i, k, j] ∇q_ik(params + t_j delta)`` per query, ``[Q, R, *shape]``
        (written into ``out``, views of a caller's buffer with those shapes, when given; with
        ``index`` (``[Q]``), into entries ``index`` of ``out``'s first axis, which may be longer).

        A query's *pieces* ``k`` are evaluations of it with their own batch entries (the forced
        ReLU states of a kinked query's smooth pieces, :func:`~explaind_tl.quadrature.kink_pieces`)
        and their own node weights: ``batch`` entries are ``[Q, pieces, ...]`` with ``weights``
        ``[Q, pieces, n]`` (a piece of weight 0 pads a query with fewer pieces), or ``[Q, ...]``
        with ``[Q, n]`` for one piece each.

        With the read-out forward, every query's pieces and nodes are rows of one batch evaluated
        along the path (:meth:`Readout.logits` ``path=``, node-major, ``shared=`` pieces) with a
        tape of the parameters' uses: one backward, batched over the outputs only, gives each use's output
        cotangents, and :func:`~explaind_tl.model.tape.tape_jacobians` contracts them with the
        uses' inputs over each query's rows (``xᵀ δ`` per weight matrix, for all queries and
        outputs at once). That is, the per-example-gradient trick: no backward per query, no
        ``[Q, R, P]`` block per node or piece. Otherwise one ``vmap(jacrev)`` of
        ``p ↦ Σ_k Σ_j w_kj q_ik(p + t_j Δ)`` at ``p = params`` through the model's own forward:
        its gradient is the weighted sum of the node and piece gradients.
        """
        if weights.dim() == 2:  # one piece per query
            weights, batch = weights[:, None], {k: v[:, None] for k, v in batch.items()}
        if index is not None and (out is None or index.shape != weights.shape[:1]):
            raise ValueError(f"per_query_quadrature: index needs out and one entry per query ({len(weights)})")
        if self.readout is not None:
            return self._taped_quadrature(params, delta, t_nodes, weights, batch, resolve_outputs, out, index)

        def f(p: Params, example: dict[str, Tensor], w: Tensor) -> Tensor:
            total = None
            for j, tj in enumerate(t_nodes):
                v = (self._values({name: p[name] + tj * delta[name] for name in p}, example) * w[:, j : j + 1]).sum(0)
                total = v if total is None else total + v
            return total if resolve_outputs else total.sum().reshape(1)

        g = vmap(jacrev(f), in_dims=(None, 0, 0))(params, batch, weights.to(self.dtype))
        if out is None:
            return g
        for name, v in g.items():
            if index is None:
                out[name].copy_(v)
            else:
                out[name].index_copy_(0, index, v)
        return out

    def _taped_quadrature(self, params: Params, delta: Params, t_nodes: list[float], weights: Float[Tensor, "query piece node"],
                          batch: dict[str, Tensor], resolve_outputs: bool, out: dict[str, Tensor] | None,
                          index: Tensor | None) -> dict[str, Tensor]:
        """:meth:`per_query_quadrature` through the read-out forward's tape.

        Rows are node-major, then query, then piece (the grouped path form: each weight matrix
        formed once per node), and a query's pieces share their rows up to the first MLP
        (:meth:`Readout.logits` ``shared``).
        """
        n_q, k, n = weights.shape
        rows = {key: v.unsqueeze(0).expand(n, *v.shape).flatten(0, 2) for key, v in batch.items()}  # [n * Q * k, ...]
        t = torch.tensor(t_nodes, dtype=self.dtype, device=self.device)
        w_rows = weights.to(self.dtype).permute(2, 0, 1).reshape(-1, 1)
        d = {name: v.to(self.dtype) for name, v in delta.items()}
        tape: list = []
        with torch.enable_grad():  # the graph starts at the tape's first uses, not at the parameters
            total = (self._values(params, rows, path=(d, t), tape=tape, shared=k) * w_rows).sum(0)  # [O]
            if not resolve_outputs:
                total = total.sum().reshape(1)
            cot = tape_cotangents(total, tape)
        shapes = {name: v.shape for name, v in params.items()}
        return tape_jacobians(tape, cot, n_q, shapes, outer=n, out=out, index=index)


def _rows_grad(f: Callable[[Params], Tensor], params: Params, resolve_outputs: bool) -> dict[str, Tensor]:
    """Gradients ``[R, *shape]`` of the ``R`` rows of ``f(params)``: ``jacrev`` for several
    outputs, one plain ``grad`` (no vmap) for the single summed row."""
    if resolve_outputs:
        return jacrev(f)(params)
    return {k: g.unsqueeze(0) for k, g in grad(lambda p: f(p)[0])(params).items()}


def compare_readout(readout: Readout, reference: nn.Module, tokens: Tensor, params: Params | None, tol: float,
                    strict: bool, what: str) -> float:
    """:meth:`Readout.check`; above ``tol`` raise (``strict``) or warn. Returns the difference."""
    err = readout.check(reference, tokens, params)
    if not err <= tol:
        msg = f"read-out forward differs from TransformerLens by {err:.1e} (relative) on {what}"
        if strict:
            raise RuntimeError(msg + "; rerun explain(..., fast_forward=False)")
        warnings.warn(msg + "; using TransformerLens's forward instead", stacklevel=4)
    return err


KINK_MASK = "__kink_mask__"  # batch key: [B, U] bool, which ReLU units are forced
KINK_ON = "__kink_on__"  # batch key: [B, U] bool, their forced state


def frozen_copy(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """A deep copy in ``dtype`` on ``device``, in eval mode, with gradients switched off."""
    m = move_model(copy.deepcopy(model), device, dtype)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m
