"""GPU benchmark (issue #11): recording and explain on CUDA against the CPU, in one process.

    python -m analyses.bench_gpu [--steps 300] [--cpu-threads N]

Without a CUDA device it says so and measures nothing. With one, on the default grokking config
(p=59, d_model 64, 4 heads, d_mlp 256, AdamW, full batch, checkpoints every 100 steps) it:

1. records ``--steps`` steps on the CPU (1 thread, the exact-replay default) and on the GPU
   (deterministic algorithms, the GPU default) and prints ms/step of each;
2. replays both runs against their checkpoints (``Trajectory.verify``): the largest difference
   must be 0 for the GPU run as for the CPU one;
3. times ``explain(traj, test, by=("step", "component"), components="head", reduce="mean")``
   over the whole test set on the CPU (``--cpu-threads``) and on the GPU for the CPU-recorded
   run, and on the GPU for the GPU-recorded run; prints each time, its ratio to training and
   to the CPU explain, whether the certificate passed, and the largest difference between the
   GPU and CPU values relative to their largest magnitude (same run).
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
    ap.add_argument("--cpu-threads", type=int, default=None, help="CPU threads of the CPU explain (default: all)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("[gpu] no CUDA device here: nothing measured")
        return {}

    from analyses.bench_explain import record_run, split
    from analyses.grokking.task import get_config
    from explaind_tl import explain

    out: dict = {"device": torch.cuda.get_device_name(0)}
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        cfg = get_config("default")
        train, test = split(cfg)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        runs = {}
        for dev in ("cpu", "cuda"):
            traj, wall, _ = record_run(cfg, train, tmp / dev, args.steps, checkpoint_every=100, device=dev)
            runs[dev] = (traj, sum(wall))
            out[f"train_{dev}_ms_per_step"] = 1e3 * sum(wall) / args.steps
        torch.set_num_threads(args.cpu_threads or threads)
        print(f"[gpu] {out['device']}; default grokking config, {args.steps} full-batch steps; recording: "
              f"CPU (1 thread) {out['train_cpu_ms_per_step']:.1f} ms/step, "
              f"GPU {out['train_cuda_ms_per_step']:.1f} ms/step")
        for dev, (traj, _) in runs.items():
            report = traj.verify(progress=False)
            out[f"replay_{dev}_max_diff"] = report.max_abs_diff
            print(f"    replay of the {dev} run against its checkpoints: max |diff| {out[f'replay_{dev}_max_diff']:.1e}"
                  f"  ({'bitwise' if report.ok else 'NOT bitwise'})")
        kw = dict(by=("step", "component"), components="head", reduce="mean", progress=False)
        times, values = {}, {}
        for name, run, dev in (("cpu run, explain on cpu", "cpu", "cpu"), ("cpu run, explain on gpu", "cpu", "cuda"),
                               ("gpu run, explain on gpu", "cuda", "cuda")):
            traj, train_s = runs[run]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            attr = explain(traj, test, device=dev, **kw)
            torch.cuda.synchronize()
            times[name], values[name] = time.perf_counter() - t0, attr.values
            print(f"    {name}: {times[name]:7.1f} s  explain/train {times[name] / train_s:.2f}x  "
                  f"ratio to the cpu explain {times[name] / times['cpu run, explain on cpu']:.2f}  "
                  f"certificate ok {attr.completeness.ok}")
        a, b = values["cpu run, explain on cpu"], values["cpu run, explain on gpu"]
        out["gpu_vs_cpu_rel_diff"] = float((a - b).abs().max() / a.abs().max())
        out["times"] = times
        print(f"    same run, gpu vs cpu values: max |diff| / max |value| {out['gpu_vs_cpu_rel_diff']:.1e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
