"""Full-resolution kernel benchmark (issue #10): every query x every output x every training example.

    python -m analyses.bench_explain --case kernel [--scaling]     # or: python -m analyses.bench_kernel

The workload is the ExPLAIND reference implementation's own: modular addition p=23, 150 training
examples, full batch, 100 AdamW steps (lr 1e-3, wd 1.0, betas (0.9, 0.98)), one layer, d_model 32,
4 heads of 8, d_mlp 128, ReLU, no LayerNorm; 20 test queries x all 23 output logits. It prints,
for ``explain(traj, queries, metric="logits", by=("query", "output", "train"))`` at the default
``tol``, and for the step-binned variant ``by=("step", "train", "query")`` (``correct_logprob``,
10-step bins):

* explain time and **explain / training time**, both measured in this process (training is the
  recorder's 100 steps, 1 thread, as recorded runs always are), with 1 and with 2 threads for
  explain (2 threads: the data entries of each step run in a worker thread beside the next
  step's feature map, docs/design.md §4);
* the relative error of the total: ``Σ|residual| / Σ|measured|`` over the (query, output) rows,
  and the reference's measure, the mean over queries of ``‖residual_q‖ / ‖measured_q‖`` over
  the outputs;
* **peak RSS** of a fresh process that loads the run and explains it (``VmHWM``: imports,
  model and run included, what ``ru_maxrss`` of the reference's own script reports), and of
  one that only imports and loads (so explain's own share can be read off);
* the kernel once more with ``replay_mb=8`` at 1 thread (``lowmem``: checkpoint segments
  replayed in sub-segments, one more replay of each for ~15 MB less; with 2 threads that is the
  default, ``replay_mb="auto"``).

With ``--scaling``, the same for queries x outputs doubling (10, 20, 40 queries) and the
training set doubling (75, 150, 300 examples), so the cost can be read as linear or not.

Peak memory is read two ways, both of the whole process. ``VmHWM`` (peak RSS) counts the pages of
shared libraries that are resident, and how many of libtorch's pages a process gets mapped
depends on what the page cache held when it started: the same process measured 455 MB at one
time and 552 MB at another on one machine, the reference 221 and 279 MB after its imports. So
the parent also polls each child's ``RssAnon`` (anonymous memory: tensors, Python objects,
allocator arenas; every 10 ms) and reports its peak, which does not move with the page cache.

The reference implementation (PyPI ``explaind`` 0.1.0) is not a dependency; its time on this
workload is measured by ``analyses/bench_reference.py`` where it is installed (see there).
With ``--reference SRC`` (the folder it was unpacked into), this benchmark runs it too, in fresh
processes alternating with ours at 1 and 2 threads, ``--repeats`` times, and prints the medians
and the ratios (explain time, peak RSS, peak anonymous memory) of one session::

    python -m analyses.bench_kernel --cases kernel --reference /tmp/ref/src --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

P_MOD, N_TRAIN, STEPS, N_QUERIES, BIN = 23, 150, 100, 20, 10


def make_config(n_train: int):
    from analyses.grokking.task import get_config

    # int(train_fraction * p * p) training pairs: aim half a pair above n_train
    return get_config("default", p=P_MOD, train_fraction=(n_train + 0.5) / P_MOD**2, d_model=32, n_heads=4, d_head=8, d_mlp=128)


def record(n_train: int, run_dir: Path) -> tuple[Any, dict, float]:
    """Record the workload's run; returns (trajectory, test split, training wall seconds)."""
    from analyses.bench_explain import record_run, split

    cfg = make_config(n_train)
    train, test = split(cfg)
    if len(train["label"]) != n_train:
        raise RuntimeError(f"expected {n_train} training examples, got {len(train['label'])}")
    torch.set_num_threads(1)
    traj, wall, _ = record_run(cfg, train, run_dir, STEPS, checkpoint_every=STEPS)
    return traj, test, sum(wall)


CASES = {
    "kernel": dict(metric="logits", by=("query", "output", "train")),
    "binned": dict(metric="correct_logprob", by=("step", "train", "query"), step_bins=BIN),
    # the 1-thread default replays whole segments; this trades one more replay for ~15 MB
    "lowmem": dict(metric="logits", by=("query", "output", "train"), replay_mb=8.0),
}


def errors(attr, n_queries: int) -> dict:
    """Total relative residual and the reference's per-query measure."""
    c = attr.completeness
    res, meas = c.residual.reshape(n_queries, -1), c.measured.reshape(n_queries, -1)
    per_q = res.norm(dim=1) / meas.norm(dim=1).clamp_min(1e-300)
    s = c.summary()
    return {"total_rel": s["total_rel"], "mean_rel_per_query": float(per_q.mean()), "ok": s["ok"],
            "refined_steps": s["refined_steps"], "max_nodes": s["max_nodes"]}


def time_case(traj, queries: dict, case: str, threads: int) -> dict:
    from explaind_tl import explain

    torch.set_num_threads(threads)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        attr = explain(traj, queries, progress=False, **CASES[case])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(1)
    return {"case": case, "threads": threads, "explain_s": wall, "explain_cpu_s": cpu, **errors(attr, len(queries["label"]))}


