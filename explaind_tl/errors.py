"""Exceptions raised by explaind_tl. Every bad input gets one of these with a clear message."""

from __future__ import annotations


class ExplaindError(Exception):
    """Base class for all explaind_tl errors."""


class UnsupportedOptimizerError(ExplaindError, ValueError):
    """The optimizer (or one of its settings) cannot be decomposed exactly."""


class NondeterministicTrainingError(ExplaindError, RuntimeError):
    """Training is random (dropout, stochastic layers, a GPU op without a deterministic kernel)
    so it cannot be replayed exactly."""


class RecordingError(ExplaindError, ValueError):
    """Bad input while recording (batch ids, loss shape, non-finite values, ...)."""


class TrajectoryError(ExplaindError, RuntimeError):
    """A run directory is missing, truncated, corrupted or does not match the model."""


class ChecksumError(TrajectoryError):
    """A file in a run directory does not match the checksum in its manifest."""


class ModelMismatchError(TrajectoryError, ValueError):
    """A model does not match the configuration stored in a run directory."""


class QueryError(ExplaindError, ValueError):
    """Queries are empty, malformed or out of vocabulary."""


class ReplayMismatchWarning(UserWarning):
    """A replayed segment did not reproduce its closing checkpoint bitwise (or cannot: a GPU run
    replayed on the CPU)."""


class CertificateWarning(ExplaindError, UserWarning):
    """Some steps of an attribution missed their completeness bound (see ``Completeness.ok``)."""


class CertificateError(ExplaindError, ArithmeticError):
    """``explain(..., strict=True)``: some steps missed their completeness bound.

    Attributes:
        attribution: the finished :class:`explaind_tl.Attribution`, certificate included, for
            inspection (``attribution.completeness.failed_steps``).
    """

    def __init__(self, message: str, attribution=None) -> None:
        super().__init__(message)
        self.attribution = attribution


class ExplainWorkerError(ExplaindError, RuntimeError):
    """A worker process of ``explain(..., world_size=N)`` died or raised (its rank and its step or
    query range are in the message)."""


class StorageError(TrajectoryError, OSError):
    """Writing a run directory failed (disk full, permission denied, ...).

    ``errno`` and ``filename`` are those of the underlying ``OSError``; the message says up to
    which step the run directory is valid.
    """

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.filename = filename
        self.message = message

    def __str__(self) -> str:
        return self.message


class UntrustedCodeError(TrajectoryError):
    """A run directory names code (a callable, a tokenizer) that is not explaind_tl's own.

    Pass the callable itself (``loss_fn=``, ``model_factory=``) or ``trust_remote_code=True``
    if you trust the directory.
    """


class SchedulerStateError(ExplaindError, ValueError):
    """A scheduler's ``state_dict()`` holds something that cannot be stored as JSON."""
