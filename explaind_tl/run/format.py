"""What a run directory holds, and how it is encoded (docs/design.md §5).

::

    run_dir/
      manifest.json                          the commit point: lists only complete files
      checkpoints/step_00000100.safetensors  param/{name}, optim/{key}/{name}, rng/torch;
                                             frozen/{name}, buffer/{name} in step 0 only;
                                             metadata: step, group (JSON), scheduler (JSON)
      records/steps_00000000_00000100.parquet step, lr, clip_factor, loss, batch_ids, hparams
      train_data/                            datasets.save_to_disk, integer column "id"
      metrics.csv                            optional, written by explaind_tl.train

The writer (:mod:`explaind_tl.run.recorder`) and the reader (:mod:`explaind_tl.run.trajectory`)
both go through this module, so the two sides of every encoding sit next to each other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from explaind_tl.errors import TrajectoryError
from explaind_tl.run import storage

FORMAT = "explaind_tl.trajectory"
FORMAT_VERSION = 2
"""Version written by this explaind_tl. 2: scheduler state as JSON (1: as a base64 pickle)."""
READABLE_FORMAT_VERSIONS = (1, 2)
"""Versions :func:`validate_manifest` accepts (version 1 loads; resuming one with a scheduler
needs :func:`migrate_run_dir`)."""
MANIFEST = "manifest.json"
EXPLAIN_STATE = "explain_state.safetensors"
LEGACY_EXPLAIN_STATE = "explain_state.pt"
MIGRATION_JOURNAL = "migration.json"

MAX_MANIFEST_BYTES = 64 << 20
MAX_SMALL_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 64
MAX_THREADS = 1024
DEVICE_TYPES = ("cpu", "cuda")  # where a run may be recorded (manifest "device")
MAX_DIM = 1 << 40
ROWS_PER_RECORD_BYTE = 16
"""A segment of ``n`` steps needs a parquet file of at least ``n / 16`` bytes (a recorded one
holds a distinct int64 step per row: ~8 bytes before compression)."""

SCHEDULER_FORMAT = "explaind_tl.scheduler_state"
STATE_FORMAT = "explaind_tl.explain_state"

MIGRATE_HINT = (
    "if you trust this directory, convert it once with `python -m explaind_tl.run.migrate {path}` "
    "(or explaind_tl.run.migrate.migrate_run_dir); it never runs code either, but only migrate what you trust"
)
DATA_DIR = "train_data"
METRICS = "metrics.csv"
CHECKPOINT_DIR = "checkpoints"
RECORDS_DIR = "records"
# names of the files a run directory holds (regular expressions; everything else is the user's)
CHECKPOINT_FILE = r"step_\d{8}\.safetensors"
RECORDS_FILE = r"steps_\d{8}_\d{8}\.parquet"
DATASET_FILE = r"data-\d{5}-of-\d{5}\.arrow|dataset_info\.json|state\.json"

Params = dict[str, Tensor]
State = dict[str, dict[str, Tensor]]


def checkpoint_name(step: int) -> str:
    """Path of the checkpoint of ``step``, relative to the run directory."""
    return f"{CHECKPOINT_DIR}/step_{step:08d}.safetensors"


def records_name(start: int, stop: int) -> str:
    """Path of the step records of ``[start, stop)``, relative to the run directory."""
    return f"{RECORDS_DIR}/steps_{start:08d}_{stop:08d}.parquet"


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------



def read_our_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The manifest if ``run_dir`` holds one in our format (unchecked otherwise), else ``None``."""
    try:
        man = storage.read_json(run_dir / MANIFEST)
    except TrajectoryError:
        return None
    return man if isinstance(man, dict) and man.get("format") == FORMAT else None


