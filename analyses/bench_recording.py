"""Benchmark: cost of recording a trajectory (time and disk) vs a plain torch training loop.

Default is the grokking configuration (p=59, train fraction 0.5, 1-layer HookedTransformer,
d_model 64, 4 heads of 16, d_mlp 256, ReLU, no LayerNorm, full batch, AdamW lr 1e-3,
wd 1.0, betas (0.9, 0.98)). Both loops run the same number of steps from the same init in
the same process, alternated ``--repeats`` times; the best time of each is compared.

    python -m analyses.bench_recording --steps 300

Reports: recording overhead (recorder steady state and including setup: saving the data and
the step-0 checkpoint), bytes on disk per step, and the ratio to storing every step's
parameters and optimizer state.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def make_data(p: int, frac: float, seed: int) -> dict[str, torch.Tensor]:
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    label = (a + b) % p
    keep = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))[: int(frac * p * p)]
    return {"tokens": tokens[keep], "label": label[keep]}


def make_model(args: argparse.Namespace):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=args.d_model,
        d_head=args.d_head,
        n_heads=args.n_heads,
        d_mlp=args.d_mlp,
        d_vocab=args.p + 1,
        d_vocab_out=args.p,
        n_ctx=3,
        act_fn="relu",
        normalization_type=None,
    )
    torch.manual_seed(args.seed)
    return HookedTransformer(cfg)


def make_opt(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.98))


def plain_loop(args, data, loss_fn) -> float:
    model = make_model(args)
    opt = make_opt(model, args)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, data).mean()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def recorded_loop(args, data, loss_fn, run_dir: Path) -> tuple[float, float, float]:
    from explaind_tl import TrajectoryRecorder

    model = make_model(args)
    opt = make_opt(model, args)
    t0 = time.perf_counter()
    rec = TrajectoryRecorder(model, opt, run_dir, data, loss_fn, checkpoint_every=args.checkpoint_every, overwrite=True, num_threads=args.threads)
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        rec.step(None)
    rec.close()
    t2, c2 = time.perf_counter(), time.process_time()
    return t2 - t1, t2 - t0, c2 - c1


def dir_bytes(path: Path, exclude: str | None = None) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and (exclude is None or exclude not in p.parts))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--p", type=int, default=59)
    ap.add_argument("--frac", type=float, default=0.5)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--d-head", type=int, default=16)
    ap.add_argument("--d-mlp", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="alternate plain/recorded runs this many times; best of each")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of both loops (the recorder pins its steps to this; >1 makes replay inexact on CPU)")
    ap.add_argument("--verify", action="store_true", help="also replay the run and check it bitwise")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from explaind_tl.losses import last_token_cross_entropy as loss_fn

    data = make_data(args.p, args.frac, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench_recording_"))
    run_dir = tmp / "run"
    try:
        plain, plain_cpu, steady, total, steady_cpu = [], [], [], [], []
        for _ in range(args.repeats):
            w, c = plain_loop(args, data, loss_fn)
            plain.append(w)
            plain_cpu.append(c)
            s, t, c = recorded_loop(args, data, loss_fn, run_dir)
            steady.append(s)
            total.append(t)
            steady_cpu.append(c)
        model = make_model(args)
        n_params = sum(p.numel() for p in model.parameters())
        bytes_all = dir_bytes(run_dir)
        bytes_traj = dir_bytes(run_dir, exclude="train_data")
        full_per_step = 3 * n_params * 4  # params + exp_avg + exp_avg_sq, float32
        tp, ts, tt = min(plain), min(steady), min(total)
        print(f"config: p={args.p} N_train={len(data['label'])} params={n_params} steps={args.steps} K={args.checkpoint_every} threads={args.threads}")
        print(f"plain torch loop:      {tp:8.3f} s  ({1e3 * tp / args.steps:.2f} ms/step)")
        print(f"recorded (steps only): {ts:8.3f} s  overhead {100 * (ts / tp - 1):+.1f}%")
        print(f"recorded (incl setup): {tt:8.3f} s  overhead {100 * (tt / tp - 1):+.1f}%")
        cp, cs = min(plain_cpu), min(steady_cpu)
        print(f"CPU time (less sensitive to other load): plain {cp:.3f} s, recorded {cs:.3f} s, overhead {100 * (cs / cp - 1):+.1f}%")
        print(f"disk: {bytes_all / 1e6:.2f} MB total, {bytes_traj / 1e6:.2f} MB without the training data")
        print(f"bytes/step: {bytes_traj / args.steps:,.0f} (all files: {bytes_all / args.steps:,.0f}) vs {full_per_step:,} storing every step's params+optimizer state -> {full_per_step * args.steps / bytes_traj:.1f}x smaller")
        if args.verify:
            from explaind_tl import Trajectory

            t0 = time.perf_counter()
            report = Trajectory.load(run_dir).verify(progress=False)
            print(f"verify: {report} in {time.perf_counter() - t0:.2f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
