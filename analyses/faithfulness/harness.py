"""``explaind-tl faithfulness``: the linear datamodeling score of training-example attributions.

One study's run is recorded (grokking or induction, a preset), each method scores every
training example for each query (:mod:`.methods`), and ``M`` random subsets per drop fraction
are retrained from the same initialisation with the same batches minus the left-out examples
(:func:`explaind_tl.run.retrain.retrain`, the project's one training step). The LDS of each
method (:mod:`.lds`) goes to ``DIR/faithfulness.json`` and ``DIR/report.md``, with the head
ablation curves of four rankings (:mod:`.ablation`) and the parameter-pruning curves of three
(:mod:`.pruning`).

Cost: recording once, scoring (the train-axis explain; TracIn's per-step query gradients), and
``M x len(drops)`` retrainings of the whole run, which dominate: a retraining costs about one
recorded run, so the default ``M=64`` with two fractions is 128 training runs. Fewer steps
(``--steps``) or subsets (``--subsets``) trade precision of the LDS (its interval widens as
``1/sqrt(M)`` per query) for time.

With ``datamodel=K``, each drop fraction also retrains ``K`` further subsets (drawn with another
seed) and fits a linear datamodel to them (:func:`.lds.fit_datamodel`), scored on the same
evaluation subsets as the methods: the empirical ceiling of any score that predicts by summing
per-example contributions. It costs ``K`` more retrainings per fraction; ``K`` several times
the number of training examples is what makes the fit meaningful.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .lds import fit_datamodel, lds, random_subsets
from .methods import METHODS, scores

__all__ = ["STUDY_METRICS", "Study", "prepare_study", "run_faithfulness"]

# the query outputs each study can be scored on; the first is the default
STUDY_METRICS = {
    "grokking": ("correct_logprob", "correct_logit", "loss"),
    "induction": ("next_token_logprob", "next_token_loss"),
}


@dataclass
class Study:
    """A recorded run and what its queries measure."""

    name: str
    config: str
    trajectory: Any
    queries: dict
    metric: str
    position: Any
    train_seconds: float
    evaluation: dict | None = None  # a larger held-out set for the pruning test (labels or loss_mask)


def prepare_study(study: str, config: str, out: Path, n_queries: int | None, steps: int | None, progress: bool,
                  metric: str | None = None) -> Study:
    """Record the study's run (``steps`` overrides the preset's length) and pick its queries, read
    with ``metric`` (one of :data:`STUDY_METRICS` of the study; ``None``: its default)."""
    if study in STUDY_METRICS and metric is None:
        metric = STUDY_METRICS[study][0]
    if study == "grokking":
        from analyses.grokking.task import get_config
        from analyses.grokking.training import dataset_tensors, train_grokking

        cfg = get_config(config, **({"max_steps": steps, "extra_steps": None} if steps else {}))
        t0 = time.perf_counter()
        res = train_grokking(cfg, out / "run", progress=progress)
        test = dataset_tensors(res.test_data)
        k = n_queries or 16
        return Study(study, config, res.trajectory, {n: v[:k] for n, v in test.items()}, metric, -1,
                     time.perf_counter() - t0, evaluation=test)
    if study == "induction":
        from analyses.induction.pipeline import train_run
        from analyses.induction.task import get_config, make_sequences

        cfg = get_config(config)
        if steps:
            cfg = cfg.replace(steps=steps)
        traj, _, seconds = train_run(cfg, out / "run", progress=progress)
        q = make_sequences(cfg, n_queries or 16, cfg.seed + 3, repeat_fraction=1.0)
        ev = make_sequences(cfg, 256, cfg.seed + 4, repeat_fraction=1.0)
        return Study(study, config, traj, {"tokens": q["tokens"], "loss_mask": q["copy_mask"]}, metric,
                     None, seconds, evaluation={"tokens": ev["tokens"], "loss_mask": ev["copy_mask"]})
    raise ValueError(f"unknown study {study!r}; choose 'grokking' or 'induction'")


@torch.no_grad()
def query_outputs(traj: Any, params: dict, queries: dict, metric: str, position: Any) -> torch.Tensor:
    """``[Q]`` metric values of the model with ``params`` (float64)."""
    from explaind_tl.metrics import resolve_metric

    fn, _ = resolve_metric(metric, position)
    model = traj.model(0).double()
    named = dict(model.named_parameters())
    for k, v in params.items():
        named[k].copy_(v)
    v = fn(model(queries["tokens"]), queries)
    return v.reshape(v.shape[0], -1).sum(1)


def run_faithfulness(
    study: str, config: str, out: str | Path, *, subsets: int = 64, drops: tuple[float, ...] = (0.5, 0.05),
    methods: tuple[str, ...] = METHODS, n_queries: int | None = None, steps: int | None = None, seed: int = 0,
    progress: bool = True, ablation: bool = True, pruning: bool = True, datamodel: int = 0, metric: str | None = None,
) -> dict:
    """Record, score, retrain and measure (see the module docstring), every method and the
    retrained models read with ``metric`` (:data:`STUDY_METRICS`; ``None``: the study's default,
    the correct token's log-prob); with ``ablation``, also
    the head-ablation curves of :mod:`.ablation`; with ``pruning``, the parameter-pruning curves
    of :mod:`.pruning`; with ``datamodel`` > 0, the linear-datamodel ceiling fitted on that many
    more retrainings per drop fraction. Returns the JSON written."""
    from tqdm.auto import tqdm

    from explaind_tl.run.retrain import retrain

    out = Path(out)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or subsets < 3 or not drops:
        raise ValueError(f"methods from {METHODS}, subsets >= 3 and at least one drop fraction (got {methods}, {subsets}, {drops})")
    if isinstance(datamodel, bool) or not isinstance(datamodel, int) or not (datamodel == 0 or datamodel >= 3):
        raise ValueError(f"datamodel must be 0 (off) or an int >= 3 retrainings, got {datamodel!r}")
    if study not in STUDY_METRICS:
        raise ValueError(f"unknown study {study!r}; choose from {sorted(STUDY_METRICS)}")
    if metric is not None and metric not in STUDY_METRICS[study]:
        raise ValueError(f"metric for the {study} study must be one of {STUDY_METRICS[study]}, got {metric!r}")
    out.mkdir(parents=True, exist_ok=True)
    st = prepare_study(study, config, out, n_queries, steps, progress, metric)
    traj = st.trajectory
    timings: dict[str, float] = {"train": st.train_seconds}
    method_scores = {}
    for m in methods:
        t0 = time.perf_counter()
        method_scores[m] = scores(m, traj, st.queries, st.metric, st.position)
        timings[f"score_{m}"] = time.perf_counter() - t0
    by_fraction: dict[str, dict] = {}
    t0 = time.perf_counter()
    def outputs(keep: torch.Tensor, desc: str) -> torch.Tensor:
        return torch.stack([
            query_outputs(traj, retrain(traj, keep[r]), st.queries, st.metric, st.position)
            for r in tqdm(range(len(keep)), desc=desc, disable=not progress)
        ])

    fit_seconds = 0.0
    for j, drop in enumerate(drops):
        keep = random_subsets(traj.num_train, subsets, drop, seed + 1000 * j)
        actual = outputs(keep, f"retrain (drop {drop:g})")
        by_fraction[f"{drop:g}"] = {m: {**lds(method_scores[m], keep, actual, seed=seed), "drop_fraction": drop}
                                    for m in methods}
        if datamodel:
            t1 = time.perf_counter()
            keep_fit = random_subsets(traj.num_train, datamodel, drop, seed + 1000 * j + 500)
            theta = fit_datamodel(keep_fit, outputs(keep_fit, f"datamodel fit (drop {drop:g})"))
            by_fraction[f"{drop:g}"]["datamodel"] = {**lds(theta, keep, actual, seed=seed), "drop_fraction": drop,
                                                     "n_fit": datamodel}
            fit_seconds += time.perf_counter() - t1
    timings["retrain"] = time.perf_counter() - t0 - fit_seconds
    if datamodel:
        timings["datamodel"] = fit_seconds
    ablation_block = None
    if ablation:
        from .ablation import run_ablation

        t0 = time.perf_counter()
        ablation_block = run_ablation(traj, st.queries, st.metric, st.position)
        timings["ablation"] = time.perf_counter() - t0
    pruning_block = None
    if pruning:
        from .pruning import run_pruning

        t0 = time.perf_counter()
        pruning_block = run_pruning(traj, st.queries, st.evaluation or st.queries, st.metric, st.position)
        timings["pruning"] = time.perf_counter() - t0
    first = f"{drops[0]:g}" if 0.5 not in drops else "0.5"
    result = {
        "study": study, "config": config, "num_steps": traj.num_steps, "num_train": traj.num_train,
        "metric": st.metric, "n_queries": len(st.queries["tokens"]), "subsets": subsets,
        "lds": by_fraction[first], "lds_by_fraction": by_fraction, "seconds": timings,
    }
    if ablation_block is not None:
        result["ablation"] = ablation_block
    if pruning_block is not None:
        result["pruning"] = pruning_block
    (out / "faithfulness.json").write_text(json.dumps(result, indent=2))
    from .report import write_report

    write_report(out, result)
    return result
