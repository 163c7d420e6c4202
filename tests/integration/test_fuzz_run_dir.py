"""Hostile-input fuzzing of run directories (README "Threat model").

A tiny recorded run (3 checkpoints, 2 segments, a scheduler) is copied once per mutation and
mutated: byte flips, truncations, appended garbage, deleted and swapped files, manifest fields
of the wrong type, huge declared sizes and counts, path traversal, symlinks, garbage
manifests, and content rewritten with well-formed but wrong values. Half of the content
mutations recompute the checksums (an attacker does; checksums only catch corruption), so the
parsers behind them see hostile bytes too.

Every mutation must end in a ``TrajectoryError`` (``ChecksumError`` included) or load: never
another exception, a hang, a write anywhere in the sandbox, or code run from the data. A
mutation that loads is then replayed (``verify``) and resumed, which may only raise explaind_tl
errors. Seeded and bounded: ``N_MUTATIONS`` mutations, each under ``PER_MUTATION_S`` seconds.
"""

from __future__ import annotations

import base64
import collections
import faulthandler
import hashlib
import io
import json
import os
import random
import shutil
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from conftest import modular_addition, tiny_model

from explaind_tl import Trajectory, TrajectoryRecorder
from explaind_tl.errors import ChecksumError, ExplaindError, TrajectoryError
from explaind_tl.losses import last_token_cross_entropy

SEED = int(os.environ.get("EXPLAIND_FUZZ_SEED", 1729))  # other seeds for longer hunts, e.g. with N below
N_MUTATIONS = int(os.environ.get("EXPLAIND_FUZZ_N", 300))
PER_MUTATION_S = 10.0  # generous: a mutation takes ~0.03 s; a shared 2-core box may be 10x slower
HANG_KILL_S = 120.0  # faulthandler aborts the run (with tracebacks) instead of hanging the suite
P = 5


