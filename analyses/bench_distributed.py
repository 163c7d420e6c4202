"""Scale-out benchmark (issue #11): one process against ``world_size`` worker processes.

    python -m analyses.bench_distributed [--steps 300] [--workers 1,2] [--threads 1]

Records a default-config grokking run (p=59, half the pairs for training, d_model 64, 4 heads,
d_mlp 256, AdamW; full batch, checkpoints every 100 steps) for ``--steps`` steps, then times
``explain(traj, test_set, by=("step", "component"), components="head", reduce="mean")`` over
the whole test set in one process and with each ``world_size`` in ``--workers`` (gloo workers
on this machine, ``--threads`` CPU threads each; one process gets the same thread count). It
prints, all measured in this process run: the wall time of each, its ratio to one process
(worker start-up included: each worker imports torch and TransformerLens and loads the run),
and the largest difference from one process's values relative to their largest magnitude.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-dir", type=str, default=None)
    args = ap.parse_args(argv)

    from analyses.bench_explain import record_run, split
    from analyses.grokking.task import get_config
    from explaind_tl import explain

    tmp = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_dist_"))
    out: dict = {"rows": []}
    try:
        cfg = get_config("default")
        train, test = split(cfg)
        torch.set_num_threads(1)
        traj, wall, _ = record_run(cfg, train, tmp / "run", args.steps, checkpoint_every=100)
        print(f"[distributed] default grokking config, {args.steps} full-batch steps recorded in {sum(wall):.1f} s; "
              f"explain step x head, mean over all {len(test['label'])} test queries, {args.threads} thread(s) per process")
        kw = dict(by=("step", "component"), components="head", reduce="mean", progress=False)
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        one = explain(traj, test, **kw)
        t_one = time.perf_counter() - t0
        print(f"    1 process : {t_one:7.1f} s  (explain/train {t_one / sum(wall):.2f}x)  certificate ok {one.completeness.ok}")
        out["one_s"] = t_one
        for n in args.workers:
            t0 = time.perf_counter()
            many = explain(traj, test, world_size=n, threads_per_worker=args.threads, **kw)
            t_n = time.perf_counter() - t0
            diff = float((many.values - one.values).abs().max() / one.values.abs().max())
            print(f"    {n} workers : {t_n:7.1f} s  ratio to 1 process {t_n / t_one:.2f}  split {many.meta['split']}  "
                  f"max |diff| / max |value| {diff:.1e}  certificate ok {many.completeness.ok}")
            print(f"      shard sweeps (s): {', '.join(f'{t:.1f}' for t in many.meta['shard_seconds'])}")
            out["rows"].append({"workers": n, "seconds": t_n, "ratio": t_n / t_one, "diff": diff,
                                "shard_seconds": many.meta["shard_seconds"]})
    finally:
        if not args.work_dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
