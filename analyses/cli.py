"""Command line: ``explaind-tl``.

Sub-commands:

* ``explaind-tl grokking [--config default|nanda|tiny] [--out DIR] [--seed N] [--no-explain] [--backend hooked|bridge]
  [--queries N]`` — train a modular-addition model until it groks, explain the run with
  ExPLAIND and write a report directory (``report.md``, figures, CSVs, attributions).
* ``explaind-tl induction [--config default|tiny] [--out DIR] [--seed N] [--no-explain] [--backend hooked|bridge]
  [--threads N] [--quiet]`` — train a 2-layer attention-only model through the induction phase
  change on generated sequences, explain it per step x head and per training sequence, and write
  a report directory.
* ``explaind-tl faithfulness --study grokking|induction [--config tiny|default] [--out DIR]
  [--subsets M] [--drops 0.5,0.05] [--steps N] [--queries N] [--datamodel K]`` — the linear
  datamodeling score of ExPLAIND's train axis, TracIn, the final gradient dot and the exact
  metagradient against retraining on random subsets (with ``--datamodel``, also the ceiling of
  any additive score: a linear datamodel fitted on K more retrainings).
* ``explaind-tl report DIR`` — rewrite ``report.md`` and the figures of an existing grokking study.
* ``explaind-tl migrate PATH [PATH ...]`` — convert run directories (or explain resume
  directories) written before format version 2, in place; only for directories you trust
  (same as ``python -m explaind_tl.run.migrate PATH``).

Startup is lazy: nothing heavy (torch, transformer_lens) is imported until a sub-command runs,
so ``explaind-tl --help`` is fast. The command line lives with the studies it runs: the library
(``explaind_tl``) imports nothing from ``analyses``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# preset descriptions duplicated here so that --help does not import torch
_PRESETS = {
    "default": "p=59, 50%% train, d_model 64; stops 200 steps after test acc >= 99%% "
    "(~2,500 steps; training ~2 min on 2 CPU cores)",
    "nanda": "Nanda et al. 2023: p=113, 30%% train, d_model 128, 25k steps "
    "(opt-in; ~6x default per step, ~2 h of training on one CPU core)",
    "tiny": "p=11, d_model 24, 100 steps (seconds; for tests)",
}
_INDUCTION_PRESETS = {
    "default": "2 layers, attention only, d_model 64, 4 heads, context 32, 100k sequences (75%% with a copied "
    "segment), 2,000 steps (training ~40 s; the whole study 5-7 min on 2 CPU cores)",
    "tiny": "d_model 16, 2 heads, context 16, 40 steps (seconds; for tests; no induction heads form)",
}


def _epilog(presets: dict[str, str]) -> str:
    return "presets:\n" + "\n".join(f"  {k:8s} {v}" for k, v in presets.items()).replace("%%", "%")


def _config_and_out(p: argparse.ArgumentParser, presets: dict[str, str], study: str) -> None:
    p.add_argument("--config", default="default", choices=sorted(presets), help="preset (default: default)")
    p.add_argument("--out", default=None, help=f"report directory (default: runs/{study}-<config>)")


def _backend_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["hooked", "bridge"], default=None,
                   help="HookedTransformer (TransformerLens 3) or TransformerBridge (TransformerLens 4; booted natively, "
                   "initialised as the HookedTransformer is); default: hooked where TransformerLens has it")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="explaind-tl",
        description="Exact ExPLAIND attribution (steps x components x training examples) for "
        "TransformerLens models.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    g = sub.add_parser(
        "grokking",
        help="train modular addition until it groks, explain it, write a report",
        description="Train a one-layer transformer on modular addition with the trajectory "
        "recorder until it groks, explain the run with ExPLAIND (steps x components x sources, "
        "per-query alignment) and write a report directory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(_PRESETS),
    )
    _config_and_out(g, _PRESETS, "grokking")
    g.add_argument("--seed", type=int, default=None, help="model-initialisation seed (default: the preset's)")
    g.add_argument("--no-explain", action="store_true", help="train and compute phases only")
    _backend_argument(g)
    g.add_argument(
        "--queries", type=int, default=None, metavar="N",
        help="test queries for the per-query alignment analysis (default: the preset's)",
    )
    g.add_argument(
        "--test-queries", type=int, default=None, metavar="N",
        help="test examples for the component influence (default: the preset's; all for default)",
    )
    g.add_argument(
        "--train-queries", type=int, default=None, metavar="N",
        help="training examples for the training-set influence (default: the preset's)",
    )
    g.add_argument("--max-steps", type=int, default=None, help="override the step cap")
    g.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads of the analyses (default: torch's); recorded training steps always "
        "run single-threaded so that replay is exact",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    i = sub.add_parser(
        "induction",
        help="train a 2-layer attention-only model through the induction phase change, explain it, write a report",
        description="Train a 2-layer attention-only transformer with the trajectory recorder on generated "
        "sequences (random segments copied to random later offsets, mixed with bigram sequences) through the "
        "induction phase change; measure previous-token, induction and ICL scores over training; explain the "
        "in-context log-prob and the ICL score per step x head and per training sequence; write a report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(_INDUCTION_PRESETS),
    )
    _config_and_out(i, _INDUCTION_PRESETS, "induction")
    i.add_argument("--seed", type=int, default=None, help="seed of the model and the data (default: the preset's)")
    i.add_argument("--no-explain", action="store_true", help="train and measure only")
    _backend_argument(i)
    i.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the analyses (recorded steps always run single-threaded)")
    i.add_argument("--quiet", action="store_true", help="no progress bars")
    f = sub.add_parser(
        "faithfulness",
        help="linear datamodeling score of training-example attributions (retraining on random subsets)",
        description="Record a study's run, score every training example for each query with ExPLAIND's train "
        "axis, TracIn and the final gradient dot, retrain on random subsets (the recorded batches minus the "
        "left-out examples) and report the linear datamodeling score of each method. Retraining dominates the "
        "cost: subsets x drop fractions runs of the whole training (use --steps / --subsets to trade).",
    )
    f.add_argument("--study", required=True, choices=["grokking", "induction"])
    f.add_argument("--config", default="tiny", choices=["tiny", "default"], help="the study's preset (default: tiny)")
    f.add_argument("--out", default=None, help="output directory (default: runs/faithfulness-<study>-<config>)")
    f.add_argument("--subsets", type=int, default=64, help="random subsets per drop fraction (default 64)")
    f.add_argument("--drops", default="0.5,0.05", help="drop fractions, comma-separated (default 0.5,0.05)")
    f.add_argument("--steps", type=int, default=None, help="train this many steps instead of the preset's")
    f.add_argument("--queries", type=int, default=None, help="held-out queries (default 16)")
    f.add_argument("--seed", type=int, default=0, help="seed of the subsets")
    f.add_argument("--datamodel", type=int, default=0, metavar="K",
                   help="also fit a linear datamodel on K more retrainings per drop fraction: the ceiling of any "
                   "additive score (default 0: off; K several times the training-set size)")
    f.add_argument("--metric", default=None,
                   help="query output every method and retrained model is read with: grokking correct_logprob "
                   "(default), correct_logit or loss; induction next_token_logprob (default) or next_token_loss")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    r = sub.add_parser("report", help="rewrite report.md and figures of an existing grokking study directory")
    r.add_argument("out", help="study directory")
    m = sub.add_parser(
        "migrate",
        help="convert run/resume directories written before format version 2 (pickled state) in place",
        description="Convert run directories whose checkpoints hold a pickled scheduler state, and "
        "explain resume directories holding explain_state.pt, to the pickle-free format. Loading "
        "never unpickles; this command reads the old pickles with torch.load(weights_only=True). "
        "Run it only on directories you trust.",
    )
    m.add_argument("paths", nargs="+", metavar="PATH", help="run directories or explain resume directories")
    return p


def _summary_table(summary: dict) -> str:
    rows = [(k, v) for k, v in summary.items() if not isinstance(v, (dict, list))]
    w = max((len(k) for k, _ in rows), default=10)
    lines = []
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.4g}"
        lines.append(f"  {k:<{w}}  {v}")
    return "\n".join(lines)


def _grokking(args: argparse.Namespace) -> int:
    import torch

    from analyses.grokking.pipeline import run_study
    from analyses.grokking.task import get_config
    from analyses.induction.task import resolve_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    overrides["backend"] = resolve_backend(args.backend or "auto")
    cfg = get_config(args.config, **overrides)
    out = Path(args.out or f"runs/grokking-{args.config}")
    print(f"explaind-tl grokking: config {cfg.name} ({cfg.description}), backend {cfg.backend}", flush=True)
    print(f"report directory: {out}", flush=True)
    t0 = time.perf_counter()
    res = run_study(
        cfg,
        out,
        explain=not args.no_explain,
        n_queries=args.queries,
        n_test_queries=args.test_queries,
        n_train_queries=args.train_queries,
        progress=not args.quiet,
    )
    print("\nsummary")
    print(_summary_table(res.summary))
    print(f"  {'wall time':<20}  {time.perf_counter() - t0:.0f} s")
    print(f"\nreport: {res.report}")
    return 0


def _induction(args: argparse.Namespace) -> int:
    import torch

    from analyses.induction.pipeline import run_study
    from analyses.induction.task import get_config, resolve_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_config(args.config)
    if args.seed is not None:
        cfg = cfg.replace(seed=args.seed)
    cfg = cfg.replace(backend=resolve_backend(args.backend or "auto"))
    out = Path(args.out or f"runs/induction-{args.config}")
    print(f"explaind-tl induction: config {cfg.name}, backend {cfg.backend}; report directory: {out}", flush=True)
    t0 = time.perf_counter()
    summary = run_study(cfg, out, progress=not args.quiet, explain=not args.no_explain)
    print("\nsummary")
    print(_summary_table({k: v for k, v in summary.items() if k != "config"}))
    for name, e in summary.get("explain", {}).items():
        print(f"  explain {name:<8}  {e['seconds']:.1f} s ({e['ratio_to_training']:.2f}x training), "
              f"certificate {'ok' if e['certificate_ok'] else 'FAILED'}")
    print(f"  {'wall time':<20}  {time.perf_counter() - t0:.0f} s")
    print(f"\nreport: {out / 'report.md'}")
    return 0


def _faithfulness(args: argparse.Namespace) -> int:
    from analyses.faithfulness.harness import STUDY_METRICS, run_faithfulness

    try:
        drops = tuple(float(x) for x in args.drops.split(","))
    except ValueError:
        print(f"--drops must be comma-separated numbers, got {args.drops!r}", file=sys.stderr)
        return 2
    if args.subsets < 3 or not all(0 < d < 1 for d in drops):
        print("--subsets must be >= 3 and every drop fraction in (0, 1)", file=sys.stderr)
        return 2
    if args.datamodel != 0 and args.datamodel < 3:
        print("--datamodel must be 0 (off) or >= 3 retrainings", file=sys.stderr)
        return 2
    if args.metric is not None and args.metric not in STUDY_METRICS[args.study]:
        print(f"--metric for --study {args.study} must be one of {', '.join(STUDY_METRICS[args.study])}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/faithfulness-{args.study}-{args.config}")
    t0 = time.perf_counter()
    res = run_faithfulness(args.study, args.config, out, subsets=args.subsets, drops=drops, n_queries=args.queries,
                           steps=args.steps, seed=args.seed, progress=not args.quiet, datamodel=args.datamodel, metric=args.metric)
    for frac, block in res["lds_by_fraction"].items():
        for m, b in block.items():
            print(f"  drop {frac:<5} {m:<12} LDS {b['mean']:+.3f}  [{b['ci95'][0]:+.3f}, {b['ci95'][1]:+.3f}]")
    print(f"  wall time {time.perf_counter() - t0:.0f} s\nreport: {out / 'report.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from analyses.grokking.report import write_report

    path = write_report(Path(args.out))
    print(f"report: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``explaind-tl`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "grokking":
        return _grokking(args)
    if args.command == "induction":
        return _induction(args)
    if args.command == "faithfulness":
        return _faithfulness(args)
    if args.command == "report":
        return _report(args)
    if args.command == "migrate":
        from explaind_tl.run.migrate import main as migrate_main

        return migrate_main(list(args.paths))
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
