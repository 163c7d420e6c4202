"""The induction study end to end: generate, train with the recorder, measure, explain, save.

:func:`run_study` writes into ``out_dir``:

* ``run/`` — the recorded trajectory; ``metrics.csv`` — per logged step: the training loss,
  held-out losses (all, repeat, bigram, copied tokens), the ICL score, and each head's
  previous-token and induction scores;
* ``attr_logprob.safetensors`` — step x head x source attribution of the mean in-context
  log-prob (the copied tokens of held-out repeat sequences, ``metric="next_token_logprob"``
  with their ``loss_mask``) over the whole run; ``attr_icl.safetensors`` — the same for the ICL score
  (late minus early loss on held-out mixture sequences; a callable metric);
* ``attr_train.safetensors`` — training sequence x head attribution of the in-context log-prob
  over the phase-change window (the seen clock: each sequence's batches in the window);
* ``top_tokens.csv`` — the training tokens (sequence, predicted position) whose loss terms moved
  the in-context log-prob most through the best induction head in the window
  (``by=("component", "train", "train_position")`` with that head against the rest);
* ``summary.json`` and ``report.md`` with figures (:mod:`analyses.induction.report`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .scores import head_scores, icl_score, icl_slices, repeated_random, token_losses
from .task import InductionConfig, make_sequences

__all__ = ["icl_metric", "phase_change_window", "run_study", "train_run"]


def icl_metric(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per query: mean next-token loss at the late predictions minus at the early ones (the ICL
    score of Olsson et al., per sequence; negative when the context helps)."""
    early, late = icl_slices(logits.shape[1])
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -lp.gather(2, batch["tokens"][:, 1:].unsqueeze(-1))[..., 0]
    return nll[:, late].mean(1) - nll[:, early].mean(1)