def child(run_dir: str, case: str, n_queries: int) -> None:
    """In a fresh interpreter: explain once and print JSON with the process's peak RSS."""
    from analyses.bench_explain import _status_kb
    from explaind_tl import Trajectory, explain

    traj = Trajectory.load(run_dir)
    queries = {k: v[:n_queries] for k, v in torch.load(Path(run_dir) / "bench_queries.pt", weights_only=True).items()}
    if case == "baseline":  # imports, run and model loaded, nothing explained
        traj.model()
        print(json.dumps({"peak_kb": _status_kb("VmHWM")}))
        return
    t0 = time.perf_counter()
    attr = explain(traj, queries, progress=False, **CASES[case])
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_kb": _status_kb("VmHWM"), **errors(attr, n_queries)}))


def _anon_kb(pid: int) -> int:
    """``RssAnon`` of process ``pid`` in kB (0 once it is gone, or off Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def watched(cmd: list[str], env: dict, interval: float = 0.01) -> dict:
    """Run ``cmd`` to the end; returns its stdout and the peak of its ``RssAnon`` (``anon_kb``),
    polled every ``interval`` seconds from this process, so the child runs unchanged (a peak
    that lasts less than that can be missed)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
        peak = [0]
        done = threading.Event()

        def poll() -> None:
            while not done.wait(interval):
                peak[0] = max(peak[0], _anon_kb(proc.pid))

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        code = proc.wait()
        done.set()
        th.join()
        out.seek(0)
        err.seek(0)
        if code != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({code}):\n{err.read()[-3000:]}")
        return {"stdout": out.read(), "anon_kb": peak[0]}


def peak_rss(run_dir: Path, case: str, n_queries: int, threads: int) -> dict:
    """A fresh process's peak RSS (its own ``VmHWM``) and peak anonymous memory for one case."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "analyses.bench_kernel", "--child", str(run_dir), "--case", case,
           "--queries", str(n_queries), "--threads", str(threads)]
    got = watched(cmd, env)
    return {**json.loads(got["stdout"].strip().splitlines()[-1]), "anon_kb": got["anon_kb"]}


def reference_run(src: str, threads: int) -> dict:
    """``analyses/bench_reference.py`` (23 outputs) in a fresh process with ``src`` on its path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": str(threads)}
    got = watched([sys.executable, "-m", "analyses.bench_reference", str(P_MOD), str(threads)], env)
    text = got["stdout"]

    def number(pattern: str) -> float:
        m = re.search(pattern, text)
        if m is None:
            raise RuntimeError(f"the reference printed no {pattern!r}:\n{text[-2000:]}")
        return float(m.group(1))

    return {"seconds": number(r"explain_seconds\s+([\d.]+)"), "train_s": number(r"train_seconds\s+([\d.]+)"),
            "rel": number(r"rel_err mean over queries .* = ([\d.e+-]+)"),
            "peak_kb": number(r"peak RSS ([\d.]+) MiB") * 1024, "anon_kb": got["anon_kb"]}


def compare_reference(run_dir: Path, src: str, threads_list: list[int], repeats: int) -> dict:
    """Ours (the kernel case) and the reference in fresh processes, alternating, ``repeats`` times;
    medians and ratios per thread count."""
    runs: dict[tuple[str, int], list[dict]] = {}
    print(f"[kernel vs reference] fresh processes, alternating, {repeats} each")
    for i in range(repeats):
        for t in threads_list:
            for who, fn in (("ours", lambda t=t: peak_rss(run_dir, "kernel", N_QUERIES, t)), ("reference", lambda t=t: reference_run(src, t))):
                r = fn()
                runs.setdefault((who, t), []).append(r)
                print(f"    run {i + 1} {who:>9} threads {t}: explain {r['seconds']:6.2f} s  peak RSS {r['peak_kb'] / 1024:4.0f} MB  "
                      f"peak anonymous {r['anon_kb'] / 1024:4.0f} MB")
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("seconds", "peak_kb", "anon_kb")} for k, v in runs.items()}
    print("  medians:")
    for t in threads_list:
        o, r = med[("ours", t)], med[("reference", t)]
        print(f"    threads {t}: explain {o['seconds']:6.2f} s vs {r['seconds']:6.2f} s (ratio 1/{r['seconds'] / o['seconds']:.1f})  "
              f"peak RSS {o['peak_kb'] / 1024:4.0f} vs {r['peak_kb'] / 1024:4.0f} MB  "
              f"peak anonymous {o['anon_kb'] / 1024:4.0f} vs {r['anon_kb'] / 1024:4.0f} MB")
    if 1 in threads_list and len(threads_list) > 1:
        best = min(threads_list, key=lambda t: med[("ours", t)]["seconds"])
        print(f"    ours at {best} threads against the reference at 1 thread: "
              f"1/{med[('reference', 1)]['seconds'] / med[('ours', best)]['seconds']:.1f} of its explain time")
    return {"runs": {f"{who}_{t}": v for (who, t), v in runs.items()},
            "medians": {f"{who}_{t}": v for (who, t), v in med.items()}}


