"""ExplainOptions: the numerical options of explain as one checked, frozen value (no model, no run)."""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch

from explaind_tl import ExplainOptions, explain
from explaind_tl.engine.options import UNSET


def test_defaults_are_explains_documented_defaults():
    o = ExplainOptions()
    assert (o.tol, o.nodes, o.max_nodes, o.kink_aware, o.adaptive_nodes) == (1e-6, 2, 32, "auto", True)
    assert (o.dtype, o.fast_forward, o.train_grads, o.query_grads) == (None, True, "auto", "auto")
    assert (o.query_chunk, o.train_chunk, o.jacobian_mb, o.replay_mb) == (None, 256, 16.0, "auto")
    assert ExplainOptions(replay_mb=None).replay_mb is None and ExplainOptions(replay_mb=2).replay_mb == 2.0
    # every option is also a keyword of explain (defaulting to "take it from options")
    params = inspect.signature(explain).parameters
    for f in dataclasses.fields(ExplainOptions):
        assert params[f.name].default is UNSET, f.name
    assert params["options"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(tol=math.nan), ValueError, "tol"),
        (dict(tol=0.0), ValueError, "tol"),
        (dict(tol="1e-6"), TypeError, "tol"),
        (dict(nodes=0), ValueError, "nodes"),
        (dict(nodes=True), TypeError, "nodes"),
        (dict(nodes=4, max_nodes=2), ValueError, "nodes <= max_nodes"),
        (dict(kink_aware="yes"), TypeError, "kink_aware"),
        (dict(adaptive_nodes="no"), TypeError, "adaptive_nodes"),
        (dict(fast_forward=1), TypeError, "fast_forward"),
        (dict(dtype=torch.float16), ValueError, "float32 or float64"),
        (dict(dtype="float64"), TypeError, "dtype"),
        (dict(train_grads="fast"), ValueError, "train_grads"),
        (dict(query_grads="fast"), ValueError, "query_grads"),
        (dict(query_chunk=0), ValueError, "query_chunk"),
        (dict(train_chunk=1.5), TypeError, "train_chunk"),
        (dict(jacobian_mb=0), ValueError, "jacobian_mb"),
        (dict(jacobian_mb=math.inf), ValueError, "jacobian_mb"),
        (dict(jacobian_mb="64"), TypeError, "jacobian_mb"),
        (dict(replay_mb=0), ValueError, "replay_mb"),
        (dict(replay_mb=-8), ValueError, "replay_mb"),
        (dict(replay_mb="8"), ValueError, "replay_mb"),
        (dict(replay_mb=True), TypeError, "replay_mb"),
        (dict(replay_mb=math.nan), ValueError, "replay_mb"),
    ],
)
def test_checked_when_made(kwargs, error, match):
    with pytest.raises(error, match=match):
        ExplainOptions(**kwargs)
    with pytest.raises(error, match=match):  # and when a field is replaced
        ExplainOptions().replace(**kwargs)


def test_normalized_frozen_and_hashable():
    o = ExplainOptions(tol=1, nodes=np.int64(4), max_nodes=torch.tensor(8).item(), query_chunk=np.int32(32))
    assert o.tol == 1.0 and isinstance(o.tol, float)
    assert type(o.nodes) is int and type(o.query_chunk) is int and o.max_nodes == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.tol = 1e-3  # type: ignore[misc]
    assert o == ExplainOptions(tol=1.0, nodes=4, max_nodes=8, query_chunk=32)
    assert hash(o) == hash(ExplainOptions(tol=1.0, nodes=4, max_nodes=8, query_chunk=32))


def test_merge_keywords_replace_fields():
    base = ExplainOptions(tol=1e-8, nodes=4)
    assert ExplainOptions.merge(None) == ExplainOptions()
    assert ExplainOptions.merge(base, tol=UNSET, nodes=UNSET) is base
    merged = ExplainOptions.merge(base, tol=1e-5, dtype=None)
    assert (merged.tol, merged.nodes, merged.dtype) == (1e-5, 4, None)
    with pytest.raises(TypeError, match="options must be an ExplainOptions"):
        ExplainOptions.merge({"tol": 1e-5})


def test_kinks_flag():
    assert ExplainOptions().kinks and ExplainOptions(kink_aware=True).kinks
    assert not ExplainOptions(kink_aware=False).kinks
