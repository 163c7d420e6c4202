"""Attribution / Completeness: selection, reductions, export, save/load round-trip."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled

from explaind_tl.attribution import Attribution, Completeness

# sums of the attribution's signed entries in different orders (vectorised reductions, cumsum,
# pandas): rounding is relative to the sum of |entries|; 1e-13 of it is ~1e-11 here, while a
# wrong axis or a dropped entry is off by O(1)
K_SUM = 1e-13


def _completeness(S=4, R=1):
    g = torch.Generator().manual_seed(0)
    step_measured = torch.randn(S, R, generator=g, dtype=torch.float64)
    step_residual = 1e-12 * torch.randn(S, R, generator=g, dtype=torch.float64)
    measured = step_measured.sum(0)
    return Completeness(
        measured=measured,
        attributed=measured - step_residual.sum(0),
        step_measured=step_measured,
        step_residual=step_residual,
        nodes=torch.tensor([2, 2, 4, 2][:S]),
        refined_steps=1,
        update_residual=3e-15,
    )


def make_attr(dims=("component", "step", "train")) -> Attribution:
    """A small deterministic attribution: component x step x train (ints + pseudo-entries)."""
    coords_all = {
        "component": ["embed", "L0H0", "L0H1", "L1H0", "L1H1", "unembed"],
        "step": [0, 250, 500, 750],
        "train": [0, 1, 2, 5, "history", "weight_decay", "update_residual"],
        "query": [0, 1],
    }
    shape = [len(coords_all[d]) for d in dims]
    g = torch.Generator().manual_seed(1)
    values = torch.randn(*shape, generator=g, dtype=torch.float64)
    return Attribution(
        values=values,
        dims=tuple(dims),
        coords={d: coords_all[d] for d in dims},
        completeness=_completeness(),
        meta={"metric": "correct_logit", "window": [0, 1000], "seconds": 1.5, "t": torch.arange(3)},
    )


def test_construction_checks():
    with pytest.raises(ValueError, match="axes"):
        Attribution(torch.zeros(2, 3), ("step",), {})
    with pytest.raises(ValueError, match="coords"):
        Attribution(torch.zeros(2), ("step",), {"step": [0, 1, 2]})
    a = Attribution(torch.zeros(2, 3, dtype=torch.float32), ("query", "output"))
    assert a.values.dtype == torch.float64 and a.coords == {"query": [0, 1], "output": [0, 1, 2]}


def test_sel_isel():
    a = make_attr()
    v = a.values
    b = a.sel(component="L0H1")
    assert b.dims == ("step", "train") and torch.equal(b.values, v[2])
    c = a.sel(component=["L0H1", "embed"])
    assert c.dims == a.dims and c.coords["component"] == ["L0H1", "embed"]
    assert torch.equal(c.values, v[[2, 0]])
    d = a.sel(step=slice(250, 750))  # half-open on labels
    assert d.coords["step"] == [250, 500] and torch.equal(d.values, v[:, 1:3])
    assert a.sel(step=slice(500, None)).coords["step"] == [500, 750]
    e = a.sel(train="history", step=500)
    assert e.dims == ("component",) and torch.equal(e.values, v[:, 2, 4])
    assert torch.equal(a.sel(train=5).values, v[:, :, 3])
    with pytest.raises(KeyError, match="'5'"):
        a.sel(train="5")  # labels keep their type
    with pytest.raises(KeyError, match="no dim"):
        a.sel(query=0)
    f = a.isel(step=-1, component=slice(1, 3))
    assert f.dims == ("component", "train") and f.coords["component"] == ["L0H0", "L0H1"]
    assert torch.equal(f.values, v[1:3, -1])
    assert a.completeness is b.completeness  # the certificate is carried along


def test_sum_cumsum_total():
    a = make_attr()
    v = a.values
    scale = float(v.abs().sum())
    assert_close_scaled(a.total(), v.sum(), K_SUM, scale=scale)
    s = a.sum("train")
    assert s.dims == ("component", "step")
    assert_close_scaled(s.values, v.sum(2), K_SUM, scale=scale)
    s2 = a.sum(["component", "train"])
    assert s2.dims == ("step",)
    assert_close_scaled(s2.values, v.sum((0, 2)), K_SUM, scale=scale)
    assert a.sum().dims == ()
    assert_close_scaled(a.sum().values, a.total(), K_SUM, scale=scale)
    c = a.cumsum("step")
    assert_close_scaled(c.values[:, -1], v.sum(1), K_SUM, scale=scale)
    assert_close_scaled(c.sel(step=250).values, v[:, :2].sum(1), K_SUM, scale=scale)


def test_heads_grid():
    a = make_attr()
    grid = a.heads()
    per_comp = a.values.sum((1, 2))
    scale = float(a.values.abs().sum())
    assert grid.shape == (2, 2)
    assert_close_scaled(grid[1, 0], per_comp[3], K_SUM, scale=scale)
    grid2, labels = a.heads(return_labels=True)
    assert labels == [["L0H0", "L0H1"], ["L1H0", "L1H1"]] and torch.equal(grid, grid2)
    by_step = a.heads(keep="step")
    assert by_step.shape == (4, 2, 2)
    assert_close_scaled(by_step.sum(0), grid, K_SUM, scale=scale)
    a.meta["n_heads"] = 3
    assert a.heads().shape == (2, 3)


def test_top():
    a = make_attr()
    per_comp = a.values.sum((1, 2))
    df = a.top(3)
    assert list(df.columns) == ["component", "value"] and len(df) == 3
    order = torch.argsort(per_comp.abs(), descending=True)[:3].tolist()
    assert df["component"].tolist() == [a.coords["component"][i] for i in order]
    assert_close_scaled(df["value"], per_comp[order], K_SUM, scale=float(a.values.abs().sum()))
    rows = a.top(
        2,
        dim="train",
        by_abs=False,
        exclude=["history", "weight_decay", "update_residual"],
        as_frame=False,
    )
    per_train = a.values.sum((0, 1))[:4]
    assert [r[0] for r in rows] == [
        [0, 1, 2, 5][i] for i in torch.argsort(per_train, descending=True)[:2].tolist()
    ]


def test_to_frame():
    a = make_attr()
    df = a.to_frame()
    assert list(df.columns) == ["component", "step", "train", "value"]
    assert len(df) == a.values.numel()
    row = df[(df.component == "L1H0") & (df.step == 500) & (df.train == "history")]
    assert float(row.value.iloc[0]) == float(a.values[3, 2, 4])
    assert_close_scaled(df.value.sum(), a.total(), K_SUM, scale=float(a.values.abs().sum()))
    assert set(df[df.train.map(lambda t: isinstance(t, int))].train) == {0, 1, 2, 5}


def test_save_load_roundtrip(tmp_path):
    a = make_attr()
    path = a.save(tmp_path / "attr.safetensors")
    b = Attribution.load(path)
    assert torch.equal(a.values, b.values) and b.values.dtype == torch.float64
    assert b.dims == a.dims and b.coords == a.coords
    assert [type(t) for t in b.coords["train"]] == [type(t) for t in a.coords["train"]]
    assert b.meta["metric"] == "correct_logit" and b.meta["window"] == [0, 1000]
    assert torch.equal(b.meta["t"], a.meta["t"])
    for f in ("measured", "attributed", "step_measured", "step_residual", "nodes"):
        assert torch.equal(getattr(a.completeness, f), getattr(b.completeness, f))
    assert b.completeness.refined_steps == 1 and b.completeness.update_residual == 3e-15
    # no certificate, no dims
    c = Attribution(torch.tensor(2.5, dtype=torch.float64), ())
    c.save(tmp_path / "c.safetensors")
    d = Attribution.load(tmp_path / "c.safetensors")
    assert d.completeness is None and d.total() == 2.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attr.safetensors", "c.safetensors"]


def test_completeness_summary_and_repr():
    comp = _completeness()
    s = comp.summary()
    # each is one max / ratio of float64 numbers: equal to rounding relative to the value itself
    assert_close_scaled(s["total_max_abs"], (comp.measured - comp.attributed).abs().max(), 1e-12)
    assert_close_scaled(s["step_max_abs"], comp.step_residual.abs().max(), 1e-12)
    assert s["max_nodes"] == 4 and s["refined_steps"] == 1
    assert_close_scaled(s["total_rel"], s["total_max_abs"] / float(comp.measured.abs().sum()), 1e-12)
    zero = Completeness(
        measured=torch.zeros(1), attributed=torch.zeros(1), step_measured=torch.zeros(2, 1),
        step_residual=torch.zeros(2, 1), nodes=torch.tensor([1, 1]),
    )  # fmt: skip
    assert zero.summary()["step_max_rel"] == 0.0 and zero.summary()["total_rel"] == 0.0
    assert "per step" in str(comp) and "<table>" in comp._repr_html_()
    r = repr(make_attr())
    assert "component: 6" in r and "step: 4" in r and "train: 7" in r and "completeness" in r
