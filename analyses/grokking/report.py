"""``report.md`` for a grokking study directory: figures, the component story and a claims table.

Everything is read back from the files :func:`analyses.grokking.pipeline.run_study` wrote, so
the report can be regenerated without recomputing (``explaind-tl report DIR``). Missing pieces
(e.g. a ``--no-explain`` run) give "not run" rows rather than errors.

Each claim is one the grokking literature makes (Power et al. 2022; Nanda et al. 2023; the
ExPLAIND paper, Eichin et al. 2025), with the rule that decides it and the measured number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .claims import (
    ALIGN_BOOT,
    ALIGN_Z,
    EXACT_TOL,
    RESTRICTED_DROP,
    SWAP_ACC,
    WD_MIN_SHARE,
    Claim,
    bootstrap_alignment_change,
    count_verdicts,
    rule_alignment_grows,
    rule_exact,
    rule_excluded_loss_rises,
    rule_grokking,
    rule_outer_layers_dominate,
    rule_restricted_loss_falls,
    rule_swap,
    rule_weight_decay_drives_cleanup,
    rule_weight_norm,
    verdict,
    verdict_line,
    weight_decay_share,
)

__all__ = ["Claim", "evaluate_claims", "write_report"]

PHASE_COLORS = {
    "memorisation": "#f4cccc",
    "circuit_formation": "#fff2cc",
    "cleanup": "#d9ead3",
    "post_grokking": "#cfe2f3",
}


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _read(out: Path) -> dict[str, Any]:
    import pandas as pd

    d: dict[str, Any] = {}
    for name in (
        "metrics",
        "progress_measures",
        "swap",
        "components_test",
        "components_train",
        "phase_shares_test",
        "phase_shares_train",
        "alignment",
    ):
        f = out / f"{name}.csv"
        d[name] = pd.read_csv(f) if f.exists() else None
    for name in ("config", "phases", "timings"):
        f = out / f"{name}.json"
        d[name] = json.loads(f.read_text()) if f.exists() else {}
    d["attr"] = {}
    from explaind_tl.attribution import Attribution

    for f in sorted((out / "attributions").glob("*.safetensors")) if (out / "attributions").exists() else []:
        d["attr"][f.stem] = Attribution.load(f)
    return d


def _phases_obj(d: dict[str, Any]):
    from .phases import Phases

    p = d["phases"].get("phases", {})
    if not p:
        return None
    return Phases(
        p["memorisation_end"],
        p["cleanup_start"],
        p["generalisation"],
        p["end"],
        p["test_acc_plateau"],
        p.get("threshold", 0.99),
    )


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def _shade(ax, phases) -> None:
    if phases is None:
        return
    for name, (a, b) in phases.intervals().items():
        ax.axvspan(a, b, color=PHASE_COLORS.get(name, "#eeeeee"), alpha=0.5, lw=0)


def _figures(out: Path, d: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from explaind_tl import plotting

    figs: dict[str, str] = {}
    fdir = out / "figures"
    fdir.mkdir(exist_ok=True)
    phases = _phases_obj(d)
    m = d["metrics"]

    def save(fig, name: str, caption: str) -> None:
        if fig.get_layout_engine() is None:
            fig.tight_layout()
        fig.savefig(fdir / f"{name}.png", dpi=100)
        plt.close(fig)
        figs[name] = caption

    if m is not None:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for ax in (ax1, ax2):
            _shade(ax, phases)
        ax1.plot(m["step"], m["train_acc"], label="train")
        ax1.plot(m["step"], m["test_acc"], label="test")
        ax1.set(xlabel="step", ylabel="accuracy", title="accuracy (phases shaded)")
        ax1.legend()
        ax2.semilogy(m["step"], m["train_loss"], label="train")
        ax2.semilogy(m["step"], m["test_loss"], label="test")
        ax2.set(xlabel="step", ylabel="cross-entropy", title="loss")
        ax2.legend()
        save(fig, "curves", "Train/test accuracy and loss; shading: memorisation (red), circuit "
             "formation (yellow), cleanup (green), post-grokking (blue).")

    pm = d["progress_measures"]
    if pm is not None:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for ax in (ax1, ax2):
            _shade(ax, phases)
        ax1.semilogy(pm["step"], pm["restricted_loss"], label="restricted loss (all pairs)")
        if "excluded_loss" in pm:
            ax1.semilogy(pm["step"], pm["excluded_loss"], label="excluded loss (train)")
        if m is not None:
            ax1.semilogy(m["step"], m["test_loss"], label="test loss", alpha=0.6)
        ax1.set(xlabel="step", title="Nanda et al. progress measures")
        ax1.legend(fontsize=8)
        ax2.plot(pm["step"], pm["weight_norm"], color="k")
        ax2.set(xlabel="step", ylabel="total weight norm", title="weight norm")
        save(fig, "progress_measures", "Restricted loss (logits restricted to the key Fourier "
             "frequencies), excluded loss (key frequencies removed, training pairs) and total "
             "weight norm at the checkpoints.")
        fcols = [c for c in pm.columns if c.startswith("freq_")]
        if fcols:
            keys = set(d["phases"].get("key_frequencies", []))
            last = pm.iloc[-1]
            ks = [int(c.split("_")[1]) for c in fcols]
            fig, ax = plt.subplots(figsize=(9, 3))
            ax.bar(ks, [last[c] for c in fcols], color=["C3" if k in keys else "C0" for k in ks])
            ax.set(xlabel="frequency k", ylabel="norm of W_E on cos/sin k",
                   title=f"Fourier norms of the final embedding (key: {sorted(keys)})")
            save(fig, "fourier_embedding", "Norm of the final W_E on each Fourier frequency; "
                 "key frequencies in red.")

    for split in ("test", "train"):
        a = d["attr"].get(f"components_{split}")
        if a is None:
            continue
        a_cs = a.sum("source")
        fig = plotting.plot_component_heatmap(
            a_cs, title=f"influence on mean {split} log-prob per component and step bin")
        save(fig, f"heatmap_{split}", f"ExPLAIND: change of the mean {split}-set log-prob of the "
             "correct answer, per component and step bin.")
        acc = m[["step", "train_acc", "test_acc"]] if m is not None else None
        fig = plotting.plot_cumulative_influence(
            a_cs, accuracy=acc, title=f"cumulative influence on mean {split} log-prob")
        save(fig, f"cumulative_{split}", f"Cumulative ExPLAIND influence per component on the "
             f"mean {split} log-prob, with accuracy curves.")

    ct = d["components_test"]
    if ct is not None:
        fig, ax = plt.subplots(figsize=(9, 3.5))
        x = range(len(ct))
        ax.bar([i - 0.2 for i in x], ct["data"], width=0.4, label="data (gradients + momentum)")
        ax.bar([i + 0.2 for i in x], ct["weight_decay"], width=0.4, label="weight decay")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(list(x), ct["component"], rotation=30)
        ax.set(ylabel="influence on mean test log-prob", title="data vs weight decay per component (whole run)")
        ax.legend()
        save(fig, "data_vs_weight_decay", "Per component: total influence of the data (gradient) "
             "part of the updates vs the weight-decay part, on the mean test log-prob.")

    al = d["alignment"]
    if al is not None and len(al):
        piv = al.pivot_table(index="component", columns="phase", values="mean_cosine", sort=False)
        order = [p for p in PHASE_COLORS if p in piv.columns]
        piv = piv[order]
        fig, ax = plt.subplots(figsize=(9, 3.5))
        w = 0.8 / max(len(order), 1)
        for j, ph in enumerate(order):
            ax.bar([i + j * w for i in range(len(piv))], piv[ph], width=w, label=ph,
                   color=PHASE_COLORS[ph], edgecolor="k", lw=0.3)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(piv))], piv.index, rotation=30)
        ax.set(ylabel="mean pairwise cosine", title="alignment of test queries' influence vectors")
        ax.legend(fontsize=8)
        save(fig, "alignment", "Per component and phase window: mean pairwise cosine similarity "
             "of the test queries' per-step influence vectors.")

    sw = d["swap"]
    if sw is not None:
        fig, ax = plt.subplots(figsize=(9, 3.5))
        _shade(ax, phases)
        for col, lab in (("actual", "step-s model"), ("final_outer", "final embed/unembed + step-s inner"),
                         ("final_outer_mlp_out", "... + final MLP out"), ("final_inner", "step-s embed/unembed + final inner")):
            ax.plot(sw["step"], sw[col], marker=".", label=lab)
        ax.set(xlabel="step s", ylabel="test accuracy", title="swap experiment")
        ax.legend(fontsize=8)
        save(fig, "swap", "Test accuracy of hybrids of the final model and the step-s model.")
    return figs


# --------------------------------------------------------------------------------------------
# claims
# --------------------------------------------------------------------------------------------


def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)


def _first_step(df, col: str, thr: float) -> int | None:
    hit = df.loc[df[col] >= thr, "step"]
    return None if hit.empty else int(hit.iloc[0])


def _query_vectors(attr) -> Any:
    """``[Q, C * S]`` per-query influence vectors of an alignment window (components concatenated)."""
    t = attr.transpose("component", "query", "step")
    return t.values.permute(1, 0, 2).reshape(t.values.shape[1], -1)


def evaluate_claims(d: dict[str, Any]) -> list[Claim]:
    """The claims table from the loaded study files (see the module docstring).

    Every verdict comes from a rule in :mod:`.claims` applied to numbers read here.
    """
    ph = d["phases"].get("phases", {})
    ck = d["phases"].get("checks", {})
    t_mem, t_gen = ph.get("memorisation_end"), ph.get("generalisation")
    claims: list[Claim] = []

    claims.append(Claim(
        "Memorisation precedes generalisation (grokking)", "Power et al. 2022",
        "train acc >= 99% at t_mem; test acc >= 99% at t_gen; delay t_gen - t_mem > t_mem",
        f"t_mem = {_f(t_mem)}, t_gen = {_f(t_gen)}, test acc at t_mem = {_f(ph.get('test_acc_plateau'))}",
        verdict(rule_grokking(t_mem, t_gen))))

    r_mem, r_clean = ck.get("restricted_loss@mem"), ck.get("restricted_loss@clean")
    claims.append(Claim(
        "The generalising (Fourier) circuit forms before test accuracy rises", "Nanda et al. 2023",
        f"restricted loss at t_clean < {RESTRICTED_DROP:g} x restricted loss at t_mem",
        f"restricted loss {_f(r_mem)} at t_mem -> {_f(r_clean)} at t_clean (test loss at t_clean "
        f"{_f(ck.get('full_loss@clean'))}); key-frequency share of W_E {_f(ck.get('key_fourier_frac@mem'))} -> "
        f"{_f(ck.get('key_fourier_frac@clean'))}",
        verdict(rule_restricted_loss_falls(r_mem, r_clean))))

    e_mem, e_clean = ck.get("excluded_loss@mem"), ck.get("excluded_loss@clean")
    claims.append(Claim(
        "Memorising components are removed (excluded loss rises)", "Nanda et al. 2023",
        "excluded (train) loss at t_clean > at t_mem",
        f"excluded loss {_f(e_mem)} at t_mem -> {_f(e_clean)} at t_clean",
        verdict(rule_excluded_loss_rises(e_mem, e_clean))))

    slopes = ck.get("weight_norm_slope") or {}
    claims.append(Claim(
        "Weight norm falls after memorisation, fastest during circuit formation/cleanup",
        "Nanda et al. 2023",
        "weight norm at T < at t_mem, and the steepest per-step decrease is in circuit formation or cleanup",
        f"weight norm {_f(ck.get('weight_norm@mem'))} at t_mem -> {_f(ck.get('weight_norm@end'))} at T; "
        "slope per 1k steps: " + ", ".join(f"{k} {1000 * v:+.3g}" for k, v in slopes.items()),
        verdict(rule_weight_norm(ck.get("weight_norm@mem"), ck.get("weight_norm@end"), slopes))))

    wd_claim = "Weight decay drives cleanup: it raises test performance"
    wd_rule = (f"over the cleanup phase the mean test log-prob rises and the ExPLAIND weight-decay source "
               f"carries >= {WD_MIN_SHARE:.0%} of the rise (at least as much as all gradient updates together)")
    outer_claim = "The final phase aligns the outer layers: embed/unembed influence dominates late"
    ps = d["phase_shares_test"]
    if ps is not None and len(ps):
        late = ps[ps["phase"].isin(["cleanup", "post_grokking", "circuit_formation"])]
        clean = ps[ps["phase"] == "cleanup"]
        if len(clean):
            r = clean.iloc[0]
            wd, change = float(r["weight_decay"]), float(r["change"])
            ok = rule_weight_decay_drives_cleanup(wd, change)
            ev = (f"cleanup: mean test log-prob {change:+.3g}; weight decay {wd:+.3g} "
                  f"({_f(weight_decay_share(wd, change), 2)} of the change), data {r['data']:+.3g}; "
                  f"weight decay's share of abs. influence {r['wd_abs_share']:.2f}")
        else:
            ok, ev = None, "no cleanup phase"
        claims.append(Claim(wd_claim, "Nanda et al. 2023; ExPLAIND", wd_rule, ev, verdict(ok)))

        g = "share:embed/unembed"
        first = ps.iloc[0]
        if len(late):
            lr = late.iloc[-1] if "cleanup" not in set(late["phase"]) else late[late["phase"] == "cleanup"].iloc[0]
            others = [lr[c] for c in ps.columns if c.startswith("share:") and c != g]
            ok = rule_outer_layers_dominate(first[g], lr[g], others)
            ev = (f"embed/unembed share of abs. influence: {first[g]:.2f} in {first['phase']} -> {lr[g]:.2f} "
                  f"in {lr['phase']} (attention {lr['share:attention']:.2f}, mlp {lr['share:mlp']:.2f})")
        else:
            ok, ev = None, "no phase after memorisation"
        claims.append(Claim(
            outer_claim, "ExPLAIND",
            "embed/unembed share of abs. influence in cleanup (else the last phase) exceeds its memorisation "
            "share and is the largest group",
            ev, verdict(ok)))
    else:
        claims.append(Claim(wd_claim, "Nanda et al. 2023; ExPLAIND", wd_rule + "; needs ExPLAIND (run without --no-explain)",
                            "n/a", verdict(None)))
        claims.append(Claim(outer_claim, "ExPLAIND", "needs ExPLAIND", "n/a", verdict(None)))

    sw = d["swap"]
    if sw is not None and len(sw):
        s_act, s_swap = _first_step(sw, "actual", SWAP_ACC), _first_step(sw, "final_outer", SWAP_ACC)
        claims.append(Claim(
            "The inner pipeline generalises before the outer layers are aligned (swap)", "ExPLAIND",
            f"first checkpoint with test acc >= {SWAP_ACC:.0%} is earlier for final-outer + step-s-inner than for "
            "the step-s model (not run when neither reaches it)",
            f"hybrid {_f(s_swap)} vs model {_f(s_act)}; reverse hybrid (step-s outer + final inner) "
            f"reaches it at {_f(_first_step(sw, 'final_inner', SWAP_ACC))}",
            verdict(rule_swap(s_swap, s_act))))

    align_claim = "Test examples' influence becomes aligned late in training"
    align_rule = (f"mean pairwise cosine of per-query influence vectors: last window - first window > "
                  f"{ALIGN_Z:g} x its standard deviation over {ALIGN_BOOT} bootstrap resamples of the queries")
    al = d["alignment"]
    if al is not None and len(al):
        allrows = al[al["component"] == "all"].reset_index(drop=True)
        if len(allrows) >= 2:
            a0, a1 = allrows.iloc[0], allrows.iloc[-1]
            f0, f1 = (d["attr"].get(f"alignment_{r['phase']}") for r in (a0, a1))
            if f0 is None or f1 is None:
                ok, ev = None, "per-query alignment attributions missing"
            else:
                ch = bootstrap_alignment_change(_query_vectors(f0), _query_vectors(f1))
                ok = rule_alignment_grows(ch.increase, ch.boot_std)
                ev = (f"mean pairwise cosine (all components) {ch.first:.2f} in {a0['phase']} window -> "
                      f"{ch.last:.2f} in {a1['phase']} window: {ch.increase:+.3f}, bootstrap std "
                      f"{_f(ch.boot_std, 2)}, 95% interval [{_f(ch.lo, 2)}, {_f(ch.hi, 2)}] "
                      f"({ch.n_boot} resamples of {len(_query_vectors(f0))} queries)")
        else:
            ok, ev = None, "fewer than two windows"
        claims.append(Claim(align_claim, "ExPLAIND", align_rule, ev, verdict(ok)))
    else:
        claims.append(Claim(align_claim, "ExPLAIND", align_rule + "; needs ExPLAIND", "n/a", verdict(None)))

    a = d["attr"].get("components_test")
    if a is not None and a.completeness is not None:
        s = a.completeness.summary()
        rel = s.get("total_rel", s.get("total_max_rel"))
        claims.append(Claim(
            "ExPLAIND is exact: the attribution sums to the output change", "ExPLAIND; docs/design.md §1",
            f"relative residual of the total <= {EXACT_TOL:g} (float32 gradients, float64 certificate), every step "
            "within its certificate bound, and exact replay",
            f"total {a.total():+.4g}, relative residual {_f(rel)}, max per-step abs residual "
            f"{_f(s.get('step_max_abs'))}; {s.get('refined_steps')} steps refined beyond "
            f"{a.meta.get('nodes')} nodes (max {s.get('max_nodes')}); certificate ok {a.completeness.ok} "
            f"({s.get('failed_steps')} failed steps); replay mismatch {_f(a.meta.get('replay_mismatch'))}",
            verdict(rule_exact(rel, a.meta.get("replay_mismatch"), certified=a.completeness.ok))))
    return claims


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _md_table(df, floatfmt: str = "{:+.3g}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _story(d: dict[str, Any]) -> list[str]:
    """The component story in prose, with numbers."""
    lines = []
    ct, ps = d["components_test"], d["phase_shares_test"]
    a = d["attr"].get("components_test")
    if ct is None or a is None:
        return ["ExPLAIND was not run (`--no-explain`)."]
    total = a.total()
    ct = ct.copy()
    top = ct.reindex(ct["total"].abs().sort_values(ascending=False).index)
    lines.append(
        f"Over the whole run the mean test log-prob of the correct answer changed by **{total:+.3f}** "
        f"nats; ExPLAIND writes this change exactly as a sum over {len(a.coords['step'])} step bins x "
        f"{len(a.coords['component'])} components x update sources.")
    lines.append(
        "Largest net contributors: " + ", ".join(f"`{r.component}` {r.total:+.3f}" for r in top.head(4).itertuples())
        + ".")
    if ps is not None and len(ps):
        for _, r in ps.iterrows():
            shares = ", ".join(
                f"{c.split(':', 1)[1]} {r[c]:.0%}" for c in ps.columns if c.startswith("share:")
            )
            lines.append(
                f"* **{r['phase']}** (steps {r['start']}-{r['stop']}): net {r['change']:+.3f}; share of "
                f"absolute influence: {shares}; data {r['data']:+.3f} vs weight decay {r['weight_decay']:+.3f}."
            )
    wd = ct.reindex(ct["weight_decay"].sort_values(ascending=False).index)
    lines.append(
        "Weight decay helps test performance most through " + ", ".join(
            f"`{r.component}` ({r.weight_decay:+.3f})" for r in wd.head(3).itertuples()) + ".")
    return lines


def write_report(out: str | Path) -> Path:
    """Write ``figures/``, ``claims.csv``, ``summary.json`` and ``report.md`` into ``out``.

    Returns:
        Path of ``report.md``.
    """
    import pandas as pd

    out = Path(out)
    d = _read(out)
    figs = _figures(out, d)
    claims = evaluate_claims(d)
    cdf = pd.DataFrame([c.__dict__ for c in claims])
    cdf.to_csv(out / "claims.csv", index=False)

    cfg, ph, tm = d["config"], d["phases"].get("phases", {}), d["timings"]
    m = d["metrics"]
    a = d["attr"].get("components_test")
    summary: dict[str, Any] = {
        "config": cfg.get("name"),
        "steps": int(m["step"].iloc[-1]) if m is not None else None,
        "final train acc": float(m["train_acc"].iloc[-1]) if m is not None else None,
        "final test acc": float(m["test_acc"].iloc[-1]) if m is not None else None,
        "t_mem (train>=99%)": ph.get("memorisation_end"),
        "t_clean": ph.get("cleanup_start"),
        "t_gen (test>=99%)": ph.get("generalisation"),
        "key frequencies": " ".join(map(str, d["phases"].get("key_frequencies", []))),
        "ms/step (train)": tm.get("ms_per_step"),
        "train s": tm.get("train"),
        "explain s": sum(tm.get(k, 0.0) for k in ("explain_test", "explain_train", "alignment")) or None,
        "explain/train time": (
            sum(tm.get(k, 0.0) for k in ("explain_test", "explain_train", "alignment")) / tm["train_steps_only"]
            if tm.get("train_steps_only") and tm.get("explain_test") else None),
        "attribution total (test)": a.total() if a is not None else None,
        "completeness rel residual": (a.completeness.summary().get("total_rel") if a is not None and a.completeness else None),
        "claims": verdict_line(count_verdicts(c.verdict for c in claims)),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    L: list[str] = [f"# Grokking with ExPLAIND — `{cfg.get('name', '?')}` config", ""]
    L.append(
        f"Modular addition mod p = {cfg.get('p')} ({cfg.get('train_fraction', 0):.0%} of the {cfg.get('p', 0) ** 2} "
        f"pairs for training), one-layer ReLU transformer (d_model {cfg.get('d_model')}, {cfg.get('n_heads')} "
        f"heads, d_mlp {cfg.get('d_mlp')}, no LayerNorm), full-batch AdamW (lr {cfg.get('lr')}, weight decay "
        f"{cfg.get('weight_decay')}, betas {cfg.get('betas')}), seed {cfg.get('seed')}. "
        f"Trained {summary['steps']} steps at {_f(tm.get('ms_per_step'))} ms/step.")
    L += ["", "## Summary", "", "| quantity | value |", "|---|---|"]
    L += [f"| {k} | {_f(v, 4)} |" for k, v in summary.items()]
    L += ["", "## Claims", "", f"**{summary['claims']}.** A claim is *not run* when the study has no data for "
          "its rule (no cleanup phase, `--no-explain`, a model that never reaches the accuracy the rule "
          "needs); it counts neither as reproduced nor as not reproduced.", ""]
    L += ["| # | claim | source | rule | evidence | verdict |", "|---|---|---|---|---|---|"]
    L += [f"| {i} | {c.claim} | {c.source} | {c.rule} | {c.evidence} | **{c.verdict}** |" for i, c in enumerate(claims, 1)]
    L += ["", "Margins: weight decay must carry at least "
          f"{WD_MIN_SHARE:.0%} of the cleanup phase's rise of the mean test log-prob, as much as all gradient "
          "(data and momentum) updates together, for it to *drive* cleanup (any positive contribution would "
          "accept a minor one); the alignment increase must exceed "
          f"{ALIGN_Z:g} standard deviations of its paired bootstrap over the queries ({ALIGN_BOOT} seeded "
          "resamples, ~95%), the spread that comes from which test queries were drawn."]
    L += ["", "## Phases", ""]
    if ph:
        L.append("Rule (see `analyses/grokking/phases.py`): memorisation ends when train accuracy first reaches "
                 "99%; cleanup starts when test accuracy has closed half the gap between its memorisation "
                 "plateau and 100%; generalisation when test accuracy reaches 99%.")
        L.append("")
        L += [f"* {k}: steps {a_}-{b_}" for k, (a_, b_) in ph.get("intervals", {}).items()]
    if "curves" in figs:
        L += ["", "![curves](figures/curves.png)", "", figs["curves"]]
    if "progress_measures" in figs:
        L += ["", "![progress measures](figures/progress_measures.png)", "", figs["progress_measures"]]
    if "fourier_embedding" in figs:
        L += ["", "![fourier](figures/fourier_embedding.png)", "", figs["fourier_embedding"]]
    L += ["", "## Components", ""]
    L += [x for line in _story(d) for x in (line, "")]
    for split in ("test", "train"):
        ct = d[f"components_{split}"]
        if ct is not None:
            L += ["", f"### Per-component influence on the mean {split} log-prob", "",
                  _md_table(ct.drop(columns=["group"]))]
        for name in (f"heatmap_{split}", f"cumulative_{split}"):
            if name in figs:
                L += ["", f"![{name}](figures/{name}.png)", "", figs[name]]
    if "data_vs_weight_decay" in figs:
        L += ["", "![data vs weight decay](figures/data_vs_weight_decay.png)", "", figs["data_vs_weight_decay"]]
    L += ["", "## Alignment", ""]
    if d["alignment"] is not None:
        al = d["alignment"][d["alignment"]["component"] == "all"]
        L += [_md_table(al[["phase", "start", "stop", "mean_cosine", "mean_influence"]], "{:.3g}")]
    if "alignment" in figs:
        L += ["", "![alignment](figures/alignment.png)", "", figs["alignment"]]
    if "swap" in figs:
        L += ["", "![swap](figures/swap.png)", "", figs["swap"]]
    if tm:
        L += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
        L += [f"| {k} | {_f(v, 4)} |" for k, v in tm.items()]
    L.append("")
    path = out / "report.md"
    path.write_text("\n".join(L))
    return path
