"""The whole grokking study in one call: train, find phases, explain, analyse, report.

Output directory layout (``out``):

=============================  ================================================================
``config.json``                the config trained (all fields)
``run/``                       the recorded trajectory (``explaind_tl.Trajectory.load``)
``metrics.csv``                per logged step: train/test loss and accuracy, weight norm
``phases.json``                phase boundaries, key frequencies and the progress-measure checks
``progress_measures.csv``      restricted/excluded loss, weight norm, Fourier norms per checkpoint
``attributions/*.safetensors`` ``Attribution.save`` files (test set, training set, alignment)
``components_{test,train}.csv`` per-component influence, data vs weight decay, per phase
``phase_shares_{test,train}.csv`` per phase: component-group shares, weight decay share
``alignment.csv``              per window and component: mean pairwise cosine of query influence
``swap.csv``                   swap experiment: test accuracy of final-outer/step-s-inner hybrids
``timings.json``               wall time of every stage
``figures/*.png``, ``report.md``, ``claims.csv``  written by :mod:`.report`
=============================  ================================================================
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .task import GrokkingConfig, modular_addition_tensors

__all__ = ["StudyResult", "run_study"]


@dataclass
class StudyResult:
    """Paths and headline numbers of one study (see :func:`run_study`)."""

    out: Path
    report: Path | None
    summary: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _write_json(path: Path, obj: Any) -> None:
    from explaind_tl.run.storage import to_jsonable

    path.write_text(json.dumps(to_jsonable(obj), indent=2, default=str) + "\n")


def _subset(batch: dict, n: int | None, seed: int) -> dict:
    """The first ``n`` rows of a seeded permutation (all rows when ``n`` is None or too big)."""
    import torch

    m = int(batch["label"].shape[0])
    if n is None or n >= m:
        return batch
    idx = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:n]
    return {k: v[idx] for k, v in batch.items()}


def run_study(
    config: GrokkingConfig,
    out: str | Path,
    *,
    explain: bool = True,
    n_queries: int | None = None,
    n_test_queries: int | None = None,
    n_train_queries: int | None = None,
    progress: bool = True,
    log: Any = print,
) -> StudyResult:
    """Run the grokking study and write its report directory.

    Args:
        config: The preset to train.
        out: Report directory (created; an existing run inside is replaced).
        explain: Run the ExPLAIND analyses (``False``: training, phases, progress measures and
            the swap experiment only).
        n_queries: Test queries for the per-query alignment analysis (default
            ``config.n_align_queries``).
        n_test_queries: Test examples used as queries for the test-set influence (default
            ``config.n_test_queries``; ``None`` there means the whole test set).
        n_train_queries: Training examples used as queries for the training-set influence
            (default ``config.n_train_queries``; ``None`` there means all).
        progress: Show progress bars.
        log: ``log(str)`` for stage messages (``None`` to silence).

    Returns:
        :class:`StudyResult`.
    """
    import torch

    from .alignment import alignment_windows, query_alignment, swap_experiment
    from .components import component_influence, influence_table, phase_shares
    from .phases import find_phases, phase_checks, progress_measures
    from .report import write_report
    from .training import dataset_tensors, train_grokking

    say = log or (lambda *_: None)
    cfg = config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attributions").mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    _write_json(out / "config.json", cfg.to_dict())

    # ---- 1. train ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    tr = train_grokking(cfg, out / "run", progress=progress)
    timings["train"] = time.perf_counter() - t0
    timings["train_steps_only"] = tr.train_seconds
    timings["ms_per_step"] = tr.ms_per_step
    tr.metrics.to_csv(out / "metrics.csv", index=False)
    traj = tr.trajectory
    say(
        f"trained {tr.num_steps} steps in {timings['train']:.0f}s ({tr.ms_per_step:.1f} ms/step); "
        f"test acc >= {cfg.stop_test_acc:.0%} at step {tr.grok_step}"
    )

    # ---- 2. phases + progress measures ------------------------------------------------------
    t0 = time.perf_counter()
    phases = find_phases(tr.metrics, cfg.stop_test_acc)
    split = modular_addition_tensors(cfg.p, cfg.train_fraction, cfg.data_seed)
    pm, keys = progress_measures(traj, cfg.p, split["train_pairs"], n_keys=cfg.n_fourier_keys)
    pm.to_csv(out / "progress_measures.csv", index=False)
    checks = phase_checks(phases, pm)
    _write_json(
        out / "phases.json",
        {"phases": phases.to_dict(), "key_frequencies": keys, "checks": checks},
    )
    timings["phases"] = time.perf_counter() - t0
    say(f"phases: {phases.intervals()}; key frequencies {keys}")

    # ---- 3. swap experiment (forward passes only) --------------------------------------------
    t0 = time.perf_counter()
    test_b, train_b = dataset_tensors(tr.test_data), dataset_tensors(tr.train_data)
    swap_experiment(traj, test_b).to_csv(out / "swap.csv", index=False)
    timings["swap"] = time.perf_counter() - t0

    # ---- 4. ExPLAIND ------------------------------------------------------------------------
    def influence(name: str, queries: dict, dtype: Any) -> None:
        """Per-component influence on ``queries``: saved, tabulated, split by phase."""
        attr = component_influence(traj, queries, step_bin=cfg.step_bin, dtype=dtype, progress=progress)
        attr.save(out / "attributions" / f"components_{name}.safetensors")
        influence_table(attr, phases).to_csv(out / f"components_{name}.csv", index=False)
        phase_shares(attr, phases).to_csv(out / f"phase_shares_{name}.csv", index=False)

    if explain:
        t0 = time.perf_counter()
        n_teq = cfg.n_test_queries if n_test_queries is None else n_test_queries
        test_q = _subset(test_b, n_teq, cfg.seed + 2)
        say(
            f"explaining the mean test log-prob ({int(test_q['label'].shape[0])} test examples) over "
            f"{traj.num_steps} steps x components x sources"
        )
        influence("test", test_q, None)
        timings["explain_test"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        n_tq = cfg.n_train_queries if n_train_queries is None else n_train_queries
        train_q = _subset(train_b, n_tq, cfg.seed + 1)
        say(f"explaining the mean train log-prob ({int(train_q['label'].shape[0])} training examples, float64)")
        # memorised examples' log-probs saturate near 0: float32 gradients would leave ~1e-4
        # relative rounding in the certificate, float64 costs ~1.2x on CPU and is exact
        influence("train", train_q, torch.float64)
        timings["explain_train"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        nq = cfg.n_align_queries if n_queries is None else n_queries
        queries = _subset(test_b, nq, cfg.seed)
        windows = alignment_windows(phases, cfg.align_window)
        say(f"per-query alignment: {int(queries['label'].shape[0])} test queries, windows {windows}")
        align_bin = max(1, cfg.align_window // 10)
        frame, attrs = query_alignment(traj, queries, windows, step_bin=align_bin, dtype=torch.float64, progress=progress)
        frame.to_csv(out / "alignment.csv", index=False)
        for name, a in attrs.items():
            a.save(out / "attributions" / f"alignment_{name}.safetensors")
        timings["alignment"] = time.perf_counter() - t0
    else:
        for stale in ("components_test.csv", "components_train.csv", "alignment.csv"):
            (out / stale).unlink(missing_ok=True)

    timings["total_before_report"] = sum(
        v for k, v in timings.items() if k not in ("train_steps_only", "ms_per_step")
    )
    _write_json(out / "timings.json", timings)

    # ---- 5. report --------------------------------------------------------------------------
    t0 = time.perf_counter()
    report = write_report(out)
    timings["report"] = time.perf_counter() - t0
    _write_json(out / "timings.json", timings)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return StudyResult(out=out, report=report, summary=summary, timings=timings)
