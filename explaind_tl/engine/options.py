"""How :func:`explaind_tl.explain` computes: the numerical options as one value.

:class:`ExplainOptions` groups what changes the cost and the accuracy of a result but not what it
means (tolerance, quadrature nodes, kink handling, adaptivity, working dtype, the forward and the
derivative paths, chunk sizes). ``explain(..., options=ExplainOptions(tol=1e-8, nodes=4))`` and
``explain(..., tol=1e-8, nodes=4)`` are the same call; a keyword given next to ``options``
replaces that one field. Every field is checked when the options are made, before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from explaind_tl.engine.validate import (
    check_choice,
    check_dtype,
    check_flag,
    check_int,
    check_positive,
    check_tol,
)

# train_grads -> the most tangents (rows x components) for which the train axis uses jvp
TRAIN_GRADS = {"auto": 12, "jvp": 2**62, "per_example": 0}
# query_grads -> the most tangents (sources x components) for which per-query rows use jvp
QUERY_GRADS = {"auto": 64, "jvp": 2**62, "grad": 0}


class _Unset:
    """Default of explain's option keywords: "take the value from ``options``"."""

    def __repr__(self) -> str:
        return "<from options>"


UNSET: Any = _Unset()


def _check_replay_mb(x: Any) -> float | str | None:
    if x is None or (isinstance(x, str) and x == "auto"):
        return x
    if isinstance(x, str):
        raise ValueError(f"replay_mb must be a number of megabytes > 0, None or 'auto', got {x!r}")
    return check_positive("replay_mb", x, " (or None: whole segments; 'auto')")


@dataclass(frozen=True)
class ExplainOptions:
    """The numerical options of :func:`explaind_tl.explain` (see its docstring for each).

    Attributes:
        tol: per-step relative tolerance of the certificate (finite, > 0).
        nodes: Gauss–Legendre nodes per smooth piece to start a step with (>= 1).
        max_nodes: cap for adaptive refinement (>= ``nodes``).
        kink_aware: cut segments where ReLU pre-activations change sign: True, False or
            ``"auto"`` (when the model has observable ReLUs).
        adaptive_nodes: start the next step with fewer nodes after a comfortable pass.
        dtype: working dtype of gradients, ``torch.float32`` or ``torch.float64``; ``None``:
            the trajectory's.
        fast_forward: use the read-out forward where it is supported (checked before use).
        train_grads: ``"auto"``, ``"jvp"`` or ``"per_example"`` (the train axis).
        query_grads: ``"auto"``, ``"jvp"`` or ``"grad"`` (per-query rows, realized clock).
        query_chunk: queries per chunk; ``None``: chosen from the plan and the model size.
        train_chunk: training examples per chunk of per-example gradients.
        jacobian_mb: the most megabytes of per-query Jacobians (``[queries, outputs, P]`` in
            the working dtype; a kinked query's pieces are summed inside its Jacobian) one call
            holds; a chunk with more queries takes several calls of even sizes
            (:func:`~explaind_tl.engine.certify.jacobian_calls`), each written straight into
            ``φ̂``. Lower saves memory and costs per-call overhead (about 13 ms a call on the
            kernel benchmark's model, as much as ~13 queries' Jacobians). The default, 16,
            takes the kernel benchmark's 20 queries in two calls of 10: 25 MB lower peak than
            one call of 20, at equal or lower time (fewer fresh pages per step). On the train
            axis with per-query rows and one thread, a query chunk is one such call (at most
            ``query_chunk`` queries, evenly sized), and its rows of ``φ̂`` are folded into ``Ã``
            as soon as they are certified, so ``φ̂`` is never held whole.
        replay_mb: the most megabytes of replayed step records (each step's parameters and
            optimizer state) the train-axis sweep holds; a checkpoint segment whose records
            would take more is replayed in sub-segments of ``ceil(sqrt(n))`` of its ``n``
            steps, last first, after one more replay of it that keeps only each sub-segment's
            starting state (about ``2 sqrt(n)`` steps held instead of ``n``; bitwise the same
            records). That costs one more training step per step of such segments: free when
            replay runs on a spare core (more than one thread), and up to ~40% of a 1-thread
            train-axis explain (measured on the default grokking run, ``reduce="mean"``).
            ``None``: whole segments, whatever their size; ``"auto"`` (default): 8 with more
            than one thread, else ``None``.

    Raises:
        TypeError, ValueError: a field of the wrong type or value (as ``explain`` would).
    """

    tol: float = 1e-6
    nodes: int = 2
    max_nodes: int = 32
    kink_aware: bool | str = "auto"
    adaptive_nodes: bool = True
    dtype: torch.dtype | None = None
    fast_forward: bool = True
    train_grads: str = "auto"
    query_grads: str = "auto"
    query_chunk: int | None = None
    train_chunk: int = 256
    jacobian_mb: float = 16.0
    replay_mb: float | str | None = "auto"

    def __post_init__(self) -> None:
        check_choice("train_grads", self.train_grads, tuple(TRAIN_GRADS))
        check_choice("query_grads", self.query_grads, tuple(QUERY_GRADS))
        nodes = check_int("nodes", self.nodes, minimum=1)
        max_nodes = check_int("max_nodes", self.max_nodes, minimum=1)
        if max_nodes < nodes:
            raise ValueError(f"need 1 <= nodes <= max_nodes, got nodes={nodes}, max_nodes={max_nodes}")
        if self.kink_aware != "auto" and not isinstance(self.kink_aware, bool):
            raise TypeError(f"kink_aware must be True, False or 'auto', got {self.kink_aware!r}")
        normalized = {
            "tol": check_tol(self.tol),
            "nodes": nodes,
            "max_nodes": max_nodes,
            "dtype": None if self.dtype is None else check_dtype(self.dtype),
            "query_chunk": None if self.query_chunk is None else check_int("query_chunk", self.query_chunk, minimum=1),
            "train_chunk": check_int("train_chunk", self.train_chunk, minimum=1),
            "jacobian_mb": check_positive("jacobian_mb", self.jacobian_mb),
            "replay_mb": _check_replay_mb(self.replay_mb),
        }
        for name in ("fast_forward", "adaptive_nodes"):
            check_flag(name, getattr(self, name))
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> ExplainOptions:
        """A copy with some fields changed (checked like a new one)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def merge(cls, options: ExplainOptions | None, **keywords: Any) -> ExplainOptions:
        """``options`` (default: all defaults) with the keywords that were given (not
        :data:`UNSET`) replacing their fields.

        Raises:
            TypeError: ``options`` is not an ``ExplainOptions``.
        """
        if options is None:
            options = cls()
        elif not isinstance(options, cls):
            raise TypeError(f"options must be an ExplainOptions, got {type(options).__name__}")
        given = {k: v for k, v in keywords.items() if v is not UNSET}
        return options.replace(**given) if given else options

    @property
    def kinks(self) -> bool:
        """Whether kink-aware quadrature is wanted (``"auto"`` counts as yes: the engine then
        uses it when the model has ReLUs)."""
        return self.kink_aware == "auto" or bool(self.kink_aware)


__all__ = ["QUERY_GRADS", "TRAIN_GRADS", "UNSET", "ExplainOptions"]