def fmt(row: dict) -> str:
    return (f"{row['case']:>6} {row.get('n_queries', N_QUERIES):>3} q {row.get('n_train', N_TRAIN):>4} train  threads {row['threads']}  "
            f"explain {row['explain_s']:6.2f} s  explain/train {row['ratio']:6.1f}x  total rel {row['total_rel']:.1e}  "
            f"per-query rel {row['mean_rel_per_query']:.1e}  ok {row['ok']}  peak RSS {row.get('peak_mb', float('nan')):5.0f} MB"
            f" ({row.get('anon_mb', float('nan')):.0f} anonymous)")


def run(args: argparse.Namespace) -> dict:
    tmp = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_kernel_"))
    tmp.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"rows": [], "scaling": []}
    try:
        print(f"[kernel] p={P_MOD}, {N_TRAIN} training examples, {STEPS} full-batch AdamW steps, d_model 32, 4 heads, d_mlp 128, "
              f"ReLU, no LN; {N_QUERIES} queries x all {P_MOD} outputs")
        traj, test, train_s = record(N_TRAIN, tmp / "run")
        torch.save({k: v for k, v in test.items()}, tmp / "run" / "bench_queries.pt")
        q = {k: v[:N_QUERIES] for k, v in test.items()}
        print(f"    training (recorder, 1 thread): {train_s:.2f} s for {STEPS} steps")
        base = peak_rss(tmp / "run", "baseline", N_QUERIES, 1)
        out["baseline_mb"], out["baseline_anon_mb"] = base["peak_kb"] / 1024, base["anon_kb"] / 1024
        print(f"    peak RSS of a process that imports, loads the run and builds the model, explaining nothing: "
              f"{out['baseline_mb']:.0f} MB ({out['baseline_anon_mb']:.0f} MB anonymous)")
        for case in args.cases:
            for threads in args.thread_list:
                if case == "lowmem" and threads > 1:  # replay_mb="auto" is 8 MB with a spare core already
                    continue
                row = time_case(traj, q, case, threads)
                row["train_s"], row["ratio"] = train_s, row["explain_s"] / train_s
                mem = peak_rss(tmp / "run", case, N_QUERIES, threads)
                row["peak_mb"], row["anon_mb"] = mem["peak_kb"] / 1024, mem["anon_kb"] / 1024
                out["rows"].append(row)
                print("    " + fmt(row))
        if args.scaling:
            print("[kernel scaling] queries x outputs and N_train doubling (kernel case)")
            runs = {N_TRAIN: (traj, test, train_s)}
            for n_q, n_train in [(10, N_TRAIN), (20, N_TRAIN), (40, N_TRAIN), (20, 75), (20, 300)]:
                if n_train not in runs:
                    runs[n_train] = record(n_train, tmp / f"run_{n_train}")
                    torch.save(dict(runs[n_train][1]), tmp / f"run_{n_train}" / "bench_queries.pt")
                t_traj, t_test, t_train = runs[n_train]
                qq = {k: v[:n_q] for k, v in t_test.items()}
                row = time_case(t_traj, qq, "kernel", args.thread_list[0])
                d = tmp / ("run" if n_train == N_TRAIN else f"run_{n_train}")
                mem = peak_rss(d, "kernel", n_q, args.thread_list[0])
                row.update(n_queries=n_q, n_train=n_train, train_s=t_train, ratio=row["explain_s"] / t_train,
                           peak_mb=mem["peak_kb"] / 1024, anon_mb=mem["anon_kb"] / 1024)
                out["scaling"].append(row)
                print("    " + fmt(row))
        if args.reference:
            out["reference"] = compare_reference(tmp / "run", args.reference, args.thread_list, args.repeats)
    finally:
        if not args.work_dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=lambda s: [c for c in s.split(",") if c], default=["kernel", "lowmem", "binned"])
    ap.add_argument("--threads", dest="thread_list", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                    help="explain thread counts to time (training is always 1 thread)")
    ap.add_argument("--scaling", action="store_true", help="also the queries x outputs and N_train doubling table")
    ap.add_argument("--reference", type=str, default=None, metavar="SRC",
                    help="folder holding the reference package `explaind` (see analyses/bench_reference.py): "
                    "also run it, alternating with ours in fresh processes, and print ratios")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side with --reference (default 3; medians)")
    ap.add_argument("--work-dir", type=str, default=None)
    ap.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case", type=str, default="kernel", help=argparse.SUPPRESS)
    ap.add_argument("--queries", type=int, default=N_QUERIES, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.reference and not (Path(args.reference) / "explaind" / "epk_model.py").is_file():
        raise SystemExit(f"--reference {args.reference!r}: no explaind/epk_model.py there (see analyses/bench_reference.py)")
    if args.child:
        torch.set_num_threads(args.thread_list[0])
        child(args.child, args.case, args.queries)
        return {}
    return run(args)


if __name__ == "__main__":
    main()
