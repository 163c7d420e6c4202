"""Explain on several processes with ``torch.distributed`` (docs/design.md §7).

The work of one :func:`explaind_tl.explain` call is split into shards, one per rank, each a
complete sweep over part of the work; their partial results (``acc``, the certificate's
records, a few facts) are gathered and merged into exactly what one process would have
accumulated, then assembled once. Two splits (:func:`plan_shards`):

* ``"steps"`` (realized clock without a source axis): each rank sweeps a contiguous range of
  the window. Each step's entries depend only on ``w_s`` and ``w_{s+1}``, so a rank replays its
  range from the nearest checkpoint and needs nothing from the others until the final gather;
  ``acc`` adds up, the per-step records are disjoint.
* ``"queries"`` (the seen clock, or a source axis, whose momentum split carries state from the
  window's start): each rank sweeps the whole window for a contiguous slice of the queries,
  whole query chunks (:func:`shard_chunk`), with the global query weights (``reduce="mean"``
  divides by the whole set). Per-query rows are concatenated; aggregated rows, their step
  records and bounds add up (the sum of the bounds is a bound for the sum of the residuals).

Two ways to run: :func:`spawn` starts ``world_size`` worker processes on this machine (gloo,
``torch.multiprocessing``) and waits for them; a worker that dies or raises ends the call with
:class:`ExplainWorkerError` naming its rank and shard. Workers are forked where that is safe
(:func:`start_method`): they inherit the prepared job, with no start-up and nothing to pickle;
elsewhere they are spawned, import torch and TransformerLens and load the run themselves. Under
``torchrun`` (a process group already initialised), :func:`in_group` runs this rank's shard
and gathers with the group's own collectives.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from explaind_tl.engine.certify import RESTART_EVERY
from explaind_tl.engine.validate import check_choice, check_int
from explaind_tl.errors import ExplainWorkerError

__all__ = ["ExplainWorkerError", "Shard", "merge_parts", "plan_shards", "shard_chunk"]

SPLITS = ("auto", "steps", "queries")
GATHERS = ("all", "rank0")


@dataclass(frozen=True)
class Shard:
    """One rank's share of the work: a step range ``[lo, hi)`` or a query slice ``[lo, hi)``."""

    kind: str  # "steps" | "queries" | "all"
    rank: int
    world: int
    lo: int
    hi: int

    def describe(self) -> str:
        what = "steps" if self.kind == "steps" else "queries"
        return f"rank {self.rank} of {self.world} ({what} {self.lo}..{self.hi - 1})"


