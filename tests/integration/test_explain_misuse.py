"""Misuse of ``explain`` is refused early and clearly; the certificate says when it fails.

Argument checks run against a guarded trajectory that fails the test if a model is built or a
segment replayed before the error; query checks may build the model but never replay.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import modular_addition, tiny_model

from explaind_tl import Trajectory, TrajectoryRecorder, explain
from explaind_tl.attribution import Attribution, Completeness
from explaind_tl.errors import (
    CertificateError,
    CertificateWarning,
    ExplaindError,
    QueryError,
    TrajectoryError,
)
from explaind_tl.losses import last_token_cross_entropy

P = 7


def _record(path, lr: float, steps: int = 6):
    data = modular_addition(P)
    train = {k: v[:30] for k, v in data.items()}
    model = tiny_model(P)  # ReLU
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    with TrajectoryRecorder(model, opt, path, train, last_token_cross_entropy, checkpoint_every=3) as rec:
        for _ in range(steps):
            rec.step(torch.arange(30))
    return Trajectory.load(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A gentle run (certificate met in float64) and a violent one (lr 0.3, ReLU)."""
    root = tmp_path_factory.mktemp("misuse")
    data = modular_addition(P)
    test = {k: v[30:40] for k, v in data.items()}
    return _record(root / "gentle", lr=1e-2), _record(root / "violent", lr=0.3), test


class _Guard:
    """A trajectory that fails the test when work starts before an argument error."""

    def __init__(self, traj, allow_model: bool) -> None:
        self._traj, self._allow_model = traj, allow_model

    def __getattr__(self, name):
        return getattr(self._traj, name)

    def model(self, *args, **kwargs):
        assert self._allow_model, "explain built the model before refusing an argument"
        return self._traj.model(*args, **kwargs)

    def segments(self, *args, **kwargs):
        raise AssertionError("explain started replaying before refusing an argument")


F64 = dict(dtype=torch.float64, progress=False)