def _sched(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fuzz_base") / "run"
    model = tiny_model(p=P, d_model=8, d_head=2, n_heads=2, d_mlp=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    rec = TrajectoryRecorder(model, opt, run, modular_addition(P), last_token_cross_entropy, checkpoint_every=3,
                             scheduler=_sched(opt))
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        rec.step(torch.randperm(rec.num_train, generator=g)[:8])
    rec.close()
    (run / "recorder.lock").unlink()
    return run


# ------------------------------------------------------------------------------ helpers


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _man(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _put_man(run: Path, man: dict) -> None:
    (run / "manifest.json").write_text(json.dumps(man))


def _reseal(run: Path) -> None:
    man = _man(run)
    for e in man["checkpoints"] + man["segments"]:
        if (run / e["file"]).is_file():
            e["sha256"] = _sha(run / e["file"])
    for rel in man["train_data"]["files"]:
        p = run / man["train_data"]["path"] / rel
        if p.is_file():
            man["train_data"]["files"][rel] = _sha(p)
    _put_man(run, man)


def _files(run: Path) -> list[str]:
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())


def _data_files(run: Path) -> list[str]:
    return [f for f in _files(run) if f != "manifest.json"]


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[p.relative_to(root).as_posix()] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


WRONG = [None, True, False, -1, 0, 1.5, -2.5, "x", "", "../../etc/passwd", [], {}, [1, 2], {"a": 1}, 10**30, "0" * 64, [[[]]]]
HUGE = [10**9, 10**12, 2**62, 2**63, 10**30]


# ------------------------------------------------------------------------------ mutations
# each takes (rng, run, sandbox) and returns (description, expectation):
#   "checksum": must raise ChecksumError; "fail": must raise TrajectoryError; "any": may also load


def m_flip(rng, run, sb):
    f = rng.choice(_files(run))
    data = bytearray((run / f).read_bytes())
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] ^= rng.randint(1, 255)
    (run / f).write_bytes(bytes(data))
    if f == "manifest.json":
        return f"flip {f}", "any"
    if rng.random() < 0.5:
        _reseal(run)
        return f"flip+reseal {f}", "any"
    return f"flip {f}", "checksum"


def m_truncate(rng, run, sb):
    f = rng.choice(_files(run))
    data = (run / f).read_bytes()
    (run / f).write_bytes(data[: rng.randrange(len(data))])
    if f != "manifest.json" and rng.random() < 0.5:
        _reseal(run)
        return f"truncate+reseal {f}", "any"
    return f"truncate {f}", "fail"


def m_append(rng, run, sb):
    f = rng.choice(_files(run))
    with open(run / f, "ab") as fh:
        fh.write(b"\x00" + rng.randbytes(rng.randint(0, 4096)))
    if f == "manifest.json":
        return f"append {f}", "fail"
    if rng.random() < 0.5:
        _reseal(run)
        return f"append+reseal {f}", "any"
    return f"append {f}", "checksum"


def m_delete(rng, run, sb):
    f = rng.choice(_files(run) + ["checkpoints", "records", "train_data"])
    p = run / f
    shutil.rmtree(p) if p.is_dir() else p.unlink()
    return f"delete {f}", "fail"


def m_swap(rng, run, sb):
    a, b = rng.sample(_files(run), 2)
    da, db = (run / a).read_bytes(), (run / b).read_bytes()
    (run / a).write_bytes(db)
    (run / b).write_bytes(da)
    if "manifest.json" not in (a, b) and rng.random() < 0.5:
        _reseal(run)
        return f"swap+reseal {a} {b}", "any"
    return f"swap {a} {b}", "any" if da == db else "fail"


def _random_path(rng, obj):
    path = []
    while isinstance(obj, (dict, list)) and obj:
        key = rng.choice(list(obj)) if isinstance(obj, dict) else rng.randrange(len(obj))
        path.append(key)
        obj = obj[key]
        if rng.random() < 0.4:
            break
    return path


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def m_field_type(rng, run, sb):
    man = _man(run)
    path = _random_path(rng, man)
    value = rng.choice(WRONG)
    _set(man, path, value)
    _put_man(run, man)
    return f"field {path}={value!r:.30}", "any"


def m_huge(rng, run, sb):
    man = _man(run)
    h = rng.choice(HUGE)
    what = rng.choice(["num_steps", "num_train", "last_step", "consistent_steps", "seg_stop", "checkpoint_every",
                       "threads", "shape", "config", "many_checkpoints", "many_files"])
    if what == "num_steps":
        man["num_steps"] = h
    elif what == "num_train":
        man["num_train"] = h
    elif what == "last_step":
        man["checkpoints"][-1]["step"] = h
    elif what == "consistent_steps":
        man["num_steps"] = man["checkpoints"][-1]["step"] = man["segments"][-1]["stop"] = h
    elif what == "seg_stop":
        man["segments"][0]["stop"] = h
    elif what == "checkpoint_every":
        man["checkpoint_every"] = h
    elif what == "threads":
        man["torch_num_threads"] = h
    elif what == "shape":
        n = rng.choice(sorted(man["param_shapes"]))
        man["param_shapes"][n] = [h] * rng.randint(1, 3)
    elif what == "config":
        cfg = man["model"]["config"]
        k = rng.choice(["d_model", "d_vocab", "d_vocab_out", "n_ctx", "n_layers", "d_mlp", "n_heads", "d_head",
                        "num_experts", "n_key_value_heads", "rotary_dim"])
        cfg[k] = h
        if k == "num_experts":
            cfg["experts_per_token"] = 1
        if k == "rotary_dim":
            cfg["positional_embedding_type"] = "rotary"
        what += f".{k}"
    elif what == "many_checkpoints":  # a long, consistent list of checkpoints reusing one file
        c0 = man["checkpoints"][0]
        n = 1000
        man["checkpoints"] = [{**c0, "step": i} for i in range(n)]
        man["num_steps"] = n - 1
        man["segments"] = [{**man["segments"][0], "start": 0, "stop": n - 1}]
    else:
        man["train_data"]["files"].update({f"data-{i:05d}-of-99999.arrow": "0" * 64 for i in range(5000)})
    _put_man(run, man)
    return f"huge {what}={h}", "any" if what == "checkpoint_every" and h <= 2**62 else "fail"  # a mere interval


def _decoy(run, sb, rel):
    """An intact copy of ``run/rel`` outside the run directory."""
    dest = sb / "outside" / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = run / rel
    shutil.copytree(src, dest, dirs_exist_ok=True) if src.is_dir() else shutil.copy(src, dest)
    return dest


def m_traversal(rng, run, sb):
    man = _man(run)
    target = rng.choice(["checkpoint", "segment", "data_dir", "data_file"])
    if target == "checkpoint":
        entry = rng.choice(man["checkpoints"])
    elif target == "segment":
        entry = rng.choice(man["segments"])
    if target in ("checkpoint", "segment"):
        rel = entry["file"]
        dest = _decoy(run, sb, rel)
        style = rng.choice(["dotdot", "absolute", "inner-dotdot", "dot", "double-slash", "backslash", "url", "tilde", "nul"])
        value = {
            "dotdot": f"../outside/{rel}",
            "absolute": str(dest),
            "inner-dotdot": f"checkpoints/../../outside/{rel}",
            "dot": f"./{rel}",
            "double-slash": rel.replace("/", "//"),
            "backslash": rel.replace("/", "\\"),
            "url": f"file://{dest}",
            "tilde": f"~/{rel}",
            "nul": rel + "\x00.txt",
        }[style]
        entry["file"] = value
        expect = "fail" if style in ("dotdot", "absolute", "inner-dotdot", "url", "tilde", "nul") else "any"
    elif target == "data_dir":
        dest = _decoy(run, sb, man["train_data"]["path"])
        style = rng.choice(["dotdot", "absolute", "dot"])
        man["train_data"]["path"] = {"dotdot": "../outside/train_data", "absolute": str(dest), "dot": "."}[style]
        expect = "fail"
    else:
        files = man["train_data"]["files"]
        rel = rng.choice(sorted(files))
        dest = _decoy(run, sb, f"train_data/{rel}")
        style = rng.choice(["dotdot", "absolute"])
        files[{"dotdot": f"../../outside/train_data/{rel}", "absolute": str(dest)}[style]] = files.pop(rel)
        expect = "fail"
    _put_man(run, man)
    return f"traversal {target} {style}", expect


def m_symlink(rng, run, sb):
    style = rng.choice(["file-out", "dir-out", "manifest-out", "file-in", "dangling", "loop", "fifo"])
    f = rng.choice(_data_files(run))
    p = run / f
    if style == "file-out":
        dest = _decoy(run, sb, f)
        p.unlink()
        p.symlink_to(dest)
        return f"symlink {style} {f}", "fail"
    if style == "dir-out":
        d = rng.choice(["checkpoints", "records", "train_data"])
        dest = sb / "outside" / d
        dest.parent.mkdir(exist_ok=True)
        shutil.move(str(run / d), str(dest))
        (run / d).symlink_to(dest)
        return f"symlink {style} {d}", "fail"
    if style == "manifest-out":
        dest = _decoy(run, sb, "manifest.json")
        (run / "manifest.json").unlink()
        (run / "manifest.json").symlink_to(dest)
        return f"symlink {style}", "fail"
    if style == "file-in":
        other = rng.choice([g for g in _data_files(run) if g != f])
        p.unlink()
        p.symlink_to(os.path.relpath(run / other, p.parent))
        return f"symlink {style} {f}->{other}", "fail"  # content differs: checksum
    if style == "dangling":
        p.unlink()
        p.symlink_to(sb / "nowhere")
        return f"symlink {style} {f}", "fail"
    if style == "loop":
        p.unlink()
        p.symlink_to(p.name + ".loop")
        (p.parent / (p.name + ".loop")).symlink_to(p.name)
        return f"symlink {style} {f}", "fail"
    p.unlink()
    os.mkfifo(p)  # reading it would block forever
    return f"fifo {f}", "fail"


def m_manifest_garbage(rng, run, sb):
    style = rng.choice(["empty", "deep-list", "deep-dict", "binary", "null", "list", "number", "string", "minimal",
                        "sparse-huge", "directory", "fifo", "huge-int", "nan", "newer-version"])
    mp = run / "manifest.json"
    if style == "directory":
        mp.unlink()
        mp.mkdir()
    elif style == "fifo":
        mp.unlink()
        os.mkfifo(mp)
    elif style == "sparse-huge":
        with open(mp, "ab") as fh:
            fh.truncate(100 << 20)
    elif style == "nan":
        man = _man(run)
        for k in ("clip_grad_norm", "num_steps", "num_train"):
            man[k] = float(rng.choice(["nan", "inf", "-inf"]))
        mp.write_text(json.dumps(man))
    elif style == "newer-version":
        man = _man(run)
        man["format_version"] = rng.choice([3, 99, "2", 2.0, 0])
        mp.write_text(json.dumps(man))
    else:
        text = {
            "empty": "",
            "deep-list": "[" * 200_000 + "]" * 200_000,
            "deep-dict": '{"a":' * 100_000 + "1" + "}" * 100_000,
            "binary": rng.randbytes(512),
            "null": "null",
            "list": "[]",
            "number": "42",
            "string": '"manifest"',
            "minimal": '{"format": "explaind_tl.trajectory", "format_version": 2}',
            "huge-int": '{"format": "explaind_tl.trajectory", "format_version": ' + "1" * 100_000 + "}",
        }[style]
        mp.write_bytes(text if isinstance(text, bytes) else text.encode())
    return f"manifest {style}", "fail"


def m_state_tamper(rng, run, sb):
    data = run / "train_data"
    state = json.loads((data / "state.json").read_text())
    info = json.loads((data / "dataset_info.json").read_text())
    style = rng.choice(["data-outside", "data-absolute", "data-missing", "data-empty", "data-type", "image-feature",
                        "unknown-feature", "format-garbage", "drop-key", "info-garbage"])
    expect = "fail"
    arrow = state["_data_files"][0]["filename"]
    if style == "data-outside":
        _decoy(run, sb, f"train_data/{arrow}")
        state["_data_files"] = [{"filename": f"../../outside/train_data/{arrow}"}]
    elif style == "data-absolute":
        state["_data_files"] = [{"filename": str(_decoy(run, sb, f"train_data/{arrow}"))}]
    elif style == "data-missing":
        state["_data_files"] = [{"filename": "data-00001-of-00002.arrow"}]
    elif style == "data-empty":
        state["_data_files"] = []
    elif style == "data-type":
        state["_data_files"] = rng.choice([None, "x", [None], [{"filename": 3}], {"filename": arrow}])
    elif style == "image-feature":
        info["features"][rng.choice(sorted(info["features"]))] = {"_type": rng.choice(["Image", "Audio", "Video"])}
    elif style == "unknown-feature":
        info["features"]["label"] = {"_type": rng.choice(["Nonexistent", "Features", "fields", "np"])}
    elif style == "format-garbage":
        state["_format_type"] = rng.choice(["custom", "numpy", "nonsense", 3])
        state["_format_kwargs"] = rng.choice([{}, {"dtype": "float"}, {"device": "meta"}, "x"])
        expect = "any"
    elif style == "drop-key":
        state.pop(rng.choice(sorted(state)))
        expect = "any"
    else:
        info = rng.choice([None, [], "x", {"features": "x"}])
    (data / "state.json").write_text(json.dumps(state))
    (data / "dataset_info.json").write_text(json.dumps(info))
    _reseal(run)
    return f"state {style}", expect


def m_records_tamper(rng, run, sb):
    import pyarrow as pa
    import pyarrow.parquet as pq

    seg = rng.choice(_man(run)["segments"])
    path = run / seg["file"]
    t = pq.read_table(path).to_pydict()
    style = rng.choice(["drop-column", "str-lr", "shuffle-steps", "dup-step", "id-range", "id-negative", "ids-empty",
                        "nan-lr", "clip", "extra-row", "fewer-rows", "float-ids", "hp-type", "lr-values", "null-ids"])
    expect = "fail"
    n = len(t["step"])
    if style == "drop-column":
        t.pop(rng.choice(["step", "lr", "clip_factor", "loss", "batch_ids"]))
    elif style == "str-lr":
        t["lr"] = [str(x) for x in t["lr"]]
    elif style == "shuffle-steps":
        t["step"] = t["step"][::-1]
    elif style == "dup-step":
        t["step"] = [t["step"][0]] * n
    elif style == "id-range":
        t["batch_ids"][0] = [10**6]
    elif style == "id-negative":
        t["batch_ids"][0] = [-1]
    elif style == "ids-empty":
        t["batch_ids"][0] = []
    elif style == "nan-lr":
        t["lr"][0] = float(rng.choice(["nan", "inf"]))
    elif style == "clip":
        t["clip_factor"][0] = rng.choice([0.0, 2.0, -1.0])
    elif style == "extra-row":
        for k in t:
            t[k] = t[k] + t[k][-1:]
    elif style == "fewer-rows":
        for k in t:
            t[k] = t[k][:-1]
    elif style == "float-ids":
        t["batch_ids"][0] = [0.5]
    elif style == "hp-type":
        t["beta1"] = ["x"] * n
    elif style == "lr-values":  # well-formed, just other numbers: loads, replay shows the drift
        t["lr"] = [x * 3 for x in t["lr"]]
        expect = "any"
    else:
        t["batch_ids"] = [None] * n  # full batch: well-formed
        expect = "any"
    pq.write_table(pa.table(t), path)
    _reseal(run)
    return f"records {style}", expect


def m_checkpoint_tamper(rng, run, sb):
    from safetensors import safe_open
    from safetensors.torch import save_file

    man = _man(run)
    c = rng.choice(man["checkpoints"])
    path = run / c["file"]
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    style = rng.choice(["drop-param", "unknown-key", "reshape", "dtype", "rng", "drop-optim", "optim-shape", "scale",
                        "buffer-shape", "group-garbage", "group-params", "scheduler-garbage", "scheduler-keys",
                        "scheduler-pickle"])
    expect = "fail"
    params = sorted(k for k in tensors if k.startswith("param/"))
    if style == "drop-param":
        tensors.pop(rng.choice(params))
    elif style == "unknown-key":
        tensors["evil/x"] = torch.zeros(3)
    elif style == "reshape":
        k = rng.choice(params)
        tensors[k] = tensors[k].reshape(-1)[:-1].clone() if tensors[k].numel() > 1 else torch.zeros(2)
    elif style == "dtype":
        k = rng.choice(params)
        tensors[k] = tensors[k].double()
    elif style == "rng":
        tensors["rng/torch"] = torch.zeros(7, dtype=torch.uint8)
    elif style == "drop-optim":
        optim = sorted(k for k in tensors if k.startswith("optim/"))
        if optim:
            tensors.pop(rng.choice(optim))
        else:
            expect = "any"
    elif style == "optim-shape":
        optim = sorted(k for k in tensors if k.startswith("optim/exp_avg/"))
        if optim:
            tensors[rng.choice(optim)] = torch.zeros(1, 2, 3)
        else:
            expect = "any"
    elif style == "scale":  # well-formed, other numbers: loads, replay shows the drift
        k = rng.choice(params)
        tensors[k] = tensors[k] * 2
        expect = "any"
    elif style == "buffer-shape":
        bufs = sorted(k for k in tensors if k.startswith("buffer/"))
        if bufs:
            tensors[rng.choice(bufs)] = torch.zeros(2, 2)
        else:
            expect = "any"
    elif style == "group-garbage":
        meta["group"] = rng.choice(["{", "[]", '{"lr": "x", "betas": [0.5]}', '{"lr": {"a": 1}}', "null"])
        expect = "any"  # only read on resume
    elif style == "group-params":
        meta["group"] = '{"params": [1, 2]}'
        expect = "any"
    elif style == "scheduler-garbage":
        meta["scheduler"] = rng.choice(["{", "{}", '{"format": "x"}', "[1]", "UEsDBAAAAA=="])
        expect = "any"
    elif style == "scheduler-keys":
        meta["scheduler"] = json.dumps({"format": "explaind_tl.scheduler_state", "version": 1,
                                        "state": {"step": 3, "optimizer": "x", "last_epoch": "many"}})
        expect = "any"
    else:  # a pickle that runs code when loaded the old way
        buf = io.BytesIO()
        torch.save(_Payload(sb / "PWNED"), buf)
        meta["scheduler"] = base64.b64encode(buf.getvalue()).decode()
        expect = "any"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    _reseal(run)
    return f"checkpoint {style} step {c['step']}", expect


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


MUTATIONS = [
    (m_flip, 18), (m_truncate, 8), (m_append, 7), (m_delete, 5), (m_swap, 6), (m_field_type, 14), (m_huge, 8),
    (m_traversal, 8), (m_symlink, 6), (m_manifest_garbage, 5), (m_state_tamper, 5), (m_records_tamper, 5),
    (m_checkpoint_tamper, 6),
]  # fmt: skip


# ------------------------------------------------------------------------------ the test


def _run_pipeline(run: Path, sb: Path, before: dict, resume: bool) -> tuple[str, BaseException | None, list[str]]:
    """Load, then verify (and resume) what loaded. Returns (stage reached, its exception, problems)."""
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            traj = Trajectory.load(run)
        except Exception as e:  # noqa: BLE001 - classified by the caller
            return "load", e, problems
        try:
            traj.verify(progress=False)
        except Exception as e:  # noqa: BLE001
            return "verify", e, problems
        if _snapshot(sb) != before:
            problems.append("loading/replaying wrote into the sandbox")
        if not resume:
            return "verify", None, problems
        try:
            TrajectoryRecorder.resume(run, scheduler_factory=_sched).abort()
        except Exception as e:  # noqa: BLE001
            return "resume", e, problems
    return "resume", None, problems


def _outside(snapshot: dict) -> dict:
    return {k: v for k, v in snapshot.items() if k != "run" and not k.startswith("run/")}


def test_hostile_run_directories_end_in_trajectory_errors(base_run, tmp_path):
    rng = random.Random(SEED)
    funcs, weights = zip(*MUTATIONS)
    hist: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures: list[str] = []
    slowest = (0.0, "")
    t_all = time.perf_counter()
    for i in range(N_MUTATIONS):
        sb = tmp_path / f"m{i:03d}"
        run = sb / "run"
        shutil.copytree(base_run, run, symlinks=True)
        mutate = rng.choices(funcs, weights)[0]
        desc, expect = mutate(random.Random(rng.getrandbits(64)), run, sb)
        desc = f"#{i} {desc}"
        before = _snapshot(sb)
        faulthandler.dump_traceback_later(HANG_KILL_S, exit=True)
        t0 = time.perf_counter()
        try:
            # resuming reads the checkpoint metadata (scheduler state, param group): always after
            # checkpoint tampering, else for every 4th mutation (time)
            stage, exc, problems = _run_pipeline(run, sb, before, resume=mutate is m_checkpoint_tamper or i % 4 == 0)
        finally:
            faulthandler.cancel_dump_traceback_later()
        elapsed = time.perf_counter() - t0
        slowest = max(slowest, (elapsed, desc))
        outcome = f"{stage}: {'ok' if exc is None else type(exc).__name__}"
        hist[outcome] += 1
        by_kind[mutate.__name__[2:]][outcome] += 1
        failures += [f"{desc}: {p}" for p in problems]
        if exc is not None and not isinstance(exc, TrajectoryError if stage == "load" else ExplaindError):
            tb = "".join(traceback.format_exception(exc, limit=-4))
            failures.append(f"{desc}: {stage} raised {type(exc).__name__}: {str(exc)[:300]}\n{tb}")
        elif expect == "checksum" and not (stage == "load" and isinstance(exc, ChecksumError)):
            failures.append(f"{desc}: expected ChecksumError on load, got {stage}: {exc!r:.300}")
        elif expect == "fail" and not isinstance(exc, TrajectoryError):
            failures.append(f"{desc}: expected a TrajectoryError, got {stage}: {exc!r:.300}")
        if elapsed > PER_MUTATION_S:
            failures.append(f"{desc}: took {elapsed:.1f} s")
        if _outside(_snapshot(sb)) != _outside(before):
            failures.append(f"{desc}: files outside the run directory changed")
        if (sb / "PWNED").exists():
            failures.append(f"{desc}: code from the run directory ran")
        shutil.rmtree(sb, ignore_errors=True)
    total = time.perf_counter() - t_all
    print(f"\n{N_MUTATIONS} mutations in {total:.1f} s (slowest {slowest[0]:.2f} s: {slowest[1]})")
    for k, v in sorted(hist.items()):
        print(f"  {k:34s} {v}")
    for kind, c in sorted(by_kind.items()):
        print(f"  {kind:18s} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    assert not failures, f"{len(failures)} of {N_MUTATIONS} mutations misbehaved:\n" + "\n".join(failures[:25])
    # the mutations got past the checksums to the parsers, and some were harmless
    assert hist["load: ChecksumError"] and hist["load: TrajectoryError"] and hist["resume: ok"] and hist["resume: TrajectoryError"]
