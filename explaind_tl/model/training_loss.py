"""Training-loss gradients for the data axis: per-example gradients and directional derivatives.

Everything the engine needs from the training loss goes through :class:`LossFunction`: the
per-example losses, their gradients (``[B, P]``), or their directional derivatives along a few
tangents (``[T, B]``, no ``[B, P]`` block), through the read-out forward where it applies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from explaind_tl.losses import last_token_cross_entropy
from explaind_tl.model.functional import Params, batch_of_one, compare_readout, frozen_copy
from explaind_tl.model.readout import Readout, unsupported_reason
from explaind_tl.model.tape import tape_cotangents, tape_jacobians


class LossFunction:
    """Training-loss gradients for the data axis (``loss_fn(model, batch) -> [B]``).

    Two ways to the data entries ``<G, ∇ℓ(x_i; w)>``: materialised per-example gradients
    (:meth:`per_example_grad`, ``[B, P]``, then a contraction), or forward-mode directional
    derivatives of the per-example losses along each tangent ``G`` (:meth:`per_example_dots`,
    ``[T, B]``, no ``B x P`` block at all), which is far cheaper when there are few tangents.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, dtype: torch.dtype, device, fast_forward: bool = False) -> None:
        self.model = frozen_copy(model, dtype, device)
        self.loss_fn = loss_fn
        self.dtype = dtype
        self.device = torch.device(device)
        self.wrapper = _LossModule(self.model, loss_fn)
        per_token = getattr(loss_fn, "per_token", None)
        self.token_wrapper = _LossModule(self.model, per_token) if callable(per_token) else None
        # the built-in last-token cross entropy through the read-out forward (checked before use)
        self.readout = None
        if fast_forward and loss_fn is last_token_cross_entropy and unsupported_reason(self.model) is None:
            self.readout = Readout(self.model, -1)

    def check_readout(self, tokens: Tensor, tol: float = 1e-9) -> float | None:
        """Compare the read-out forward with the model's own in float64 (see
        :meth:`QueryFunction.check_readout`); switch it off with a warning above ``tol``."""
        if self.readout is None:
            return None
        ref = frozen_copy(self.model, torch.float64, self.device)
        err = compare_readout(self.readout, ref, tokens.to(self.device), None, tol, False, "the training loss")
        if not err <= tol:
            self.readout = None
        return err

    def losses(self, params: Params, batch: dict[str, Tensor]) -> Float[Tensor, "batch"]:
        """Per-example training losses ``[B]`` at ``params``."""
        batch = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in batch.items()}
        if self.readout is not None:
            logits, _ = self.readout.logits(params, batch["tokens"])
            return torch.nn.functional.cross_entropy(logits, batch["label"], reduction="none")
        return functional_call(self.wrapper, {"model." + k: v for k, v in params.items()}, (batch,))

    def per_example_grad(self, params: Params, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``∇ℓ(x_i; w)`` for each row of ``batch``: dict of ``[B, *shape]``.

        Through the read-out forward, one backward of the summed losses over the batch with a
        tape of the parameters' uses, contracted per example (:func:`~explaind_tl.model.tape.tape_jacobians`:
        ``Σ_rows xᵀ δ`` per weight matrix, the per-example-gradient trick; rows never interact,
        so each example's cotangents are its own loss's); otherwise ``vmap(grad)`` through
        TransformerLens's forward.
        """
        if self.readout is None:
            return vmap(grad(lambda p, example: self.losses(p, batch_of_one(example))[0]), in_dims=(None, 0))(params, batch)
        tokens, label = batch["tokens"], batch["label"]
        tape: list = []
        with torch.enable_grad():  # the graph starts at the tape's first uses, not at the parameters
            logits, _ = self.readout.logits(params, tokens, tape=tape)
            loss = torch.nn.functional.cross_entropy(logits, label, reduction="sum")
            cot = tape_cotangents(loss.reshape(1), tape)
        shapes = {name: v.shape for name, v in params.items()}
        got = tape_jacobians(tape, cot, tokens.shape[0], shapes)
        return {name: v[:, 0] for name, v in got.items()}

    def per_example_dots(self, params: Params, batch: dict[str, Tensor], tangents: Params, per_token: bool = False) -> Tensor:
        """``<t, ∇ℓ(x_i; w)>`` for every tangent ``t`` (dict of ``[T, *shape]``) and row ``i``:
        ``[T, B]``; with ``per_token``, of each token's loss term (``loss_fn.per_token``):
        ``[T, B, n_terms]``.

        One forward-mode pass over the batch per tangent (``vmap`` over tangents); the
        per-example losses must not depend on each other (the ``loss_fn`` contract).
        """
        tan = {k: v.to(self.dtype) for k, v in tangents.items()}
        f = self.token_losses if per_token else self.losses
        return vmap(lambda t: jvp(lambda p: f(p, batch), (params,), (t,))[1])(tan)

    def token_losses(self, params: Params, batch: dict[str, Tensor]) -> Float[Tensor, "batch term"]:
        """Each row's loss split into its token terms, ``loss_fn.per_token(model, batch)`` (rows
        sum to :meth:`losses`), through TransformerLens's forward."""
        if self.token_wrapper is None:
            raise ValueError("the training loss has no per_token split (loss_fn.per_token)")
        batch = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in batch.items()}
        return functional_call(self.token_wrapper, {"model." + k: v for k, v in params.items()}, (batch,))


class _LossModule(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.loss_fn(self.model, batch)
