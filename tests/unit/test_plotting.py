"""Plots write PNGs of the expected pixel size."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from explaind_tl.attribution import Attribution
from explaind_tl.plotting import (
    plot_component_heatmap,
    plot_cumulative_influence,
    plot_top_examples,
)


def _attr(dims=("component", "step", "train")) -> Attribution:
    coords = {
        "component": ["embed", "L0H0", "L0H1", "L0.mlp", "unembed"],
        "step": [0, 10, 20, 30, 40],
        "train": [0, 1, 2, 3, 4, 5, "history", "weight_decay", "update_residual"],
    }
    g = torch.Generator().manual_seed(0)
    values = torch.randn(*[len(coords[d]) for d in dims], generator=g, dtype=torch.float64)
    return Attribution(
        values, dims, {d: coords[d] for d in dims}, None, {"metric": "correct_logit"}
    )


def _png_shape(path):
    import matplotlib.image as mpimg

    assert path.exists() and path.stat().st_size > 0
    return mpimg.imread(path).shape[:2]


def test_heatmap(tmp_path):
    p = tmp_path / "heat.png"
    fig = plot_component_heatmap(_attr(), path=p, figsize=(6, 4), dpi=50)
    assert _png_shape(p) == (200, 300)
    assert fig.get_size_inches().tolist() == [6, 4]
    with pytest.raises(ValueError, match="needs dims"):
        plot_component_heatmap(_attr().sum("step"))


def test_cumulative_influence(tmp_path):
    acc = pd.DataFrame(
        {"step": [0, 20, 40], "train_acc": [0.1, 0.9, 1.0], "test_acc": [0.0, 0.1, 0.95]}
    )
    p = tmp_path / "cum.png"
    plot_cumulative_influence(_attr(), accuracy=acc, path=p, top=2, figsize=(5, 3), dpi=40)
    assert _png_shape(p) == (120, 200)
    p2 = tmp_path / "cum_total.png"  # no component dim: one total line
    plot_cumulative_influence(_attr().sum("component"), path=p2, figsize=(5, 3), dpi=40)
    assert _png_shape(p2) == (120, 200)


def test_top_examples(tmp_path):
    p = tmp_path / "top.png"
    fig = plot_top_examples(_attr(), component="L0H1", k=4, path=p, figsize=(4, 3), dpi=50)
    assert _png_shape(p) == (150, 200)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(ticks) == 4 and all(t.isdigit() for t in ticks)  # pseudo-entries left out
    with pytest.raises(ValueError, match="train"):
        plot_top_examples(_attr(("component", "step")), component="L0H1")
