"""Opening a run directory never runs code from it (README "Threat model").

Each test builds the hostile directory an attacker could share (a crafted pickle, a manifest
naming a callable or a tokenizer, a file named outside the run directory) with its checksums
recomputed, as an attacker would: checksums catch corruption, not tampering. Payloads create a
marker file, so a test also shows that nothing ran. Only the public API is used, plus
``explaind_tl.run.migrate`` for the migration of old directories.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import modular_addition, tiny_model

import explaind_tl
from explaind_tl import Trajectory, TrajectoryError, TrajectoryRecorder, explain
from explaind_tl.errors import ExplaindError
from explaind_tl.losses import last_token_cross_entropy

STEPS, K, BS = 6, 3, 16


def _sched(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)


def _record(run, steps=STEPS, scheduler=True, loss_fn=last_token_cross_entropy):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    rec = TrajectoryRecorder(model, opt, run, modular_addition(7), loss_fn, checkpoint_every=K,
                             scheduler=_sched(opt) if scheduler else None)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rec.step(torch.randperm(rec.num_train, generator=g)[:BS])
    rec.close()
    return model


# ---------------------------------------------------------------- tampering helpers (as an attacker)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _write_manifest(run: Path, man: dict) -> None:
    (run / "manifest.json").write_text(json.dumps(man, indent=1))


def _reseal(run: Path) -> None:
    """Recompute every checksum in the manifest (what an attacker does after editing files)."""
    man = _manifest(run)
    for e in man["checkpoints"] + man["segments"]:
        e["sha256"] = _sha(run / e["file"])
    data = run / man["train_data"]["path"]
    for rel in man["train_data"]["files"]:
        man["train_data"]["files"][rel] = _sha(data / rel)
    _write_manifest(run, man)


def _set_checkpoint_metadata(run: Path, file: str, **meta_update) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run / file
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(path))
    meta.update(meta_update)
    save_file(tensors, str(path), metadata=meta)


def _get_checkpoint_metadata(run: Path, file: str) -> dict:
    from safetensors import safe_open

    with safe_open(str(run / file), framework="pt") as f:
        return dict(f.metadata() or {})


class _Payload:
    """Unpickling it creates ``marker`` (``open(marker, "w")``): any code could run there."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_b64(obj) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _to_format_v1(run: Path) -> None:
    """Rewrite a run as explaind_tl format version 1 wrote it: scheduler state as a base64 pickle."""
    from explaind_tl.run.codec import decode_scheduler_state

    man = _manifest(run)
    for c in man["checkpoints"]:
        meta = _get_checkpoint_metadata(run, c["file"])
        if "scheduler" in meta:
            state = decode_scheduler_state(meta["scheduler"])
            _set_checkpoint_metadata(run, c["file"], scheduler=_pickle_b64(state))
    man["format_version"] = 1
    _write_manifest(run, man)
    _reseal(run)


# ---------------------------------------------------------------- pickles


@pytest.mark.parametrize("as_version_1", [False, True], ids=["as-recorded", "format-v1"])
def test_crafted_scheduler_pickle_does_not_run_on_resume(tmp_path, as_version_1):
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    _record(run)
    man = _manifest(run)
    if as_version_1:
        man["format_version"] = 1
        _write_manifest(run, man)
    _set_checkpoint_metadata(run, man["checkpoints"][-1]["file"], scheduler=_pickle_b64(_Payload(marker)))
    _reseal(run)
    with pytest.raises(TrajectoryError, match="pickle") as err:
        TrajectoryRecorder.resume(run, scheduler_factory=_sched)
    assert "explaind_tl.run.migrate" in str(err.value)
    assert not marker.exists()
    # loading (no resume) does not touch the scheduler state at all
    assert Trajectory.load(run).num_steps == STEPS
    assert not marker.exists()


