"""Train a grokking preset with the trajectory recorder, stopping after it has grokked.

Training is :func:`explaind_tl.train` (the library's one recorded training loop): its callback
evaluates train/test loss and accuracy every ``log_every`` steps, and ``stop_when`` ends the
run a fixed number of steps *after* test accuracy first reaches the threshold. Minibatches, when
a config asks for them, come from the loop's seeded schedule (:func:`explaind_tl.run.training.batch_schedule`).

Metric rows are indexed by parameter step: the row ``step = s`` is evaluated at ``w_s``, the
parameters *before* update ``s`` (so ``step = 0`` is the initialisation and ``step = T`` the
final model), matching ``Trajectory.params_at(s)`` and the step axis of attributions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .task import GrokkingConfig

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from datasets import Dataset

__all__ = ["TrainingResult", "evaluate", "train_grokking", "weight_norm"]


@dataclass
class TrainingResult:
    """What :func:`train_grokking` produced.

    Attributes:
        trajectory: The recorded run (``explaind_tl.Trajectory``).
        metrics: One row per logged step: ``step, train_loss, train_acc, test_loss, test_acc,
            weight_norm``.
        config: The config that was trained.
        train_data: Training set (``tokens``, ``label``, ``id``).
        test_data: Test set.
        grok_step: First logged step with test accuracy ``>= config.stop_test_acc``
            (``None`` if never reached).
        num_steps: Number of optimizer steps ``T``.
        train_seconds: Wall time of the recorded steps (including checkpoint writes).
        eval_seconds: Wall time of the train/test evaluations.
    """

    trajectory: Any
    metrics: pd.DataFrame
    config: GrokkingConfig
    train_data: Dataset
    test_data: Dataset
    grok_step: int | None
    num_steps: int
    train_seconds: float
    eval_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ms_per_step(self) -> float:
        """Milliseconds per recorded training step."""
        return 1000.0 * self.train_seconds / max(self.num_steps, 1)


def dataset_tensors(ds: Dataset) -> dict[str, torch.Tensor]:
    """``{"tokens": [N, 3], "label": [N]}`` int64 tensors of a modular-addition split."""
    rows = ds.with_format("torch")[:]
    return {"tokens": rows["tokens"].long(), "label": rows["label"].long()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the last-position logits on ``batch``."""
    logits = model(batch["tokens"])[:, -1, :]
    loss = torch.nn.functional.cross_entropy(logits.double(), batch["label"]).item()
    acc = (logits.argmax(-1) == batch["label"]).double().mean().item()
    return loss, acc


def weight_norm(params: dict[str, torch.Tensor] | torch.nn.Module) -> float:
    """Total L2 norm of all (trainable) parameters."""
    if isinstance(params, torch.nn.Module):
        tensors = [p for p in params.parameters() if p.requires_grad]
    else:
        tensors = list(params.values())
    return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors)))


def train_grokking(
    config: GrokkingConfig,
    run_dir: str | Path,
    *,
    progress: bool = True,
    overwrite: bool = True,
) -> TrainingResult:
    """Train ``config`` with the recorder into ``run_dir`` until it has grokked.

    Stops ``config.extra_steps`` steps after the first logged step with test accuracy
    ``>= config.stop_test_acc`` (or at ``config.max_steps``; exactly ``max_steps`` when
    ``extra_steps`` is ``None``).

    Args:
        config: A preset from :mod:`analyses.grokking.task` (possibly modified).
        run_dir: Directory of the recorded trajectory.
        progress: Show a tqdm bar with loss and train/test accuracy.
        overwrite: Replace an existing run in ``run_dir``.

    Returns:
        A :class:`TrainingResult`.
    """
    import pandas as pd

    from explaind_tl import train
    from explaind_tl.losses import last_token_cross_entropy

    cfg = config
    train_ds, test_ds = cfg.data()
    train_b, test_b = dataset_tensors(train_ds), dataset_tensors(test_ds)
    model = cfg.make_model()
    opt = cfg.make_optimizer(model)

    rows: list[dict[str, float]] = []
    eval_seconds = 0.0
    grok_step: int | None = None
    stop_at = cfg.max_steps

    def log(step: int, model: torch.nn.Module = model) -> dict[str, float]:
        nonlocal eval_seconds, grok_step, stop_at
        t0 = time.perf_counter()
        model.eval()
        tr_loss, tr_acc = evaluate(model, train_b)
        te_loss, te_acc = evaluate(model, test_b)
        row = {
            "step": step,
            "train_loss": tr_loss,
            "train_acc": tr_acc,
            "test_loss": te_loss,
            "test_acc": te_acc,
            "weight_norm": weight_norm(model),
        }
        rows.append(row)
        if grok_step is None and step > 0 and te_acc >= cfg.stop_test_acc:
            grok_step = step
            if cfg.extra_steps is not None:
                stop_at = min(cfg.max_steps, step + cfg.extra_steps)
        eval_seconds += time.perf_counter() - t0
        return row

    was = model.training
    log(0)
    model.train(was)
    evals_before = eval_seconds
    t0 = time.perf_counter()
    trajectory = train(
        model,
        opt,
        train_ds,
        last_token_cross_entropy,
        steps=cfg.max_steps,
        batch_size=cfg.batch_size if cfg.batch_size is not None and cfg.batch_size < len(train_ds) else None,
        seed=cfg.seed,
        run_dir=run_dir,
        checkpoint_every=cfg.checkpoint_every,
        callback=log,
        callback_every=cfg.log_every,
        progress=progress,
        overwrite=overwrite,
        stop_when=lambda step, _model: step >= stop_at,
    )
    step = trajectory.num_steps
    # the loop's wall time less its evaluations: recorded steps, checkpoint writes, setup and load
    train_seconds = time.perf_counter() - t0 - (eval_seconds - evals_before)
    return TrainingResult(
        trajectory=trajectory,
        metrics=pd.DataFrame(rows),
        config=cfg,
        train_data=train_ds,
        test_data=test_ds,
        grok_step=grok_step,
        num_steps=step,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
    )