# ----------------------------------------------------------------------------- arguments
BAD_ARGS = [
    (dict(by=None), TypeError, "by must be"),
    (dict(by={"step"}), TypeError, "by must be"),
    (dict(by=("step", 3)), TypeError, "axis names"),
    (dict(by=("step", "time")), ValueError, "unknown axes"),
    (dict(steps=(0.5, 3)), TypeError, "steps"),
    (dict(steps=(1,)), TypeError, "pair"),
    (dict(steps=3), TypeError, "pair"),
    (dict(steps=(True, 3)), TypeError, "steps"),
    (dict(step_bins=0, by=("step",)), ValueError, "step_bins"),
    (dict(step_bins=2.5, by=("step",)), TypeError, "step_bins"),
    (dict(step_bins=2, by=("component",)), ValueError, "'step' is not in by"),
    (dict(reduce="avg"), ValueError, "reduce"),
    (dict(reduce=None), ValueError, "reduce"),
    (dict(components="heads"), ValueError, "granularity"),
    (dict(components=3), TypeError, "components"),
    (dict(query_chunk=0), ValueError, "query_chunk"),
    (dict(query_chunk=1.5), TypeError, "query_chunk"),
    (dict(train_chunk=-1), ValueError, "train_chunk"),
    (dict(progress="yes"), TypeError, "progress"),
    (dict(fast_forward=1), TypeError, "fast_forward"),
    (dict(strict=None), TypeError, "strict"),
    (dict(adaptive_nodes="no"), TypeError, "adaptive_nodes"),
    (dict(kink_aware="yes"), TypeError, "kink_aware"),
    (dict(position=1.0), TypeError, "position"),
    (dict(position=True), TypeError, "position"),
    (dict(metric=3), TypeError, "metric"),
    (dict(device="nonsense"), ValueError, "device"),
    (dict(resume_dir=3), TypeError, "resume_dir"),
    (dict(train_grads="fast"), ValueError, "train_grads"),
    # tolerance and node counts (tol=nan used to switch refinement off silently)
    (dict(tol=math.nan), ValueError, "tol"),
    (dict(tol=math.inf), ValueError, "tol"),
    (dict(tol=0.0), ValueError, "tol"),
    (dict(tol=-1e-6), ValueError, "tol"),
    (dict(tol="1e-6"), TypeError, "tol"),
    (dict(tol=True), TypeError, "tol"),
    (dict(nodes=0), ValueError, "nodes"),
    (dict(nodes=1.5), TypeError, "nodes"),
    (dict(nodes=True), TypeError, "nodes"),
    (dict(max_nodes=math.inf), TypeError, "max_nodes"),
    (dict(max_nodes=math.nan), TypeError, "max_nodes"),
    (dict(max_nodes=16.0), TypeError, "max_nodes"),
    (dict(nodes=4, max_nodes=2), ValueError, "nodes <= max_nodes"),
    # half precision: the certificate needs float32 or float64
    (dict(dtype=torch.float16), ValueError, "float32 or float64"),
    (dict(dtype=torch.bfloat16), ValueError, "float32 or float64"),
    (dict(dtype="float64"), TypeError, "dtype"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_ARGS, ids=[repr(k) for k, _, _ in BAD_ARGS])
def test_bad_arguments_refused_before_any_work(runs, kwargs, error, match):
    gentle, _, test = runs
    kw = {"progress": False, **kwargs}
    with pytest.raises(error, match=match):
        explain(_Guard(gentle, allow_model=False), test, **kw)


def test_bad_window_refused_before_model(runs):
    gentle, _, test = runs
    with pytest.raises(ValueError, match="steps window"):
        explain(_Guard(gentle, allow_model=False), test, steps=(2, gentle.num_steps + 1), progress=False)


def test_numpy_and_list_arguments_accepted(runs):
    np = pytest.importorskip("numpy")
    gentle, _, test = runs
    ref = explain(gentle, test, by=("step",), steps=(1, 4), nodes=2, **F64)
    alt = explain(gentle, test, by=["step"], steps=[np.int64(1), np.int64(4)], nodes=np.int32(2), tol=np.float64(1e-6), **F64)
    scale = float(ref.values.abs().max())
    assert alt.dims == ref.dims and alt.coords == ref.coords
    torch.testing.assert_close(alt.values, ref.values, rtol=0, atol=1e-12 * scale)


# ----------------------------------------------------------------------------- by=()
@pytest.mark.parametrize("empty", [(), []])
def test_by_empty_gives_the_total(runs, tmp_path, empty):
    gentle, _, test = runs
    per_step = explain(gentle, test, by=("step",), **F64)
    total = explain(gentle, test, by=empty, **F64)
    assert total.dims == () and total.values.ndim == 0 and total.coords == {}
    scale = float(per_step.values.abs().max())
    assert scale > 0
    assert abs(total.total() - float(per_step.values.sum())) <= 1e-12 * scale
    # the certificate is per step all the same
    assert total.completeness.step_residual.shape == (gentle.num_steps, 1)
    assert total.completeness.ok is True
    # methods on a 0-d Attribution work or fail clearly
    frame = total.to_frame()
    assert list(frame.columns) == ["value"] and len(frame) == 1 and float(frame.value[0]) == total.total()
    assert total.sum().total() == total.total()
    assert "scalar" in repr(total)
    with pytest.raises(KeyError, match="no dim"):
        total.sel(step=0)
    with pytest.raises(KeyError, match="no dim"):
        total.top(3)
    back = Attribution.load(total.save(tmp_path / "total.safetensors"))
    assert back.dims == () and back.total() == total.total() and back.completeness.ok is True


# ----------------------------------------------------------------------------- queries
def _queries(test, **columns):
    return {**{k: v.clone() for k, v in test.items()}, **columns}


def test_fractional_and_bool_query_columns_refused(runs):
    gentle, _, test = runs
    guard = _Guard(gentle, allow_model=True)
    cases = [
        (_queries(test, label=test["label"].double() + 0.5), "'label'"),
        (_queries(test, label=torch.full_like(test["label"], math.nan, dtype=torch.float64)), "'label'"),
        (_queries(test, label=test["label"] > 2), "'label'.*bool"),
        (_queries(test, tokens=test["tokens"] > 2), "'tokens'.*bool"),
        (_queries(test, tokens=test["tokens"].double() + 0.25), "'tokens'"),
        (_queries(test, label=test["label"][:, None].repeat(1, 2)), "'label' must be \\[query\\]"),
    ]
    for queries, match in cases:
        with pytest.raises(QueryError, match=match):
            explain(guard, queries, progress=False)
    alt = _queries(test, alt_label=(test["label"] + 1).double() % P + 0.5)
    with pytest.raises(QueryError, match="'alt_label'"):
        explain(guard, alt, metric="logit_diff", progress=False)


def test_integer_valued_float_labels_converted_exactly(runs):
    gentle, _, test = runs
    ints = explain(gentle, test, by=("step",), **F64)
    floats = explain(gentle, _queries(test, label=test["label"].to(torch.float32)), by=("step",), **F64)
    scale = float(ints.values.abs().max())
    torch.testing.assert_close(floats.values, ints.values, rtol=0, atol=1e-14 * scale)


def test_position_outside_the_queries_refused(runs):
    gentle, _, test = runs
    n_pos = test["tokens"].shape[1]
    guard = _Guard(gentle, allow_model=True)
    for position in (n_pos, -n_pos - 1, 100):
        with pytest.raises(QueryError, match="position"):
            explain(guard, test, position=position, progress=False)
    # a valid positive position is the same as its negative twin
    last = explain(gentle, test, by=("step",), position=-1, **F64)
    pos = explain(gentle, test, by=("step",), position=n_pos - 1, **F64)
    torch.testing.assert_close(pos.values, last.values, rtol=0, atol=1e-13 * float(last.values.abs().max()))


# ----------------------------------------------------------------------------- run directory
def test_run_directory_path_is_loaded(runs, tmp_path):
    gentle, _, test = runs
    ref = explain(gentle, test, by=("step",), **F64)
    scale = float(ref.values.abs().max())
    for path in (str(gentle.run_dir), gentle.run_dir):
        attr = explain(path, test, by=("step",), **F64)
        torch.testing.assert_close(attr.values, ref.values, rtol=0, atol=1e-14 * scale)
    with pytest.raises(TrajectoryError, match="does not exist"):
        explain(str(tmp_path / "missing"), test, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrajectoryError):
        explain(tmp_path / "empty", test, progress=False)
    with pytest.raises(TypeError, match="Trajectory or a run directory"):
        explain(3, test, progress=False)


def test_question_helpers_take_a_run_directory(runs):
    from explaind_tl import component_influence

    gentle, _, test = runs
    ref = component_influence(gentle, test, "L0H1", **F64)
    by_path = component_influence(str(gentle.run_dir), test, "L0H1", **F64)
    torch.testing.assert_close(by_path.values, ref.values, rtol=0, atol=1e-14 * float(ref.values.abs().max()))


# ----------------------------------------------------------------------------- certificate verdict
def _certificate(ratios, total_ratio=0.5, tol=1e-6, first=10):
    """A certificate whose step residuals are ``ratios`` times their bounds (one row)."""
    g = torch.Generator().manual_seed(0)
    S = len(ratios)
    step_measured = torch.randn(S, 1, generator=g, dtype=torch.float64)
    bound = tol * step_measured.abs()
    residual = torch.tensor(ratios, dtype=torch.float64)[:, None] * bound
    measured = step_measured.sum(0)
    total_res = total_ratio * bound.sum(0)
    return Completeness(
        measured=measured, attributed=measured - total_res, step_measured=step_measured,
        step_residual=residual, nodes=torch.full((S,), 2), tol=tol, step_bound=bound,
        total_bound=bound.sum(0), steps=torch.arange(first, first + S),
    )  # fmt: skip


def test_completeness_verdict_just_below_and_above_the_bound():
    below = _certificate([0.5, 1 - 1e-9, -(1 - 1e-9), 0.0])
    assert below.ok is True and below.failed_steps == [] and below.step_ok.tolist() == [True] * 4
    assert "OK" in below.verdict() and "OK" in str(below)
    s = below.summary()
    assert s["ok"] is True and s["failed_steps"] == 0 and s["tol"] == 1e-6
    assert s["step_max_ratio"] == pytest.approx(1 - 1e-9, rel=1e-12)

    above = _certificate([0.5, 1 + 1e-9, -(1 + 1e-9), 0.0])
    assert above.ok is False and above.failed_steps == [11, 12]
    assert above.step_ok.tolist() == [True, False, False, True]
    w = above.worst()
    assert w["step"] in (11, 12) and w["residual"] > w["bound"]
    assert "FAILED" in str(above) and "[11, 12]" in str(above) and "FAILED" in above._repr_html_()
    assert above.summary()["ok"] is False and above.summary()["failed_steps"] == 2
    frame = above.to_frame()
    assert frame[frame.ok == False].step.tolist() == [11, 12]  # noqa: E712 - object column
    assert list(frame.columns) == ["step", "row", "measured", "residual", "bound", "ok", "nodes"]

    nan = _certificate([0.5, math.nan, 0.1, 0.0])
    assert nan.ok is False and nan.failed_steps == [11]

    total_only = _certificate([0.5, 0.5, 0.5, 0.5], total_ratio=1 + 1e-9)
    assert total_only.failed_steps == [] and total_only.total_ok is False and total_only.ok is False
    assert "total" in total_only.verdict()


def test_completeness_without_bounds_is_unknown_not_ok():
    c = Completeness(
        measured=torch.ones(1), attributed=torch.ones(1), step_measured=torch.ones(3, 1),
        step_residual=torch.zeros(3, 1), nodes=torch.tensor([2, 2, 2]),
    )  # fmt: skip
    assert c.ok is None and c.step_ok is None and c.failed_steps is None and c.worst() is None
    assert c.summary()["ok"] is None and "not checked" in str(c)
    with pytest.raises(ValueError, match="step_bound"):
        Completeness(
            measured=torch.ones(1), attributed=torch.ones(1), step_measured=torch.ones(3, 1),
            step_residual=torch.zeros(3, 1), nodes=torch.tensor([2, 2, 2]), step_bound=torch.ones(2, 1),
        )  # fmt: skip


def test_certificate_survives_save_load_and_old_files_stay_unknown(tmp_path):
    from safetensors.torch import save_file

    c = _certificate([0.5, 1 + 1e-9, 0.2])
    attr = Attribution(torch.arange(3.0), ("step",), {"step": [10, 11, 12]}, c, {"window": [10, 13]})
    back = Attribution.load(attr.save(tmp_path / "a.safetensors")).completeness
    assert back.ok is False and back.failed_steps == [11] and back.tol == c.tol
    assert torch.equal(back.step_bound, c.step_bound) and torch.equal(back.total_bound, c.total_bound)
    # a file written before certificates had bounds: the old header and tensors only
    tensors = {"values": attr.values}
    for f in ("measured", "attributed", "step_measured", "step_residual", "nodes"):
        tensors[f"completeness/{f}"] = getattr(c, f).contiguous()
    header = {
        "format": "explaind_tl.Attribution/1", "dims": ["step"], "coords": {"step": [10, 11, 12]},
        "meta": {"window": [10, 13]}, "completeness": {"refined_steps": 0, "update_residual": 0.0},
    }  # fmt: skip
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"explaind_tl": json.dumps(header)})
    old = Attribution.load(tmp_path / "old.safetensors").completeness
    assert old.ok is None and old.failed_steps is None and old.tol is None
    assert old.steps.tolist() == [10, 11, 12]  # from the stored window
    assert "not checked" in repr(Attribution.load(tmp_path / "old.safetensors"))


