"""Devices and deterministic kernels: what a run records about where it ran, and how replay uses it.

On the CPU (every machine, CI included) the deterministic mode is opt-in; what it does is tested
here with loss functions that watch PyTorch's flag, and with a constructed op that, like PyTorch's
scatter-add kernels on a GPU, has no deterministic implementation. The GPU tests at the end run
only where CUDA is available: a run recorded on the GPU replays bitwise there, and explain on
the GPU agrees with explain on the CPU.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import assert_close_scaled, modular_addition, modular_data, tiny_model

from explaind_tl import explain
from explaind_tl.errors import NondeterministicTrainingError, TrajectoryError
from explaind_tl.losses import last_token_cross_entropy
from explaind_tl.run.recorder import TrajectoryRecorder
from explaind_tl.run.trajectory import ReplayMismatchWarning, Trajectory

SEEN: list[bool] = []
TORCH_MESSAGE = (
    "scatter_add_cuda_kernel does not have a deterministic implementation, but you set "
    "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation"
)


def watching_loss(model, batch):
    """The built-in loss, noting whether deterministic algorithms are on."""
    SEEN.append(torch.are_deterministic_algorithms_enabled())
    return last_token_cross_entropy(model, batch)


class _AtomicBackward(torch.autograd.Function):
    """Identity whose backward, like a GPU scatter-add, has no deterministic kernel."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if torch.are_deterministic_algorithms_enabled():
            raise RuntimeError(TORCH_MESSAGE)
        return g


def atomic_loss(model, batch):
    logits = model(batch["tokens"])[:, -1]
    return torch.nn.functional.cross_entropy(_AtomicBackward.apply(logits), batch["label"], reduction="none")


def record(run, loss_fn, steps=4, **kw):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    rec = TrajectoryRecorder(model, opt, run, modular_addition(7), loss_fn, checkpoint_every=2, **kw)
    for _ in range(steps):
        rec.step()
    rec.close()
    return model


@pytest.mark.parametrize("deterministic", [None, True])
def test_device_and_deterministic_mode_are_recorded_and_replayed(tmp_path, deterministic):
    SEEN.clear()
    record(tmp_path / "run", watching_loss, deterministic=deterministic)
    on = bool(deterministic)  # default on the CPU: off
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["device"] == "cpu" and man["deterministic"] is on
    assert SEEN and set(SEEN) == {on}  # the probe and every step
    assert not torch.are_deterministic_algorithms_enabled()  # restored
    SEEN.clear()
    traj = Trajectory.load(tmp_path / "run", loss_fn=watching_loss)
    assert traj.device == torch.device("cpu") and traj.deterministic is on
    report = traj.verify(progress=False)
    assert report.ok and SEEN and set(SEEN) == {on}
    assert not torch.are_deterministic_algorithms_enabled()


def test_an_op_without_a_deterministic_kernel_is_refused_and_nothing_changes(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", modular_addition(7), atomic_loss, deterministic=True)
    with pytest.raises(NondeterministicTrainingError, match="scatter_add_cuda_kernel does not have a deterministic"):
        rec.step()
    assert rec.num_steps == 0 and not torch.are_deterministic_algorithms_enabled()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    rec.close()
    # the same loss without the mode records (CPU default): the refusal came from the mode
    record(tmp_path / "run2", atomic_loss, steps=1)


def test_bad_deterministic_argument(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    from explaind_tl.errors import RecordingError

    with pytest.raises(RecordingError, match="deterministic must be"):
        TrajectoryRecorder(model, opt, tmp_path / "run", modular_addition(7), last_token_cross_entropy,
                           deterministic="yes")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def _edit_manifest(run, **fields):
    path = run / "manifest.json"
    man = json.loads(path.read_text())
    man.update(fields)
    path.write_text(json.dumps(man))


@pytest.mark.parametrize("field,value", [("device", "tpu"), ("device", 3), ("deterministic", "yes")])
def test_manifest_device_fields_are_validated(tmp_path, field, value):
    record(tmp_path / "run", last_token_cross_entropy, steps=2)
    _edit_manifest(tmp_path / "run", **{field: value})
    with pytest.raises(TrajectoryError, match=field):
        Trajectory.load(tmp_path / "run")


def test_replay_device_argument(tmp_path):
    record(tmp_path / "run", last_token_cross_entropy, steps=2)
    with pytest.raises(TypeError, match="device must be"):
        Trajectory.load(tmp_path / "run", device=0)
    traj = Trajectory.load(tmp_path / "run", device="cpu")
    assert traj.params_at(1)["embed.W_E"].device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_run_on_a_machine_without_gpu_replays_on_cpu_with_a_warning(tmp_path):
    run = tmp_path / "run"
    record(run, last_token_cross_entropy, steps=4)
    _edit_manifest(run, device="cuda", deterministic=True)  # as a GPU recording would say
    with pytest.warns(ReplayMismatchWarning, match="recorded on a GPU and no GPU is available"):
        traj = Trajectory.load(run)
    assert traj.device.type == "cpu" and traj.recorded_device == "cuda"
    assert traj.verify(progress=False).ok  # (it was really recorded on the CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReplayMismatchWarning)
        with pytest.raises(TrajectoryError, match="recorded on cuda; resume it with the model on cuda"):
            TrajectoryRecorder.resume(run, model=tiny_model())


# ----------------------------------------------------------------------------- GPU only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_gpu_recording_replays_bitwise(tmp_path):
    model = tiny_model().to("cuda", print_details=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", modular_addition(7), last_token_cross_entropy,
                             checkpoint_every=3)
    for _ in range(6):
        rec.step()
    rec.close()
    traj = Trajectory.load(tmp_path / "run")
    assert traj.device.type == "cuda" and traj.deterministic
    assert traj.verify(progress=False).ok
    attr = explain(traj, modular_addition(7), by=("step", "component"), components="head", progress=False,
                   device="cuda")
    assert attr.completeness.ok


@cuda
def test_explain_on_gpu_equals_cpu_in_float64(tmp_path):
    model = tiny_model(dtype=torch.float64)
    train, test = modular_data(7, 30, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.5)
    rec = TrajectoryRecorder(model, opt, tmp_path / "run", train, last_token_cross_entropy, checkpoint_every=5)
    for _ in range(10):
        rec.step()
    rec.close()
    traj = Trajectory.load(tmp_path / "run")
    kw = dict(by=("step", "component", "query"), components="head", progress=False)
    cpu, gpu = explain(traj, test, device="cpu", **kw), explain(traj, test, device="cuda", **kw)
    assert gpu.meta["device"].startswith("cuda")
    assert_close_scaled(gpu.values, cpu.values, 1e-10)
