"""What the layout must keep working: old import paths in run directories, options= beside the
keywords, the Trajectory methods resume uses, the single is_hooked_transformer, early stopping."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from conftest import modular_addition, tiny_config, tiny_model

from explaind_tl import ExplainOptions, Trajectory, TrajectoryRecorder, explain, train
from explaind_tl.errors import TrajectoryError
from explaind_tl.losses import last_token_cross_entropy
from explaind_tl.model import is_hooked_transformer
from explaind_tl.model.components import ComponentMap
from explaind_tl.model.readout import unsupported_reason
from explaind_tl.run.trust import IMPORT_ALIASES, aliased_import_path, resolve_import_path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("compat") / "run"
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with TrajectoryRecorder(model, opt, path, modular_addition(7), last_token_cross_entropy, checkpoint_every=3,
                            scheduler=sched) as rec:
        for _ in range(7):
            rec.step(None)
    return path


# ------------------------------------------------------------------ stored import paths
def test_aliases_translate_moved_paths():
    assert aliased_import_path("explaind_tl.tasks:last_token_cross_entropy") == "explaind_tl.losses:last_token_cross_entropy"
    assert aliased_import_path("explaind_tl.tasks:get_config") == "analyses.grokking.task:get_config"
    assert aliased_import_path("explaind_tl.losses:last_token_cross_entropy") == "explaind_tl.losses:last_token_cross_entropy"
    assert aliased_import_path("mypkg.models:factory") == "mypkg.models:factory"
    assert resolve_import_path("explaind_tl.tasks:last_token_cross_entropy") is last_token_cross_entropy
    for old, new in IMPORT_ALIASES.items():  # every alias leads somewhere that exists
        if ":" in old:
            assert resolve_import_path(old) is resolve_import_path(new), old
    with pytest.raises(TrajectoryError, match="cannot import"):
        resolve_import_path("explaind_tl.tasks:no_such_thing")


def test_run_recorded_under_an_old_loss_path_still_loads(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    man = json.loads((old / "manifest.json").read_text())
    assert man["loss_fn"] == "explaind_tl.losses:last_token_cross_entropy"
    man["loss_fn"] = "explaind_tl.tasks:last_token_cross_entropy"  # what a run before the move may name
    (old / "manifest.json").write_text(json.dumps(man))
    traj = Trajectory.load(old)
    assert traj.loss_fn is last_token_cross_entropy and traj.verify(progress=False).ok


# ------------------------------------------------------------------ options= and keywords
def test_options_and_keywords_are_the_same_call(run):
    traj = Trajectory.load(run)
    test = modular_addition(7)
    kw = dict(by=("step", "component"), components="head", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_kw = explain(traj, test, tol=1e-8, nodes=1, max_nodes=8, dtype=torch.float64, **kw)
        opts = ExplainOptions(tol=1e-8, nodes=1, max_nodes=8, dtype=torch.float64)
        by_opts = explain(traj, test, options=opts, **kw)
        # a keyword next to options replaces that field
        mixed = explain(traj, test, options=opts.replace(tol=1e-3), tol=1e-8, **kw)
    assert torch.equal(by_kw.values, by_opts.values) and torch.equal(by_kw.values, mixed.values)
    for key in ("tol", "nodes", "max_nodes", "dtype"):
        assert by_kw.meta[key] == by_opts.meta[key] == mixed.meta[key]
    with pytest.raises(TypeError, match="options must be an ExplainOptions"):
        explain(traj, test, options={"tol": 1e-8}, **kw)


# ------------------------------------------------------------------ Trajectory for resume
def test_trajectory_public_checkpoint_access(run):
    traj = Trajectory.load(run)
    ck = traj.checkpoint(3)
    assert set(traj.param_names) <= {k.split("/", 1)[1] for k in ck if k.startswith("param/")}
    assert any(k.startswith("optim/") for k in ck) and "rng/torch" in ck
    meta = traj.checkpoint_metadata(3)
    assert meta["step"] == "3" and meta["group"]["lr"] == pytest.approx(traj.hyperparameters(3)["lr"])
    assert meta.get("scheduler")  # encoded scheduler state
    model = traj.build_model()
    assert model.training == traj.manifest.get("model_training", True)
    traj.load_into(model, 6)
    assert all(torch.equal(p, traj.params_at(6)[n]) for n, p in model.named_parameters() if n in traj.param_names)
    assert set(traj.train_columns) >= {"tokens", "label", "id"}
    with pytest.raises(TrajectoryError, match="no checkpoint at step 4"):
        traj.checkpoint(4)


def test_resume_uses_only_public_trajectory_members():
    import ast
    import inspect

    from explaind_tl.run import recorder

    tree = ast.parse(inspect.getsource(recorder))
    private = sorted(
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
         and n.value.id == "traj" and n.attr.startswith("_")}
    )
    assert not private, f"the recorder reaches into Trajectory: {private}"


# ------------------------------------------------------------------ one is_hooked_transformer
def test_one_hooked_transformer_test_for_the_whole_seam():
    from transformer_lens import HookedTransformer

    class MyTransformer(HookedTransformer):
        pass

    torch.manual_seed(0)
    sub = MyTransformer(tiny_config(7))
    assert is_hooked_transformer(tiny_model()) and is_hooked_transformer(sub)
    assert not is_hooked_transformer(torch.nn.Linear(2, 2))

    class HookedTransformerLookalike(torch.nn.Module):  # a name alone is not enough
        cfg = tiny_config(7)

    assert not is_hooked_transformer(HookedTransformerLookalike())
    # a subclass gets the TransformerLens component partition ...
    assert ComponentMap.from_model(sub, "head").labels == ComponentMap.from_model(tiny_model(), "head").labels
    # ... but not the read-out forward, which re-implements HookedTransformer.forward
    assert "subclass" in unsupported_reason(sub) and unsupported_reason(tiny_model()) is None


# ------------------------------------------------------------------ train(stop_when=...)
def test_train_stops_early_and_reports_the_last_step(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def cb(step, m):
        calls.append(step)
        return {"step_seen": float(step)}

    traj = train(model, opt, modular_addition(7), last_token_cross_entropy, steps=20, run_dir=tmp_path / "run",
                 checkpoint_every=4, callback=cb, callback_every=3, progress=False,
                 stop_when=lambda step, m: step >= 7)
    assert traj.num_steps == 7 and traj.checkpoint_steps == [0, 4, 7]
    assert calls == [3, 6, 7]  # the early last step is reported once
    assert [row["step"] for row in traj.metrics] == [3, 6, 7]
    assert traj.verify(progress=False).ok
