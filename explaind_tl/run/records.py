"""What replaying a recorded run yields: one :class:`StepRecord` per optimizer step, and the
:class:`VerifyReport` of :meth:`explaind_tl.run.trajectory.Trajectory.verify`."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from explaind_tl.optim import OptimizerSpec

Params = dict[str, Tensor]
State = dict[str, dict[str, Tensor]]


@dataclass
class StepRecord:
    """One replayed optimizer step ``w_s -> w_{s+1}``.

    Attributes:
        step: ``s``.
        params: ``w_s`` (copies, dtype as trained; shared with the previous record: read-only).
        next_params: ``w_{s+1}``.
        grad: ``g_s``: clipped mean-loss gradient the optimizer saw (before coupled L2);
            ``{}`` from ``Trajectory.segments(..., grads=False)``.
        state_before: Optimizer state before the step, ``{"exp_avg": {name: T}, ...}``;
            ``{}`` before the first step (and always for plain SGD).
        state_after: Optimizer state after the step.
        step_count: torch's step counter after the step, ``t = s + 1``.
        lr: Learning rate used.
        clip_factor: ``κ_s`` (1.0 without clipping).
        loss: Mean batch loss at ``w_s``.
        batch_ids: ``[B]`` training-example ids.
        spec: The optimizer spec this step used (its ``lr``, ``betas``, ``eps``,
            ``weight_decay``, ``momentum``, ``dampening``: schedulers and hand edits change them
            between steps); ``None`` only for records built elsewhere.
    """

    step: int
    params: Params
    next_params: Params
    grad: Params
    state_before: State
    state_after: State
    step_count: int
    lr: float
    clip_factor: float
    loss: float
    batch_ids: Tensor
    spec: OptimizerSpec | None = None

    @property
    def first_step(self) -> bool:
        """Whether this is the optimizer's first step (no state before)."""
        return self.step_count == 1


@dataclass
class VerifyReport:
    """Result of :meth:`Trajectory.verify`.

    Attributes:
        per_checkpoint: ``{checkpoint step: max abs diff}`` of replayed vs stored params and
            optimizer state (0.0 when bitwise equal).
        max_abs_diff: Maximum over checkpoints.
    """

    per_checkpoint: dict[int, float] = field(default_factory=dict)
    max_abs_diff: float = 0.0

    @property
    def ok(self) -> bool:
        """True when replay is bitwise identical at every checkpoint."""
        return self.max_abs_diff == 0.0

    def __str__(self) -> str:
        return f"VerifyReport(ok={self.ok}, max_abs_diff={self.max_abs_diff:.3g}, checkpoints={len(self.per_checkpoint)})"
