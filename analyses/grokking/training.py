"""Train a grokking preset with the trajectory recorder, stopping after it has grokked.

``explaind_tl.train`` runs a fixed number of steps; grokking runs must stop a fixed number of
steps *after* test accuracy first reaches the threshold, so this module drives
:class:`explaind_tl.TrajectoryRecorder` itself: one recorded full-batch (or minibatch) step at a
time, with train/test loss and accuracy evaluated every ``log_every`` steps.

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

from explaind_tl.tasks import GrokkingConfig, loss_function

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
        config: A preset from :mod:`explaind_tl.tasks` (possibly modified).
        run_dir: Directory of the recorded trajectory.
        progress: Show a tqdm bar with loss and train/test accuracy.
        overwrite: Replace an existing run in ``run_dir``.

    Returns:
        A :class:`TrainingResult`.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from explaind_tl.recorder import TrajectoryRecorder

    cfg = config
    train_ds, test_ds = cfg.data()
    train_b, test_b = dataset_tensors(train_ds), dataset_tensors(test_ds)
    model = cfg.make_model()
    opt = cfg.make_optimizer(model)
    rec = TrajectoryRecorder(
        model,
        opt,
        run_dir,
        train_ds,
        loss_function(),
        checkpoint_every=cfg.checkpoint_every,
        overwrite=overwrite,
    )
    n_train = len(train_ds)
    gen = torch.Generator().manual_seed(cfg.seed)

    rows: list[dict[str, float]] = []
    eval_seconds = 0.0

    def log(step: int) -> dict[str, float]:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        was = model.training
        model.eval()
        tr_loss, tr_acc = evaluate(model, train_b)
        te_loss, te_acc = evaluate(model, test_b)
        model.train(was)
        row = {
            "step": step,
            "train_loss": tr_loss,
            "train_acc": tr_acc,
            "test_loss": te_loss,
            "test_acc": te_acc,
            "weight_norm": weight_norm(model),
        }
        rows.append(row)
        eval_seconds += time.perf_counter() - t0
        return row

    log(0)
    grok_step: int | None = None
    stop_at = cfg.max_steps
    train_seconds = 0.0
    bar = tqdm(total=cfg.max_steps, disable=not progress, desc=f"train [{cfg.name}]", unit="step")
    try:
        step = 0
        while step < stop_at:
            ids = None
            if cfg.batch_size is not None and cfg.batch_size < n_train:
                ids = torch.randperm(n_train, generator=gen)[: cfg.batch_size]
            t0 = time.perf_counter()
            loss = rec.step(ids)
            train_seconds += time.perf_counter() - t0
            step += 1
            if step % cfg.log_every == 0 or step == stop_at:
                row = log(step)
                if grok_step is None and row["test_acc"] >= cfg.stop_test_acc:
                    grok_step = step
                    if cfg.extra_steps is not None:
                        stop_at = min(cfg.max_steps, step + cfg.extra_steps)
                        bar.total = stop_at
                        bar.refresh()
                bar.set_postfix(
                    loss=f"{loss:.3g}",
                    train_acc=f"{row['train_acc']:.3f}",
                    test_acc=f"{row['test_acc']:.3f}",
                    refresh=False,
                )
            bar.update(1)
        if rows[-1]["step"] != step:
            log(step)
        t0 = time.perf_counter()
        rec.close()
        train_seconds += time.perf_counter() - t0
    finally:
        bar.close()
    trajectory = rec.trajectory()
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