# ----------------------------------------------------------------------------- certificate in explain
def test_failing_certificate_warns_and_strict_raises(runs):
    _, violent, test = runs
    kw = dict(by=("step",), nodes=1, max_nodes=1, kink_aware=False, tol=1e-6, **F64)
    with pytest.warns(CertificateWarning, match="steps above their bound") as rec:
        attr = explain(violent, test, **kw)
    message = next(str(w.message) for w in rec if issubclass(w.category, CertificateWarning))
    assert "max_nodes" in message and "kink_aware" in message
    c = attr.completeness
    assert c.ok is False and c.summary()["ok"] is False
    over = (c.step_residual.abs() > c.step_bound).any(-1)
    assert c.failed_steps == c.steps[over].tolist() and len(c.failed_steps) > 0
    assert c.steps.tolist() == list(range(violent.num_steps))
    # the bound the engine used is at least the relative part tol * |step change|
    assert bool((c.step_bound >= c.tol * c.step_measured.abs()).all())
    w = c.worst()
    assert f"{w['residual']:.3g}" in message and f"{w['bound']:.3g}" in message
    with pytest.raises(CertificateError, match="steps above their bound") as err:
        explain(violent, test, strict=True, **kw)
    assert isinstance(err.value, ArithmeticError) and isinstance(err.value, ExplaindError)
    assert err.value.attribution.completeness.failed_steps == c.failed_steps
    assert issubclass(CertificateWarning, UserWarning) and issubclass(CertificateWarning, ExplaindError)


@pytest.mark.parametrize("by", [("step", "component"), ("train",)])
def test_float64_run_is_certified_ok(runs, by):
    gentle, _, test = runs
    with warnings.catch_warnings():
        warnings.simplefilter("error", CertificateWarning)
        attr = explain(gentle, test, by=by, components="head", steps=(1, 5), tol=1e-8, strict=True, **F64)
    c = attr.completeness
    assert c.ok is True and c.failed_steps == [] and c.tol == 1e-8
    assert c.steps.tolist() == [1, 2, 3, 4] and c.step_bound.shape == c.step_residual.shape == (4, 1)
    assert bool((c.step_residual.abs() <= c.step_bound).all())
    assert float(c.residual.abs().max()) <= float(c.total_bound.min())
    # the bounds are tight enough to mean something: well below the changes they certify
    assert float((c.step_bound / c.step_measured.abs()).max()) < 1e-6