def check_arguments(world_size: Any, split: Any, gather: Any, threads_per_worker: Any) -> tuple[int | None, int]:
    """``(world_size or None, threads per started worker)``; type and value errors first."""
    if world_size is not None:
        world_size = check_int("world_size", world_size, minimum=1)
    check_choice("split", split, SPLITS)
    check_choice("gather", gather, GATHERS)
    if threads_per_worker is None:
        threads = max(1, torch.get_num_threads() // (world_size or 1))
    else:
        threads = check_int("threads_per_worker", threads_per_worker, minimum=1)
    return world_size, threads


def choose_split(clock: str, by: tuple[str, ...], split: str) -> str:
    """``"steps"`` for the realized clock without a source axis, else ``"queries"`` (``auto``)."""
    steps_ok = clock == "realized" and "source" not in by
    if split == "steps" and not steps_ok:
        raise ValueError(
            "split='steps' needs the realized clock without a 'source' axis (the momentum split and the "
            "adjoint carry state across the window); use split='queries' or 'auto'"
        )
    if split == "auto":
        return "steps" if steps_ok else "queries"
    return split


def shard_chunk(n_query: int, query_chunk: int, world: int) -> int:
    """Queries per chunk for a query split: the call's own, or smaller so that every rank gets a
    chunk. Shards hold whole chunks, because the quadrature refines a chunk as a whole: with the
    same chunks, every query's rows are what one process computes, to rounding."""
    if -(-n_query // query_chunk) >= world:
        return query_chunk
    return -(-n_query // world)


def plan_shards(
    kind: str, world: int, window: tuple[int, int], n_query: int, checkpoints: list[int], snap: float = 0.05,
    query_chunk: int | None = None,
) -> list[Shard]:
    """Contiguous, balanced shards. Step cuts fall on multiples of ``RESTART_EVERY`` (where the
    node controller restarts, so the shards make one sweep's node choices), preferring a
    checkpoint within ``snap`` of the window (or one restart period) of the balanced cut; in a
    window too short to hold such steps the cut is the balanced one, and the shards' node choices
    may then differ from one sweep's (results agree to the certificate's ``tol``, or to rounding
    with ``adaptive_nodes=False``). Query shards hold whole chunks of ``query_chunk`` queries.

    Raises:
        ValueError: fewer steps (or queries) than ranks.
    """
    if kind == "steps":
        a, b = window
        n = b - a
        if n < world:
            raise ValueError(f"cannot split {n} steps over world_size={world}; use fewer processes or split='queries'")
        cuts = [a]
        for k in range(1, world):
            target = a + round(k * n / world)
            # a cut at a multiple of RESTART_EVERY keeps the node choices of one sweep; among
            # those near the balanced cut, a checkpoint saves the rank replaying to its start
            ok = [c for c in range(cuts[-1] + 1, b - (world - k) + 1) if c % RESTART_EVERY == 0]
            near = [c for c in ok if abs(c - target) <= max(snap * n, RESTART_EVERY)]
            at_ckpt = [c for c in near if c in set(checkpoints)]
            pool = at_ckpt or near or ok
            cut = min(pool, key=lambda c: abs(c - target)) if pool else max(target, cuts[-1] + 1)
            cuts.append(cut)
        cuts.append(b)
        return [Shard("steps", r, world, cuts[r], cuts[r + 1]) for r in range(world)]
    if n_query < world:
        raise ValueError(f"cannot split {n_query} queries over world_size={world}; use fewer processes")
    chunk = query_chunk or 1
    n_chunks = -(-n_query // chunk)
    if n_chunks < world:
        raise ValueError(f"cannot split {n_chunks} query chunks over world_size={world} (see shard_chunk)")
    bounds = [min(n_query, chunk * round(r * n_chunks / world)) for r in range(world + 1)]
    return [Shard("queries", r, world, bounds[r], bounds[r + 1]) for r in range(world)]


# --------------------------------------------------------------------------- merge (pure)
def merge_parts(parts: list[dict], kind: str, resolve_query: bool) -> dict:
    """One process's sweep result from the shards' (in rank order).

    Each part is ``{"acc": [bin, row, comp, x], "cert": Certifier.snapshot(), "facts": {...}}``.
    ``"steps"``: ``acc`` summed, per-step records united. ``"queries"``: per-query rows
    concatenated (``resolve_query``) or summed; the window's end values concatenated over queries.
    """
    if len(parts) == 1:
        return parts[0]
    certs = [p["cert"] for p in parts]
    if kind == "steps":
        acc = _sum([p["acc"] for p in parts])
        cert: dict[str, Any] = {}
        for key in certs[0]:
            merged: dict = {}
            for c in certs:
                merged.update(c[key])
            cert[key] = merged
    else:
        rows = (lambda xs: torch.cat(xs, dim=0)) if resolve_query else _sum
        acc = torch.cat([p["acc"] for p in parts], dim=1) if resolve_query else _sum([p["acc"] for p in parts])
        steps = list(certs[0]["nodes_used"])
        cert = {
            "nodes_used": {s: max(c["nodes_used"][s] for c in certs) for s in steps},
            "kinks_seen": {s: sum(c["kinks_seen"].get(s, 0) for c in certs) for s in set().union(*(c["kinks_seen"] for c in certs))},
            "float64_steps": {s: True for c in certs for s in c.get("float64_steps", {})},
            "ends": {s: torch.cat([c["ends"][s] for c in certs], dim=0) for s in certs[0]["ends"]},
        }
        for key in ("step_measured", "step_attributed", "step_bound"):
            common = set.intersection(*(set(c.get(key, {})) for c in certs))
            cert[key] = {s: rows([c[key][s] for c in certs]) for s in sorted(common)}
    facts = merge_facts([p["facts"] for p in parts])
    return {"acc": acc, "cert": cert, "facts": facts}


def _sum(xs: list[Tensor]) -> Tensor:
    out = xs[0].clone()
    for x in xs[1:]:
        out += x
    return out


def merge_facts(facts: list[dict]) -> dict:
    """Sweep facts of the shards: the first's settings, the worst read-out error, every replay
    check, and each shard's sweep time in rank order (``shard_seconds``)."""
    out = dict(facts[0])
    out["shard_seconds"] = [f.get("seconds") for f in facts]
    errs = [f["readout_error"] for f in facts if f.get("readout_error") is not None]
    out["readout_error"] = max(errs) if errs else None
    mismatch: dict = {}
    for f in facts:
        for c, d in f.get("replay_mismatch", {}).items():
            mismatch[c] = max(d, mismatch.get(c, 0.0))
    out["replay_mismatch"] = mismatch
    return out


# --------------------------------------------------------------------------- running
def current_group(world_size: int | None) -> tuple[int, int] | None:
    """``(rank, world)`` of an initialised default process group, unless ``world_size=1`` asks
    for one process. Raises ``ValueError`` when ``world_size`` disagrees with the group."""
    if world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world_size is not None and world_size != world:
        raise ValueError(
            f"world_size={world_size} but a process group of {world} ranks is already initialised; "
            "leave world_size unset to use it"
        )
    return rank, world


def in_group(run_shard: Callable[[Shard], dict], shards: list[Shard], rank: int, gather: str, resolve_query: bool) -> dict | None:
    """This rank's shard, gathered over the initialised group (``all``: on every rank)."""
    import torch.distributed as dist

    part = run_shard(shards[rank])
    if gather == "all":
        parts: list = [None] * len(shards)
        dist.all_gather_object(parts, part)
    else:
        parts = [None] * len(shards) if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        if rank != 0:
            return None
    return merge_parts(parts, shards[0].kind, resolve_query)


def start_method(threads: int, device: Any) -> str:
    """``"fork"`` or ``"spawn"`` for the started workers.

    Fork (Linux, CPU, one thread per worker, CUDA not initialised) lets the workers inherit the
    caller's prepared job: no import and load (~4.5 s per worker on the 2-core machine), and the
    metric and components need not be picklable. With more than one thread per worker it is not
    safe: the OpenMP runtime of PyTorch's CPU builds does not survive a fork, and a forked child
    whose matrix products use two threads hangs (measured with torch 2.13). CUDA cannot be used
    in a forked child at all. Everything else spawns fresh interpreters.
    """
    import torch.multiprocessing as mp

    on_cpu = (device is None and not torch.cuda.is_available()) or (device is not None and torch.device(device).type == "cpu")
    if (
        sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods() and threads == 1 and on_cpu
        and not torch.cuda.is_initialized()
    ):
        return "fork"
    return "spawn"


def check_picklable(what: str, obj: Any) -> None:
    """Worker processes receive the call's arguments by pickle: say which one cannot travel."""
    try:
        pickle.dumps(obj)
    except Exception as err:  # noqa: BLE001 - any pickling failure means the same thing here
        raise TypeError(
            f"{what} cannot be sent to worker processes (world_size > 1 needs picklable arguments: a "
            f"module-level function, not a lambda or closure): {err}"
        ) from None


def spawn(
    run: Callable[[dict, Shard], dict], job_args: dict, shards: list[Shard], threads: int, resolve_query: bool,
    timeout_s: float = 1800.0, method: str = "spawn",
) -> dict:
    """Run every shard in its own worker process (gloo) and return the merged result.

    ``run(job_args, shard)`` (a module-level function) sweeps one shard in a worker and returns
    its partial result. With ``method="spawn"`` both are pickled (``run`` by reference); with
    ``"fork"`` (see :func:`start_method`) the worker inherits them.

    Raises:
        ExplainWorkerError: a worker died or raised; the message names its rank and shard.
    """
    import torch.multiprocessing as mp

    world = len(shards)
    with tempfile.TemporaryDirectory(prefix="explaind_tl_dist_") as tmp:
        out = Path(tmp) / "merged.pt"
        ctx = mp.start_processes(
            _worker,
            args=(run, world, str(Path(tmp) / "rendezvous"), job_args, shards, threads, str(out), resolve_query, timeout_s),
            nprocs=world,
            join=False,
            start_method=method,
        )
        try:
            while not ctx.join():
                pass
        except mp.ProcessRaisedException as err:
            raise ExplainWorkerError(f"explain worker {shards[err.error_index].describe()} raised:\n{err}") from None
        except mp.ProcessExitedException as err:
            raise ExplainWorkerError(
                f"explain worker {shards[err.error_index].describe()} died (exit code {err.exit_code}); "
                "rerun with the same world_size and resume_dir to continue from the finished shards"
            ) from None
        return torch.load(out, weights_only=False)  # written just now by our own rank 0, in our private temp dir


def _worker(
    rank: int, run: Callable[[dict, Shard], dict], world: int, rendezvous: str, job_args: dict, shards: list[Shard],
    threads: int, out: str, resolve_query: bool, timeout_s: float,
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        part = run(job_args, shards[rank])
        parts = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        if rank == 0:
            tmp = out + ".tmp"
            torch.save(merge_parts(parts, shards[0].kind, resolve_query), tmp)
            os.replace(tmp, out)
        # no rank tears its group down while another still talks to it (a worker that exited
        # right after its send aborted once in a clean-clone CI run: "terminate called without
        # an active exception", exit code -6)
        dist.barrier()
    finally:
        dist.destroy_process_group()
