"""``report.md`` and figures of an induction study directory (:mod:`analyses.induction.pipeline`).

Everything here reads what the pipeline saved (``summary.json``, ``metrics.csv``, the
attributions) and states what was measured; nothing is asserted that the numbers do not show.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch


def _spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (ties: mean ranks, :mod:`analyses.faithfulness.lds`); NaN for
    fewer than 3 points."""
    from analyses.faithfulness.lds import spearman_per_column

    if len(x) < 3:
        return float("nan")
    col = lambda v: torch.tensor(v, dtype=torch.float64)[:, None]  # noqa: E731
    return float(spearman_per_column(col(x), col(y))[0])


def head_table(attr, metrics, window: tuple[int, int]) -> list[dict[str, Any]]:
    """Per head: attribution of the in-context log-prob in the window and over the run, and the
    final previous-token and induction scores; sorted by |window attribution|."""
    attr = attr.keep("component", "step")
    heads = [c for c in attr.coords["component"] if c.startswith("L") and "H" in c and "." not in c]
    steps = list(attr.coords["step"])
    in_win = [s for s in steps if window[0] <= s < window[1]]
    last = metrics.iloc[-1]
    rows = []
    for h in heads:
        one = attr.sel(component=h)
        rows.append({
            "head": h,
            "window": float(one.sel(step=in_win).values.sum()) if in_win else 0.0,
            "run": float(one.values.sum()),
            "previous_token": float(last[f"prev_{h}"]),
            "induction": float(last[f"ind_{h}"]),
        })
    return sorted(rows, key=lambda r: -abs(r["window"]))


def _figures(out: Path, metrics, attr) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from explaind_tl.plotting import plot_component_heatmap

    names = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    s = metrics["step"]
    for col in ("eval_loss", "repeat_loss", "bigram_loss", "copy_loss"):
        axes[0].plot(s, metrics[col], label=col)
    axes[0].set(title="held-out losses", xlabel="step")
    axes[0].legend()
    axes[1].plot(s, metrics["icl_score"])
    axes[1].set(title="ICL score (late minus early loss)", xlabel="step")
    for col in [c for c in metrics.columns if c.startswith("ind_L")]:
        axes[2].plot(s, metrics[col], label=col[4:])
    for col in [c for c in metrics.columns if c.startswith("prev_L0")]:
        axes[2].plot(s, metrics[col], "--", label="prev " + col[5:])
    axes[2].set(title="induction (solid) and previous-token (dashed) scores", xlabel="step")
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "curves.png")
    plt.close(fig)
    names.append("curves.png")
    if attr is not None:
        attr = attr.keep("component", "step")
        heads = [c for c in attr.coords["component"] if "H" in c and "." not in c]
        plot_component_heatmap(attr.sel(component=heads), out / "heatmap_logprob.png",
                               title="in-context log-prob: attribution per head and step")
        names.append("heatmap_logprob.png")
        cum = attr.sel(component=heads).cumsum("step")
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for h in heads:
            ax.plot(cum.coords["step"], cum.sel(component=h).values.numpy(), label=h)
        ax.set(title="cumulative attribution of the in-context log-prob", xlabel="step")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "cumulative_logprob.png")
        plt.close(fig)
        names.append("cumulative_logprob.png")
    return names


