"""The one training step shared by recording and replay (docs/design.md §5).

:func:`train_step` is what :class:`explaind_tl.run.recorder.TrajectoryRecorder` runs and what
:class:`explaind_tl.run.trajectory.Trajectory` replays: the same mean of per-example losses, the
same clipping, the same single-tensor optimizer code, under the same number of CPU threads
(:func:`torch_threads`). Replay is therefore exact by construction; :func:`check_no_dropout` and
:func:`determinism_probe` refuse the randomness that would break it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from explaind_tl.errors import NondeterministicTrainingError, RecordingError

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def clip_grad_norm(grads: list[Tensor], max_norm: float) -> float:
    """Scale ``grads`` in place like ``torch.nn.utils.clip_grad_norm_``; return ``κ``.

    ``κ = min(1, max_norm / (total_norm + 1e-6))`` with the global 2-norm; the gradients are
    always multiplied by ``κ`` (a no-op at 1.0).

    Raises:
        RecordingError: the gradient norm is not finite.
    """
    norms = [torch.linalg.vector_norm(g, 2.0) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    if not torch.isfinite(total):
        raise RecordingError(f"non-finite gradient norm ({float(total)})")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return float(coef)


@dataclass
class StepOutcome:
    """What one :func:`train_step` observed."""

    loss: float
    lr: float
    clip_factor: float
    grads: list[Tensor] | None  # clipped gradients the optimizer saw (cloned), if captured


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    loss_fn: LossFn,
    batch: dict[str, Tensor],
    clip_max_norm: float | None,
    *,
    lr: float | None = None,
    capture_grads: bool = False,
    before_step: Callable[[], None] | None = None,
) -> StepOutcome:
    """One optimizer step on ``batch`` (mean of per-example losses); identical for record/replay.

    Args:
        model: The model (its mode is left as is).
        optimizer: Single-group optimizer over ``params``.
        params: Trainable parameters in ``named_parameters()`` order.
        loss_fn: ``loss_fn(model, batch) -> [B]`` per-example losses.
        batch: Rows of the training set.
        clip_max_norm: Global-norm clipping threshold or ``None``.
        lr: If given, set as the group's lr first (replay); else the current lr is used.
        capture_grads: Clone the (clipped) gradients before the optimizer step.
        before_step: Called right before ``optimizer.step()`` (e.g. to snapshot state).

    Raises:
        RecordingError: wrong loss shape, non-finite loss or gradients (nothing is changed).
    """
    group = optimizer.param_groups[0]
    if lr is not None:
        group["lr"] = lr
    for p in params:
        p.grad = None
    losses = loss_fn(model, batch)
    n = next(iter(batch.values())).shape[0]
    if not isinstance(losses, Tensor) or losses.shape != (n,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise RecordingError(f"loss_fn must return per-example losses of shape [{n}] (batch size), got {shape}")
    if not bool(torch.isfinite(losses).all()):
        bad = torch.nonzero(~torch.isfinite(losses)).flatten()[:5].tolist()
        raise RecordingError(f"non-finite loss for batch rows {bad}; the run is valid up to its last checkpoint")
    loss = losses.mean()
    loss.backward()
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if clip_max_norm is not None:
        kappa = clip_grad_norm(grads, clip_max_norm)
    else:
        kappa = 1.0
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            raise RecordingError("non-finite gradients; the run is valid up to its last checkpoint")
    captured = [g.detach().clone() for g in grads] if capture_grads else None
    lr_used = float(group["lr"])
    if before_step is not None:
        before_step()
    optimizer.step()
    return StepOutcome(loss=float(loss.detach()), lr=lr_used, clip_factor=kappa, grads=captured)


def check_no_dropout(model: nn.Module) -> None:
    """Refuse active dropout-like modules (``p > 0`` while training).

    Raises:
        NondeterministicTrainingError: naming the module.
    """
    if not model.training:
        return
    for name, mod in model.named_modules():
        p = getattr(mod, "p", None)
        is_dropout = isinstance(mod, nn.modules.dropout._DropoutNd) or "dropout" in type(mod).__name__.lower()
        if is_dropout and mod.training and isinstance(p, (int, float)) and p > 0:
            raise NondeterministicTrainingError(
                f"module {name or '<root>'} ({type(mod).__name__}, p={p}) is random while training; "
                "replay must be exact: set p=0 or call model.eval() before recording"
            )


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.detach().reshape(-1).contiguous().view(torch.uint8), b.detach().reshape(-1).contiguous().view(torch.uint8))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (``None``: leave as is), then restore."""
    cur = torch.get_num_threads()
    if n is None or n == cur:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(cur)


def determinism_probe(model: nn.Module, loss_fn: LossFn, batch: dict[str, Tensor]) -> None:
    """Run ``loss_fn`` twice and require bitwise-equal losses and an untouched RNG.

    Raises:
        NondeterministicTrainingError: if the two runs differ or the RNG was consumed.
    """
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            a = loss_fn(model, batch)
            mid = torch.get_rng_state()
            b = loss_fn(model, batch)
        if not torch.equal(rng, mid):
            raise NondeterministicTrainingError("loss_fn draws random numbers (the torch RNG changed); training must be deterministic to be replayed")
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and _bitwise_equal(a, b)):
            raise NondeterministicTrainingError("loss_fn gave different results on the same batch twice; training must be deterministic to be replayed")
    finally:
        torch.set_rng_state(rng)