def package_versions() -> dict[str, str | None]:
    """Versions of torch, transformer_lens, datasets, safetensors and explaind_tl."""
    from importlib import metadata

    from explaind_tl._version import __version__

    out: dict[str, str | None] = {"torch": torch.__version__, "explaind_tl": __version__}
    for pkg in ("transformer_lens", "datasets", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def group_hparams(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The plain settings of the optimizer's (single) param group."""
    g = opt.param_groups[0]
    return {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, type(None), tuple, list, str))}


def checkpoint_metadata(step: int, optimizer: torch.optim.Optimizer, scheduler_state: str | None = None) -> dict[str, str]:
    """The safetensors metadata of a checkpoint: step, param group settings and the scheduler
    state, already encoded as JSON (:func:`explaind_tl.run.codec.encode_scheduler_state`)."""
    meta = {"step": str(step), "group": json.dumps(storage.to_jsonable(group_hparams(optimizer)))}
    if scheduler_state is not None:
        meta["scheduler"] = scheduler_state
    return meta



def initial_tensors(model: nn.Module) -> dict[str, Tensor]:
    """What only the step-0 checkpoint holds: frozen parameters and buffers."""
    out = {f"frozen/{n}": p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    out.update({f"buffer/{n}": b.detach() for n, b in model.named_buffers()})
    return out


def restore_initial(model: nn.Module, init: Mapping[str, Tensor]) -> None:
    """Copy the frozen parameters and buffers of the step-0 checkpoint ``init`` into ``model``."""
    named = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, t in init.items():
            kind, _, n = key.partition("/")
            if kind == "frozen":
                named[n].copy_(t)
            elif kind == "buffer" and n in buffers:
                buffers[n].copy_(t)


def checkpoint_params(ck: Mapping[str, Tensor], names: list[str]) -> Params:
    """The trainable parameters of a checkpoint (clones)."""
    return {n: ck[f"param/{n}"].clone() for n in names}


def checkpoint_optimizer_tensors(ck: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The optimizer entries of a checkpoint, keyed as ``optimizer_state_to_tensors`` writes them."""
    return {k[len("optim/") :]: v for k, v in ck.items() if k.startswith("optim/")}


def checkpoint_state(ck: Mapping[str, Tensor]) -> State:
    """The optimizer state of a checkpoint by key: ``{"exp_avg": {name: T}, ...}`` (clones)."""
    out: State = {}
    for k, v in checkpoint_optimizer_tensors(ck).items():
        key, _, name = k.partition("/")
        out.setdefault(key, {})[name] = v.clone()
    return out


# --------------------------------------------------------------------------------------------
# step records
# --------------------------------------------------------------------------------------------


def write_records(path: Path, records: list[dict[str, Any]], hparam_columns: tuple[str, ...]) -> None:
    """Write the step records of one segment as parquet (atomically).

    Each record holds ``step``, ``lr``, ``clip_factor``, ``loss``, ``batch_ids`` (a list, or
    ``None`` for the full batch) and the hyper-parameter columns of the optimizer kind.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {
        "step": pa.array([r["step"] for r in records], pa.int64()),
        "lr": pa.array([r["lr"] for r in records], pa.float64()),
        "clip_factor": pa.array([r["clip_factor"] for r in records], pa.float64()),
        "loss": pa.array([r["loss"] for r in records], pa.float64()),
        "batch_ids": pa.array([r["batch_ids"] for r in records], pa.list_(pa.int64())),
    }
    # the hyper-parameters each step used (schedulers and hand edits may change them)
    for c in hparam_columns:
        cols[c] = pa.array([r[c] for r in records], pa.float64())
    with storage.atomic_path(path) as tmp:
        pq.write_table(pa.table(cols), str(tmp))


def read_records(path: Path) -> dict[str, list]:
    """The columns of a step-records file (hyper-parameter columns only where recorded).

    Raises:
        TrajectoryError: the file cannot be read (truncated or corrupted).
    """
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pydict()
    except Exception as exc:
        raise TrajectoryError(f"cannot read step records {path} (truncated or corrupted?): {exc}") from exc