def write_report(out: str | Path, summary: dict, metrics, train_set: dict) -> Path:
    """Write ``report.md`` (and its figures) into ``out``; returns its path."""
    from explaind_tl import Attribution

    out = Path(out)
    cfg = summary["config"]
    window = tuple(summary["window"])
    lp = Attribution.load(out / "attr_logprob.safetensors") if (out / "attr_logprob.safetensors").exists() else None
    lines = [
        f"# Induction heads with ExPLAIND ({cfg['name']} config)",
        "",
        f"A {cfg['n_layers']}-layer attention-only transformer with LayerNorm (d_model {cfg['d_model']}, "
        f"{cfg['n_heads']} heads, context {cfg['n_ctx']}, vocabulary {cfg['d_vocab']}) trained for "
        f"{summary['num_steps']} AdamW steps (lr {cfg['lr']}, batch {cfg['batch_size']}) on {cfg['n_train']:,} "
        f"generated sequences, {cfg['repeat_fraction']:.0%} of them with a random segment of {cfg['seg_min']}-"
        f"{cfg['seg_max']} tokens copied to a random later offset, the rest from a fixed bigram model.",
        "",
        f"Training: {summary['train_seconds']:.1f} s ({1e3 * summary['train_seconds'] / max(summary['num_steps'], 1):.1f} "
        f"ms/step, recorded); data generation {summary['generate_seconds']:.1f} s; evaluations "
        f"{summary['eval_seconds']:.1f} s.",
        "",
    ]
    first, last = metrics.iloc[0], metrics.iloc[-1]
    ind_cols = [c for c in metrics.columns if c.startswith("ind_L")]
    prev_cols = [c for c in metrics.columns if c.startswith("prev_L")]
    best_ind = max(ind_cols, key=lambda c: last[c])
    best_prev = max(prev_cols, key=lambda c: last[c])
    lines += [
        "## Progress measures", "",
        "| | step 0 | last step |", "|---|---|---|",
        f"| loss on copied tokens | {first['copy_loss']:.3f} | {last['copy_loss']:.3f} |",
        f"| ICL score (late minus early loss) | {first['icl_score']:.3f} | {last['icl_score']:.3f} |",
        f"| best induction score ({best_ind[4:]}) | {first[best_ind]:.2f} | {last[best_ind]:.2f} |",
        f"| best previous-token score ({best_prev[5:]}) | {first[best_prev]:.2f} | {last[best_prev]:.2f} |",
        "",
        f"Phase-change window (the steepest fall of the copied-token loss between logged steps, "
        f"{cfg['window_steps']} steps wide): steps {window[0]}..{window[1] - 1}.",
        "",
    ]
    figs = _figures(out, metrics, lp)
    lines += [f"![{f}]({f})" for f in figs] + [""]
    if summary.get("explain"):
        lines += ["## ExPLAIND", "", "| attribution | time | / training | certificate | total | measured change |",
                  "|---|---|---|---|---|---|"]
        for name, e in summary["explain"].items():
            lines.append(f"| {name} | {e['seconds']:.1f} s | {e['ratio_to_training']:.2f}x | "
                         f"{'ok' if e['certificate_ok'] else 'FAILED'} | {e['total']:.4g} | {e['measured']:.4g} |")
        lines += ["", "`logprob`: mean log-prob of the copied tokens of held-out repeat sequences per step x "
                  "head x source; `icl`: the ICL score per step x head; `train`: the log-prob per training "
                  "sequence x head, over the phase-change window; `train_tokens`: the same per training token, "
                  "for the best induction head against the rest.", ""]
        rows = head_table(lp, metrics, window)
        lines += ["### Heads: attribution against the progress measures", "",
                  "| head | window attribution | whole-run attribution | previous-token score | induction score |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['head']} | {r['window']:+.4f} | {r['run']:+.4f} | {r['previous_token']:.2f} | "
                  f"{r['induction']:.2f} |" for r in rows]
        rho_ind = _spearman([abs(r["window"]) for r in rows], [r["induction"] for r in rows])
        rho_prev = _spearman([abs(r["window"]) for r in rows], [r["previous_token"] for r in rows])
        lines += ["", f"Spearman correlation of |window attribution| with the final induction score: "
                  f"{rho_ind:.2f}; with the previous-token score: {rho_prev:.2f} (over {len(rows)} heads).", ""]
        if "source" in lp.dims:
            lines += _sources(lp, [r["head"] for r in rows], window)
        head = summary.get("top_tokens_head") or rows[0]["head"]
        lines += _top_sequences(out, head, train_set, cfg["top_k"])
        lines += _top_tokens(out, head, train_set)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def _sources(attr, heads: list[str], window: tuple[int, int]) -> list[str]:
    """Per head, the window's attribution split by the source of the updates."""
    in_win = [s for s in attr.coords["step"] if window[0] <= s < window[1]]
    if not in_win:
        return []
    win = attr.sel(step=in_win).keep("component", "source")
    sources = list(win.coords["source"])
    lines = ["### Where the window's attribution comes from", "",
             "Per head, the in-context log-prob change of the window's steps split by the piece of the AdamW "
             "updates it came from (`data`: training-batch gradients, of any earlier step too, carried by "
             "momentum; `history`: momentum from before the explained range, which is the whole run here, "
             "so none; `weight_decay`; `update_residual`: floating-point gap of the update's reconstruction).", "", "| head | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for h in heads:
        vals = win.sel(component=h).values
        lines.append(f"| {h} | " + " | ".join(f"{float(v):+.4f}" for v in vals) + " |")
    return lines + [""]


def _top_tokens(out: Path, head: str, train_set: dict) -> list[str]:
    import pandas as pd

    path = out / "top_tokens.csv"
    if not path.exists():
        return []
    top = pd.read_csv(path)
    base = float(train_set["copy_mask"][:, 1:].double().mean())
    frac = float(top["copied_token"].mean()) if len(top) else math.nan
    lines = [f"### Training tokens that moved {head} in the window", "",
             f"Each training sequence's loss is a mean over its predicted tokens, so its entry splits exactly by "
             f"token (`by=(\"component\", \"train\", \"train_position\")`, {head} against the rest of the "
             f"model). The {len(top)} (sequence, token) terms with the largest |attribution|: {frac:.0%} of them "
             f"predict a copied token that induction can predict, against {base:.0%} of all predicted tokens.",
             "", "| sequence | predicted token | attribution | repeat sequence | copied token |", "|---|---|---|---|---|"]
    for r in top.itertuples():
        lines.append(f"| {r.sequence} | {r.position} | {r.value:+.3g} | {bool(r.repeat)} | {bool(r.copied_token)} |")
    return lines + [""]


def _top_sequences(out: Path, head: str, train_set: dict, k: int) -> list[str]:
    from explaind_tl import Attribution

    path = out / "attr_train.safetensors"
    if not path.exists():
        return []
    attr = Attribution.load(path).sel(component=head)
    labels = [t for t in attr.coords["train"] if isinstance(t, int)]
    vals = attr.sel(train=labels).values
    order = torch.argsort(vals.abs(), descending=True)[:k]
    rep = train_set["is_repeat"]
    seen = [labels[i] for i in range(len(labels)) if vals[i] != 0]
    base = float(rep[seen].double().mean()) if seen else math.nan
    top = [labels[int(i)] for i in order]
    frac = float(rep[top].double().mean()) if top else math.nan
    lines = [f"### Training sequences that moved {head} in the window", "",
             f"The {len(top)} sequences with the largest |attribution| to the in-context log-prob through {head}; "
             f"{frac:.0%} of them are repeat sequences, against {base:.0%} of the {len(seen)} sequences seen in "
             "the window.", "", "| sequence | attribution | repeat | copy length |", "|---|---|---|---|"]
    for i in order.tolist():
        j = labels[i]
        lines.append(f"| {j} | {float(vals[i]):+.3g} | {bool(rep[j])} | {int(train_set['copy_len'][j])} |")
    return lines + [""]
