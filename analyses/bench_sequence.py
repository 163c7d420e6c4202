"""Sequence-model benchmark (issue #12): explain / training time of step x head on next-token metrics.

    python -m analyses.bench_sequence [--preset study|small|both] [--steps N] [--compare]

Presets (each a 2-layer attention-only ``HookedTransformer`` with LayerNorm, d_model 64, 4 heads
of 16, trained with the recorder by ``analyses.induction.pipeline.train_run`` on the induction
study's generated sequences: 75% random tokens with a copied segment, the rest from a bigram
model; AdamW lr 1e-3, batch 64):

* ``study``: the induction study's default config (context 32, vocabulary 32, 2,000 steps,
  64 held-out repeat sequences as queries);
* ``small``: the model issue #12 was filed on (context 24, vocabulary 48, 400 steps, 16 queries).

For each preset it records the run (timing the training loop), then times
``explain(traj, queries, metric="next_token_logprob", by=("step", "component"),
components="head", reduce="mean")`` with the copied positions as the queries' ``loss_mask`` (the
mean in-context log-prob of the copied tokens), and prints the ratio explain / training
(target <= 3), the forward used (``readout``: only what reaches the read positions, the nodes of
a step stacked into one batch; ``model``: TransformerLens's forward) and the certificate. With
``--compare`` the same explain runs again with ``fast_forward=False`` and the ratio of the two
and the largest difference of their values are printed. All timings are taken in this process,
under the default thread count (training is single-threaded by design, explain uses the cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

PRESETS = {
    "study": {},
    "small": dict(n_ctx=24, d_vocab=48, steps=400, n_queries=16),
}


def run_preset(name: str, steps: int | None, compare: bool, work: Path) -> dict:
    from analyses.induction.pipeline import train_run
    from analyses.induction.task import get_config, make_sequences
    from explaind_tl import explain

    cfg = get_config("default").replace(**PRESETS[name])
    if steps is not None:
        cfg = cfg.replace(steps=steps)
    traj, _, train_s = train_run(cfg, work / name, progress=False)
    q = make_sequences(cfg, cfg.n_queries, cfg.seed + 3, repeat_fraction=1.0)
    queries = {"tokens": q["tokens"], "loss_mask": q["copy_mask"]}
    kw = dict(metric="next_token_logprob", by=("step", "component"), components="head", reduce="mean", progress=False)
    print(f"[sequence] preset {name}: context {cfg.n_ctx}, vocabulary {cfg.d_vocab}, {cfg.steps} steps of batch "
          f"{cfg.batch_size} trained in {train_s:.1f} s; {cfg.n_queries} queries; load {os.getloadavg()[0]:.1f}")
    out = {"preset": name, "train_s": train_s, "steps": cfg.steps}
    rows = [("fast_forward=True", {})] + ([("fast_forward=False", {"fast_forward": False})] if compare else [])
    values = {}
    for label, extra in rows:
        t0 = time.perf_counter()
        attr = explain(traj, queries, **kw, **extra)
        secs = time.perf_counter() - t0
        values[label] = attr.values
        c = attr.completeness.summary()
        out[label] = {"seconds": secs, "ratio": secs / train_s, "forward": attr.meta["forward"], "ok": c["ok"],
                      "total_rel": c["total_rel"]}
        print(f"    {label:18s} {secs:7.1f} s  explain/train {secs / train_s:.2f}x  forward {attr.meta['forward']:7s} "
              f"certificate ok {c['ok']}  total residual (relative) {c['total_rel']:.1e}")
    if compare:
        a, b = values["fast_forward=True"], values["fast_forward=False"]
        out["speedup"] = out["fast_forward=False"]["seconds"] / out["fast_forward=True"]["seconds"]
        out["rel_diff"] = float((a - b).abs().max() / b.abs().max())
        print(f"    read-out forward vs TransformerLens's: {out['speedup']:.2f}x faster, "
              f"max |diff| / max |value| {out['rel_diff']:.1e}")
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=[*PRESETS, "both"], default="both")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    ap.add_argument("--compare", action="store_true", help="also time TransformerLens's forward (fast_forward=False)")
    ap.add_argument("--work-dir", type=str, default=None)
    args = ap.parse_args(argv)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_seq_"))
    try:
        names = list(PRESETS) if args.preset == "both" else [args.preset]
        return [run_preset(n, args.steps, args.compare, work) for n in names]
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
