"""``report.md`` and the LDS figure of a faithfulness directory."""

from __future__ import annotations

from pathlib import Path

NAMES = {"explaind_tl": "ExPLAIND train axis", "tracin": "TracIn (every step)", "grad_dot": "final gradient dot",
         "metagradient": "exact metagradient", "datamodel": "linear datamodel (ceiling)"}


def compare(a: dict, b: dict) -> str:
    """``"wins"``, ``"loses"`` or ``"ties"`` (95% intervals overlap) of LDS block ``a`` against ``b``."""
    (alo, ahi), (blo, bhi) = a["ci95"], b["ci95"]
    if alo > bhi:
        return "wins"
    if ahi < blo:
        return "loses"
    return "ties"


def _figure(out: Path, result: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fracs = list(result["lds_by_fraction"])
    methods = list(result["lds_by_fraction"][fracs[0]])
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=100)
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(fracs))]
        blocks = [result["lds_by_fraction"][f][m] for f in fracs]
        means = [b["mean"] for b in blocks]
        err = [[b["mean"] - b["ci95"][0] for b in blocks], [b["ci95"][1] - b["mean"] for b in blocks]]
        ax.bar(xs, means, width, yerr=err, capsize=3, label=NAMES.get(m, m))
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(fracs))], [f"drop {f}" for f in fracs])
    ax.set(ylabel="LDS (mean Spearman over queries)", title=f"{result['study']} ({result['config']}): LDS, 95% intervals")
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lds.png")
    plt.close(fig)
    return "lds.png"


ABLATION_NAMES = {"explaind_tl": "ExPLAIND (abs. attribution over the run)", "attribution_patching": "attribution patching",
                  "weight_norm": "weight norm", "random": "random (mean of seeds)"}


