"""The one training step shared by recording and replay (docs/design.md §5).

:func:`train_step` is what :class:`explaind_tl.run.recorder.TrajectoryRecorder` runs and what
:class:`explaind_tl.run.trajectory.Trajectory` replays: the same mean of per-example losses, the
same clipping, the same single-tensor optimizer code, under the same number of CPU threads
(:func:`torch_threads`) and, on a GPU, with PyTorch's deterministic algorithms
(:func:`deterministic_algorithms`). Replay is therefore exact by construction;
:func:`check_no_dropout` and :func:`determinism_probe` refuse the randomness that would break it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from explaind_tl.errors import (
    NondeterministicTrainingError,
    RecordingError,
    ReplayMismatchWarning,
    TrajectoryError,
)
from explaind_tl.run.format import DEVICE_TYPES

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


CUBLAS_WORKSPACE = ":4096:8"  # what PyTorch asks for to make cuBLAS deterministic (CUDA >= 10.2)
_NONDETERMINISTIC = ("does not have a deterministic implementation", "CUBLAS_WORKSPACE_CONFIG")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, where: str = "the training step") -> Iterator[None]:
    """Run the block with ``torch.use_deterministic_algorithms(True)`` (and cuDNN's deterministic,
    non-benchmarking mode), then restore the previous settings; ``enabled=False``: as is.

    GPU kernels that accumulate with atomics (scatter-adds, some cuBLAS reductions) give
    different bits on every run; under this mode PyTorch picks deterministic kernels or raises
    for ops that have none. ``CUBLAS_WORKSPACE_CONFIG`` is set to ``":4096:8"`` when unset (it
    must be set before the process's first cuBLAS call to take effect; set it in the
    environment to be sure).

    Raises:
        NondeterministicTrainingError: an op in the block has no deterministic implementation
            (PyTorch's message, which names the op, is kept).
    """
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    except RuntimeError as exc:
        if any(m in str(exc) for m in _NONDETERMINISTIC):
            raise NondeterministicTrainingError(
                f"{where} uses an operation without a deterministic implementation on this device, so it "
                f"could not be replayed exactly: {exc}"
            ) from exc
        raise
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def recording_device(params: list[Tensor], deterministic: bool | None, recorded: dict | None = None) -> tuple[torch.device, bool]:
    """Where a recorder runs (its parameters' device) and whether in deterministic mode (default:
    on a GPU). ``recorded``: the manifest of a run being resumed, whose device and mode win.

    Raises:
        RecordingError: ``deterministic`` not a bool or None; parameters on an unsupported device.
        TrajectoryError: resuming on another device type than the run was recorded on.
    """
    if deterministic is not None and not isinstance(deterministic, bool):
        raise RecordingError(f"deterministic must be True, False or None, got {deterministic!r}")
    device = params[0].device if params else torch.device("cpu")
    if device.type not in DEVICE_TYPES:
        raise RecordingError(f"the model is on {device}; recording supports {DEVICE_TYPES}")
    if recorded is None:
        return device, device.type == "cuda" if deterministic is None else deterministic
    if recorded.get("device", "cpu") != device.type:
        where = recorded.get("device", "cpu")
        raise TrajectoryError(
            f"this run was recorded on {where}; resume it with the model on {where}, not {device.type} "
            "(replay runs every step on the device that recorded it)"
        )
    return device, bool(recorded.get("deterministic", False))


def replay_device(device: object, recorded: str, run_dir: object) -> torch.device:
    """The device replay runs on: ``device``, else the recorded one, else the CPU (warned)."""
    if device is not None:
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
        return torch.device(device)
    if recorded == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"{run_dir} was recorded on a GPU and no GPU is available: replaying on the CPU, whose kernels round "
            "differently, so replayed steps are not bitwise the recorded ones (the certificate shows the residual)",
            ReplayMismatchWarning, stacklevel=3,
        )
        return torch.device("cpu")
    return torch.device(recorded)


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