def test_migration_refuses_a_crafted_pickle_and_changes_nothing(tmp_path):
    from explaind_tl.run import codec, format, migrate  # noqa: F401

    run, marker = tmp_path / "run", tmp_path / "PWNED"
    _record(run)
    _to_format_v1(run)
    last = _manifest(run)["checkpoints"][-1]["file"]
    _set_checkpoint_metadata(run, last, scheduler=_pickle_b64(_Payload(marker)))
    _reseal(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "recorder.lock"}
    with pytest.raises(TrajectoryError, match="cannot convert"):
        migrate.migrate_run_dir(run)
    assert not marker.exists()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "recorder.lock"} == before
    assert migrate.main([str(run)]) == 1  # the command reports it and fails
    assert not marker.exists()


def test_version_1_runs_load_and_resume_after_an_explicit_migration(tmp_path):
    from explaind_tl.run import codec, format, migrate  # noqa: F401

    ref_model = _record(tmp_path / "reference", steps=STEPS + 3)
    run = tmp_path / "run"
    _record(run)
    _to_format_v1(run)
    assert Trajectory.load(run).verify(progress=False).ok  # loading a v1 run needs no migration
    with pytest.raises(TrajectoryError, match="migrate"):
        TrajectoryRecorder.resume(run, scheduler_factory=_sched)
    from analyses.cli import main as cli_main

    assert cli_main(["migrate", str(run)]) == 0  # `explaind-tl migrate RUN_DIR`
    man = _manifest(run)
    assert man["format_version"] == format.FORMAT_VERSION == 2
    assert all(_get_checkpoint_metadata(run, c["file"])["scheduler"].startswith("{") for c in man["checkpoints"])
    assert Trajectory.load(run).verify(progress=False).ok  # checksums were updated
    assert migrate.migrate_run_dir(run).converted == []  # idempotent
    # the migrated scheduler state continues the run exactly like the uninterrupted reference
    rec = TrajectoryRecorder.resume(run, scheduler_factory=_sched)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randperm(rec.num_train, generator=g)[:BS] for _ in range(STEPS + 3)]
    for b in ids[STEPS:]:
        rec.step(b)
    rec.close()
    for (n, p), (_, q) in zip(rec.model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(p, q), n


def test_interrupted_migration_can_be_run_again(tmp_path, monkeypatch):
    from explaind_tl.run import codec, format, migrate  # noqa: F401

    run = tmp_path / "run"
    _record(run)
    _to_format_v1(run)
    real_replace, moved = os.replace, []

    def dies_on_second_checkpoint(src, dst, *a, **kw):
        if str(src).endswith(".migrate.tmp"):  # a converted checkpoint replacing the original
            if moved:
                raise OSError(28, "No space left on device")
            moved.append(dst)
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", dies_on_second_checkpoint)
    with pytest.raises(OSError):
        migrate.migrate_run_dir(run)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(moved) == 1 and _manifest(run)["format_version"] == 1
    with pytest.raises(TrajectoryError):  # half-migrated: the converted file no longer matches
        Trajectory.load(run)
    assert migrate.migrate_run_dir(run).format_version == 2  # the journal lets it finish
    assert not (run / "migration.json").exists()
    assert Trajectory.load(run).verify(progress=False).ok
    TrajectoryRecorder.resume(run, scheduler_factory=_sched).abort()


def test_explain_resume_snapshot_pickle_does_not_run(tmp_path):
    run, part, marker = tmp_path / "run", tmp_path / "part", tmp_path / "PWNED"
    _record(run, scheduler=False)
    part.mkdir()
    torch.save({"fingerprint": _Payload(marker)}, part / "explain_state.pt")
    with pytest.raises(TrajectoryError, match="pickle"):
        explain(run, modular_addition(7), by=("step",), resume_dir=part, progress=False)
    assert not marker.exists()


def test_explain_resume_snapshots_are_safetensors_and_old_ones_migrate(tmp_path):
    from explaind_tl.run import codec, format, migrate  # noqa: F401

    run, part = tmp_path / "run", tmp_path / "part"
    _record(run, scheduler=False)
    q = modular_addition(7)
    ref = explain(run, q, by=("step",), progress=False)
    first = explain(run, q, by=("step",), resume_dir=part, progress=False)
    assert sorted(p.name for p in part.iterdir()) == ["explain_state.safetensors"]
    again = explain(run, q, by=("step",), resume_dir=part, progress=False)  # resumes from the snapshot
    assert torch.equal(first.values, again.values) and torch.equal(ref.values, first.values)
    # a snapshot written by an older explaind_tl (a pickle of plain data) is converted explicitly
    state = codec.load_state(part / "explain_state.safetensors")
    (part / "explain_state.safetensors").unlink()
    torch.save(state, part / "explain_state.pt")
    with pytest.raises(TrajectoryError, match="migrate"):
        explain(run, q, by=("step",), resume_dir=part, progress=False)
    assert migrate.main([str(part)]) == 0
    assert sorted(p.name for p in part.iterdir()) == ["explain_state.safetensors"]
    assert torch.equal(explain(run, q, by=("step",), resume_dir=part, progress=False).values, ref.values)


def test_unstorable_scheduler_state_is_refused_when_recording_starts(tmp_path):
    from explaind_tl.errors import SchedulerStateError

    class Tag:  # an arbitrary object: storable only as a pickle
        pass

    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = _sched(opt)
    sched.tag = Tag()
    with pytest.raises(SchedulerStateError, match="JSON") as err:
        TrajectoryRecorder(model, opt, tmp_path / "run", modular_addition(7), last_token_cross_entropy, scheduler=sched)
    assert isinstance(err.value, ExplaindError) and isinstance(err.value, ValueError)
    assert "tag" in str(err.value)
    # functions in the state (lambdas) are left out: the scheduler_factory supplies them on resume
    del sched.tag
    sched.fn = lambda s: s
    rec = TrajectoryRecorder(model, opt, tmp_path / "run2", modular_addition(7), last_token_cross_entropy, scheduler=sched)
    rec.step(None)
    rec.close()
    assert TrajectoryRecorder.resume(tmp_path / "run2", scheduler_factory=_sched).scheduler.last_epoch == 1


# ---------------------------------------------------------------- manifest-chosen code

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("imported")  # importing this module already runs code

def loss(model, batch):
    from explaind_tl.losses import last_token_cross_entropy
    return last_token_cross_entropy(model, batch)

def build():
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model
    return tiny_model()
"""


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module (as any installed package is) whose import writes a marker."""
    marker = tmp_path / "PWNED"
    mods = tmp_path / "site"
    mods.mkdir()
    (mods / "evil_mod_sec.py").write_text(textwrap.dedent(EVIL.format(marker=str(marker), tests=str(Path(__file__).parent))))
    monkeypatch.syspath_prepend(str(mods))
    yield marker
    import sys

    sys.modules.pop("evil_mod_sec", None)


def test_manifest_loss_fn_outside_explaind_tl_needs_consent(tmp_path, evil_module):
    run = tmp_path / "run"
    _record(run, scheduler=False)
    man = _manifest(run)
    man["loss_fn"] = "evil_mod_sec:loss"
    _write_manifest(run, man)
    for attempt in (
        lambda: Trajectory.load(run),
        lambda: TrajectoryRecorder.resume(run),
        lambda: explain(str(run), modular_addition(7), by=("step",), progress=False),
    ):
        with pytest.raises(TrajectoryError) as err:
            attempt()
        msg = str(err.value)
        assert "evil_mod_sec:loss" in msg and "loss_fn=" in msg and "trust_remote_code=True" in msg, msg
        assert not evil_module.exists()
    # the callable passed in: nothing is imported
    assert Trajectory.load(run, loss_fn=last_token_cross_entropy).verify(progress=False).ok
    assert not evil_module.exists()
    # consent: the recorded path is imported
    traj = Trajectory.load(run, trust_remote_code=True)
    assert evil_module.exists() and traj.loss_fn.__module__ == "evil_mod_sec"
    assert explain(str(run), modular_addition(7), by=("step",), progress=False, trust_remote_code=True).values.numel() == STEPS
    rec = TrajectoryRecorder.resume(run, trust_remote_code=True)
    rec.abort()


def test_manifest_model_factory_needs_consent(tmp_path, evil_module):
    run = tmp_path / "run"
    _record(run, scheduler=False)
    man = _manifest(run)
    man["model"] = {"kind": "factory", "factory": "evil_mod_sec:build", "class": "HookedTransformer"}
    _write_manifest(run, man)
    with pytest.raises(TrajectoryError, match="model_factory=") as err:
        Trajectory.load(run)
    assert "trust_remote_code=True" in str(err.value)
    with pytest.raises(TrajectoryError, match="model_factory="):
        TrajectoryRecorder.resume(run)
    assert not evil_module.exists()
    assert Trajectory.load(run, model_factory=tiny_model).verify(progress=False).ok
    assert not evil_module.exists()
    assert Trajectory.load(run, trust_remote_code=True).verify(progress=False).ok
    assert evil_module.exists()


@pytest.mark.parametrize("path", ["os:system", "builtins:exec", "explaind_tl.losses:torch.load", "explaind_tl.storage:write_json"])
def test_only_explaind_tl_builtin_callables_resolve_automatically(tmp_path, path):
    run = tmp_path / "run"
    _record(run, scheduler=False)
    man = _manifest(run)
    man["loss_fn"] = path
    _write_manifest(run, man)
    with pytest.raises(TrajectoryError, match="trust_remote_code"):
        Trajectory.load(run)
    from explaind_tl.run.trust import is_builtin_import_path

    assert not is_builtin_import_path(path)


def test_builtin_losses_keep_resolving(tmp_path):
    """Built-ins resolve without consent, also under the names older runs recorded them with
    (``explaind_tl.tasks`` moved out of the library); the rest of a moved module does not."""
    from explaind_tl import losses
    from explaind_tl.run.trust import is_builtin_import_path

    assert is_builtin_import_path("explaind_tl.losses:last_token_cross_entropy")
    assert is_builtin_import_path("explaind_tl.tasks:last_token_cross_entropy")  # an old run's name
    assert not is_builtin_import_path("explaind_tl.tasks:get_config")  # now analyses.grokking.task
    assert not is_builtin_import_path(None) and not is_builtin_import_path("explaind_tl.losses:_x")
    _record(tmp_path / "run", steps=2, scheduler=False, loss_fn=losses.last_token_cross_entropy)
    man = _manifest(tmp_path / "run")
    assert man["loss_fn"] == "explaind_tl.losses:last_token_cross_entropy"
    traj = Trajectory.load(tmp_path / "run")  # no loss_fn, no trust needed
    assert traj.loss_fn is losses.last_token_cross_entropy and traj.verify(progress=False).ok
    man["loss_fn"] = "explaind_tl.tasks:last_token_cross_entropy"  # as recorded before the move
    _write_manifest(tmp_path / "run", man)
    assert Trajectory.load(tmp_path / "run").loss_fn is losses.last_token_cross_entropy


def test_tokenizer_in_model_config_needs_consent(tmp_path):
    run = tmp_path / "run"
    _record(run, scheduler=False)
    man = _manifest(run)
    man["model"]["config"].update(tokenizer_name="attacker/repo-with-code", trust_remote_code=True)
    _write_manifest(run, man)
    with pytest.raises(TrajectoryError, match="tokenizer") as err:
        Trajectory.load(run)  # would fetch the tokenizer and run its code
    assert "trust_remote_code=True" in str(err.value) and "model_factory=" in str(err.value)
    assert Trajectory.load(run, model_factory=tiny_model).verify(progress=False).ok


# ---------------------------------------------------------------- paths


def _outside_copy(run: Path, rel: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / rel, dest)
    return dest


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked-dir"])
def test_files_named_by_the_manifest_stay_inside(tmp_path, how):
    """The manifest points at an intact copy outside the run dir: refused, although it would load."""
    run = tmp_path / "run"
    _record(run, scheduler=False)
    man = _manifest(run)
    rel = man["checkpoints"][-1]["file"]
    outside = _outside_copy(run, rel, tmp_path / "elsewhere" / "step.safetensors")
    if how == "dotdot":
        man["checkpoints"][-1]["file"] = "checkpoints/../../elsewhere/step.safetensors"
    elif how == "absolute":
        man["checkpoints"][-1]["file"] = str(outside)
    elif how == "symlink":
        (run / rel).unlink()
        (run / rel).symlink_to(outside)
    else:
        shutil.move(str(run / "checkpoints"), str(tmp_path / "elsewhere" / "checkpoints"))
        (run / "checkpoints").symlink_to(tmp_path / "elsewhere" / "checkpoints")
    _write_manifest(run, man)
    with pytest.raises(TrajectoryError, match="outside the run directory|relative path"):
        Trajectory.load(run)


def test_training_set_state_may_not_name_files_outside(tmp_path):
    run = tmp_path / "run"
    _record(run, scheduler=False)
    data = run / "train_data"
    arrow = next(p.name for p in data.iterdir() if p.suffix == ".arrow")
    outside = _outside_copy(data, arrow, tmp_path / "elsewhere" / "data.arrow")
    state = json.loads((data / "state.json").read_text())
    state["_data_files"] = [{"filename": str(outside)}]
    (data / "state.json").write_text(json.dumps(state))
    _reseal(run)
    with pytest.raises(TrajectoryError, match="_data_files"):
        Trajectory.load(run)


def test_media_columns_are_not_decoded(tmp_path):
    """An Image column would make datasets open the path (or URL) each row names, on loading."""
    import datasets

    run = tmp_path / "run"
    _record(run, scheduler=False)
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(b"not for the run directory")
    ds = datasets.Dataset.from_dict(datasets.load_from_disk(str(run / "train_data"))[:])
    ds = ds.add_column("img", [str(secret)] * len(ds)).cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "with_image"))
    shutil.rmtree(run / "train_data")
    shutil.copytree(tmp_path / "with_image", run / "train_data")
    man = _manifest(run)
    man["train_data"]["files"] = {p.name: "0" * 64 for p in (run / "train_data").iterdir()}
    _write_manifest(run, man)
    _reseal(run)
    with pytest.raises(TrajectoryError, match="Image"):
        Trajectory.load(run)


# ---------------------------------------------------------------- declared sizes


@pytest.mark.parametrize("field", ["num_steps", "num_train", "d_model", "param_shapes"])
def test_huge_declared_sizes_are_refused_before_allocating(tmp_path, field):
    run = tmp_path / "run"
    _record(run, scheduler=False)
    man = _manifest(run)
    huge = 10**12
    if field == "num_steps":  # consistent everywhere in the manifest, only the files cannot hold it
        man["num_steps"] = man["checkpoints"][-1]["step"] = man["segments"][-1]["stop"] = huge
    elif field == "num_train":
        man["num_train"] = huge
    elif field == "d_model":
        man["model"]["config"]["d_model"] = huge
    else:
        name = man["param_names"][0]
        man["param_shapes"][name] = [huge, huge]
    _write_manifest(run, man)
    with pytest.raises(TrajectoryError, match="more|at least|larger"):
        Trajectory.load(run)


def test_threat_model_is_documented():
    readme = (Path(explaind_tl.__file__).parent.parent / "README.md").read_text()
    assert "## Threat model" in readme and "trust_remote_code" in readme and "explaind_tl.run.migrate" in readme
    assert os.path.exists(Path(explaind_tl.__file__).parent / "run" / "migrate.py")