def phase_change_window(steps: list[int], copy_loss: list[float], width: int, num_steps: int) -> tuple[int, int]:
    """``[a, b)`` of ``width`` steps centred on the steepest fall of the copied-token loss
    between consecutive logged steps (clipped to the run)."""
    if len(steps) < 2:
        return 0, min(width, num_steps)
    drops = [(copy_loss[i] - copy_loss[i + 1]) / max(steps[i + 1] - steps[i], 1) for i in range(len(steps) - 1)]
    i = max(range(len(drops)), key=lambda k: drops[k])
    mid = (steps[i] + steps[i + 1]) // 2
    a = max(0, min(mid - width // 2, num_steps - width))
    return a, min(num_steps, a + width)


def head_vs_rest(model, label: str):
    """A two-component map: head ``label`` (``"L1H3"``) against every other coordinate (from the
    model's head partition, so a ``HookedTransformer`` and a ``TransformerBridge`` alike)."""
    from explaind_tl import ComponentMap

    heads = ComponentMap.from_model(model, "head")
    c = heads.labels.index(label)
    return ComponentMap(["rest", label], {n: (heads.index[n] == c).long() for n in heads.param_names},
                        param_names=heads.param_names)


def top_tokens(attr, label: str, train_set: dict, k: int) -> list[dict[str, Any]]:
    """The ``k`` (sequence, predicted position) cells with the largest |entry| for ``label``."""
    one = attr.sel(component=label)
    ids = [t for t in one.coords["train"] if isinstance(t, int)]
    pos = [p for p in one.coords["train_position"] if isinstance(p, int)]
    v = one.sel(train=ids, train_position=pos).values  # [N, T-1]
    flat = torch.argsort(v.abs().flatten(), descending=True)[:k]
    rows = []
    for f in flat.tolist():
        i, j = divmod(f, v.shape[1])
        rows.append({"sequence": ids[i], "position": pos[j], "value": float(v[i, j]),
                     "repeat": bool(train_set["is_repeat"][ids[i]]),
                     "copied_token": bool(train_set["copy_mask"][ids[i], pos[j]])})
    return rows


def _log_row(model, step: int, ev: dict, rep: torch.Tensor, early: slice, late: slice) -> dict[str, float]:
    was = model.training
    model.eval()
    tl = token_losses(model, ev["tokens"])
    scores = head_scores(model, ev["tokens"], rep)
    model.train(was)
    rows = ev["is_repeat"]
    row = {
        "step": step,
        "eval_loss": float(tl.mean()),
        "repeat_loss": float(tl[rows].mean()) if rows.any() else float("nan"),
        "bigram_loss": float(tl[~rows].mean()) if (~rows).any() else float("nan"),
        "copy_loss": float(tl[ev["copy_mask"][:, 1:]].mean()),
        "icl_score": icl_score(tl, early, late),
    }
    L, H = scores["induction"].shape
    for layer in range(L):
        for h in range(H):
            row[f"prev_L{layer}H{h}"] = float(scores["previous_token"][layer, h])
            row[f"ind_L{layer}H{h}"] = float(scores["induction"][layer, h])
    return row


def train_run(cfg: InductionConfig, run_dir: Path, data: dict | None = None, model: Any = None, opt: Any = None, *,
              progress: bool = True, callback: Any = None) -> tuple[Any, dict, float]:
    """Record ``cfg``'s training run into ``run_dir``: ``(trajectory, training set, seconds)``
    (the seconds include ``callback``'s evaluations)."""
    from explaind_tl import train
    from explaind_tl.losses import next_token_cross_entropy

    data = make_sequences(cfg, cfg.n_train, cfg.seed) if data is None else data
    model = cfg.make_model() if model is None else model
    opt = cfg.make_optimizer(model) if opt is None else opt
    train_set = dict(data)  # tokens, copy_mask, is_repeat, copy_len (the loss reads the tokens)
    t0 = time.perf_counter()
    traj = train(model, opt, train_set, next_token_cross_entropy, steps=cfg.steps, batch_size=cfg.batch_size,
                 seed=cfg.seed, run_dir=run_dir, checkpoint_every=cfg.checkpoint_every, callback=callback,
                 callback_every=cfg.log_every, progress=progress, overwrite=True)
    return traj, train_set, time.perf_counter() - t0


def run_study(cfg: InductionConfig, out_dir: str | Path, *, progress: bool = True, explain: bool = True) -> dict[str, Any]:
    """Train ``cfg`` with the recorder, measure, explain, and write the report (see module doc)."""
    import pandas as pd

    from explaind_tl import explain as explain_run

    from .report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = make_sequences(cfg, cfg.n_train, cfg.seed)
    ev = make_sequences(cfg, cfg.n_eval, cfg.seed + 1)
    rep = repeated_random(cfg.n_eval, cfg.n_ctx // 2, cfg.d_vocab, cfg.seed + 2)
    queries = make_sequences(cfg, cfg.n_queries, cfg.seed + 3, repeat_fraction=1.0)
    early, late = icl_slices(cfg.n_ctx)
    gen_s = time.perf_counter() - t0

    model = cfg.make_model()
    opt = cfg.make_optimizer(model)
    rows = [_log_row(model, 0, ev, rep, early, late)]
    eval_s = 0.0

    def log(step: int, m: torch.nn.Module) -> dict[str, float]:
        nonlocal eval_s
        t = time.perf_counter()
        rows.append(_log_row(m, step, ev, rep, early, late))
        eval_s += time.perf_counter() - t
        return {"copy_loss": rows[-1]["copy_loss"], "icl": rows[-1]["icl_score"]}

    traj, train_set, train_s = train_run(cfg, out / "run", data, model, opt, progress=progress, callback=log)
    train_s -= eval_s
    metrics = pd.DataFrame(rows)
    metrics.to_csv(out / "metrics.csv", index=False)
    window = phase_change_window(metrics["step"].tolist(), metrics["copy_loss"].tolist(), cfg.window_steps,
                                 traj.num_steps)
    summary: dict[str, Any] = {
        "config": {k: v for k, v in cfg.__dict__.items()},
        "num_steps": traj.num_steps, "generate_seconds": gen_s, "train_seconds": train_s, "eval_seconds": eval_s,
        "window": list(window), "explained": explain,
    }
    if explain:
        q = {"tokens": queries["tokens"], "loss_mask": queries["copy_mask"]}
        icl_q = {"tokens": ev["tokens"][: cfg.n_queries]}
        head = dict(components="head", reduce="mean", progress=progress)
        calls = {
            "logprob": lambda: explain_run(traj, q, metric="next_token_logprob", by=("step", "component", "source"),
                                           **head),
            "icl": lambda: explain_run(traj, icl_q, metric=icl_metric, by=("step", "component"), **head),
            "train": lambda: explain_run(traj, q, metric="next_token_logprob", by=("train", "component"),
                                         steps=window, **head),
        }
        best = max((c for c in metrics.columns if c.startswith("ind_L")), key=lambda c: metrics.iloc[-1][c])[4:]
        cmap = head_vs_rest(traj.model(0), best)
        calls["train_tokens"] = lambda: explain_run(
            traj, q, metric="next_token_logprob", by=("component", "train", "train_position"), steps=window,
            **{**head, "components": cmap})
        summary["explain"] = {}
        for name, call in calls.items():
            t = time.perf_counter()
            attr = call()
            seconds = time.perf_counter() - t
            if name == "train_tokens":  # N_train x n_ctx entries: the top ones only
                summary["top_tokens_head"] = best
                pd.DataFrame(top_tokens(attr, best, train_set, cfg.top_k)).to_csv(out / "top_tokens.csv", index=False)
            else:
                attr.save(out / f"attr_{name}.safetensors")
            c = attr.completeness
            summary["explain"][name] = {
                "seconds": seconds, "ratio_to_training": seconds / max(train_s, 1e-9), "certificate_ok": c.ok,
                "total": float(attr.values.sum()), "measured": float(c.measured.sum()),
                "residual": float((c.measured - c.attributed).abs().sum()), "forward": attr.meta.get("forward"),
            }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_report(out, summary, metrics, train_set)
    return summary