def _ablation(out: Path, block: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for ax, mode in zip(axes, ("zero", "mean")):
        for name, b in block.items():
            ax.plot(b["k"], b[mode], marker="o", ms=3, label=ABLATION_NAMES.get(name, name))
        ax.set(title=f"{mode}-ablating the top-k units", xlabel="k", ylabel="query metric (mean)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ablation.png")
    plt.close(fig)
    n_units = len(block["random"]["k"]) - 1
    lines = ["## Component ablation", "",
             f"The top-k of the model's {n_units} units (attention heads through `hook_z`, MLP neurons through "
             "`hook_post`, the token and positional embeddings) in each ranking's order, ablated in the final model; "
             "score: mean fall of the query metric over k = 1..K (higher: the ranking finds what the output "
             "depends on).", "", "| ranking | zero-ablation fall | mean-ablation fall | first in order |", "|---|---|---|---|"]
    for name, b in block.items():
        first = b.get("order", [])
        shown = " ".join(first[:8]) + (" ..." if len(first) > 8 else "")
        lines.append(f"| {ABLATION_NAMES.get(name, name)} | {b['area_zero']:.4f} | {b['area_mean']:.4f} | "
                     f"{shown or '-'} |")
    best = {m: max(block, key=lambda n: block[n][f"area_{m}"]) for m in ("zero", "mean")}
    lines += ["", f"Largest fall: {ABLATION_NAMES.get(best['zero'], best['zero'])} (zero-ablation), "
              f"{ABLATION_NAMES.get(best['mean'], best['mean'])} (mean-ablation).", "", "![ablation.png](ablation.png)", ""]
    return lines


PRUNING_NAMES = {"explaind_tl": "ExPLAIND (per-weight attribution, abs. summed over queries)", "magnitude": "magnitude",
                 "random": "random (mean of seeds)"}


def _pruning(out: Path, block: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in PRUNING_NAMES if n in block]
    fr = block["fractions"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for ax, key in zip(axes, ("accuracy", "agreement")):
        for name in names:
            ax.plot(fr, block[name][key], marker="o", ms=3, label=PRUNING_NAMES[name])
        ax.set(xscale="log", xlabel="fraction of weights pruned", ylabel=key,
               title=f"{key} after pruning the lowest-ranked weights")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pruning.png")
    plt.close(fig)
    lines = ["## Parameter pruning", "",
             f"The lowest-ranked fraction of the {block['n_params']:,} trainable weights set to 0 in the final model; "
             f"accuracy and agreement with the unpruned model over {block['n_predictions']:,} held-out predictions "
             f"(unpruned accuracy {block['unpruned']['accuracy']:.3f}).", "",
             "| fraction pruned | " + " | ".join(f"{PRUNING_NAMES[n]}: accuracy / agreement" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for i, f in enumerate(fr):
        lines.append(f"| {f:g} | " + " | ".join(f"{block[n]['accuracy'][i]:.3f} / {block[n]['agreement'][i]:.3f}"
                                               for n in names) + " |")
    mean_agree = {n: sum(block[n]["agreement"]) / len(fr) for n in names}
    best = max(mean_agree, key=mean_agree.get)
    lines += ["", "Mean agreement over the fractions: " + ", ".join(f"{PRUNING_NAMES[n]} {mean_agree[n]:.3f}" for n in names)
              + f"; highest: {PRUNING_NAMES[best]}.", "", "![pruning.png](pruning.png)", ""]
    return lines


def write_report(out: str | Path, result: dict) -> Path:
    out = Path(out)
    fig = _figure(out, result)
    s = result["seconds"]
    lines = [
        f"# Faithfulness: {result['study']} ({result['config']} config)", "",
        f"Linear datamodeling score of the training-example scores: {result['subsets']} random subsets per drop "
        f"fraction, each retrained from the same initialisation with the recorded batches minus the left-out "
        f"examples ({result['num_steps']} steps, {result['num_train']} training examples); metric "
        f"`{result['metric']}` on {result['n_queries']} held-out queries. Spearman correlation per query of the "
        "predicted (sum of the kept examples' scores) with the retrained output; mean over queries and a "
        "bootstrap 95% interval over queries.", "",
        "| drop fraction | method | LDS | 95% interval |", "|---|---|---|---|",
    ]
    for f, block in result["lds_by_fraction"].items():
        for m, b in block.items():
            lines.append(f"| {f} | {NAMES.get(m, m)} | {b['mean']:.3f} | [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] |")
    lines += ["", f"![{fig}]({fig})", ""]
    ceilings = [(f, block["datamodel"]) for f, block in result["lds_by_fraction"].items() if "datamodel" in block]
    if ceilings:
        lines += ["**Ceiling.** The linear datamodel is fitted to retrainings of other random subsets (" + ", ".join(
            f"{b['n_fit']} at drop {f}" for f, b in ceilings) + ", for "
            f"{result['num_train']} training examples) and scored on the same subsets as the methods: the best "
            "a score that sums per-example contributions does here, " + ", ".join(
            f"{b['mean']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] at drop {f}" for f, b in ceilings)
            + ". Where it is low, the retrained outputs are not additive in the examples left out, and no "
            "such score can predict them.", ""]
    verdicts = []
    for f, block in result["lds_by_fraction"].items():
        if "explaind_tl" not in block:
            continue
        for m, b in block.items():
            if m not in ("explaind_tl", "datamodel"):
                verdicts.append(f"at drop {f} it {compare(block['explaind_tl'], b)} against {NAMES.get(m, m)} "
                                f"({block['explaind_tl']['mean']:.3f} vs {b['mean']:.3f})")
    if verdicts:
        lines += ["**Where ExPLAIND's train axis stands** (\"ties\" when the 95% intervals overlap): "
                  + "; ".join(verdicts) + ".", ""]
    meta_verdicts = [
        f"at drop {f} it {compare(block['metagradient'], b)} against {NAMES.get(m, m)} "
        f"({block['metagradient']['mean']:.3f} vs {b['mean']:.3f})"
        for f, block in result["lds_by_fraction"].items() if "metagradient" in block
        for m, b in block.items() if m not in ("metagradient", "explaind_tl", "datamodel")
    ]
    if meta_verdicts:
        lines += ["**Where the exact metagradient stands** (the derivative of the final output with respect to a "
                  "weight on each example's loss, through every recorded step): " + "; ".join(meta_verdicts) + ".", ""]
    if "ablation" in result:
        lines += _ablation(out, result["ablation"])
    if "pruning" in result:
        lines += _pruning(out, result["pruning"])
    lines += [f"Time: training {s['train']:.1f} s; " + ", ".join(
        f"{k[6:]} scores {v:.1f} s" for k, v in s.items() if k.startswith("score_")) + f"; retraining {s['retrain']:.1f} s"
        + "".join(f"; {k} {s[k]:.1f} s" for k in ("datamodel", "ablation", "pruning") if k in s) + ".", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
