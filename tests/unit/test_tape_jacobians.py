"""Per-group parameter gradients from a taped forward (:func:`tape_jacobians`), against loops.

The oracle is the definition, written out with Python loops over groups, outputs and rows in
float64: ``Σ_{rows of the group} xᵀ δ`` for a product, ``Σ δ`` for a bias, ``Σ x ⊙ δ`` for a
scale, ``δ`` added to the rows read for an embedding.
"""

from __future__ import annotations

import einops
import pytest
import torch
from conftest import assert_close_scaled

from explaind_tl.model.tape import ParamUse, tape_jacobians

G, OUTER, INNER, POS, N_OUT = 3, 2, 4, 5, 6  # groups, node blocks, rows per group and block, positions, outputs
B = OUTER * G * INNER


def group_of(row: int) -> int:
    """Row ``(a * G + g) * INNER + i`` belongs to group ``g``."""
    return (row // INNER) % G


def random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def oracle(use: ParamUse, d: torch.Tensor, shape) -> torch.Tensor:
    out = torch.zeros(G, N_OUT, *shape, dtype=torch.float64)
    for r in range(B):
        g = group_of(r)
        for o in range(N_OUT):
            if use.kind == "mm":
                w = torch.einsum("pi,pj->ij", use.x[r].reshape(-1, use.x.shape[-1]), d[o, r].reshape(-1, d.shape[-1]))
                if use.extra is not None:
                    left, right = use.extra.split("->")
                    w = einops.rearrange(w, f"{right} -> {left}", **dict(zip(left.split(), shape)))
                out[g, o] += w
            elif use.kind == "add":
                out[g, o] += d[o, r].reshape(-1, *shape).sum(0)
            elif use.kind == "mul":
                out[g, o] += (d[o, r] * use.x[r]).reshape(-1, *shape).sum(0)
            else:  # rows
                for p in range(POS):
                    out[g, o, int(use.extra[r, p])] += d[o, r, p]
    return out


def uses():
    heads, d_model, d_head = 2, 3, 4
    x = random(B, POS, d_model, seed=1)
    return {
        "W": (ParamUse("mm", "W", x, random(B, POS, 7, seed=2)), (d_model, 7)),
        "W_Q": (ParamUse("mm", "W_Q", x, random(B, POS, heads * d_head, seed=3), "head d_model d_head -> d_model (head d_head)"),
                (heads, d_model, d_head)),
        "b": (ParamUse("add", "b", None, random(B, POS, heads, d_head, seed=4)), (heads, d_head)),
        "ln.w": (ParamUse("mul", "ln.w", random(B, POS, d_model, seed=5), random(B, POS, d_model, seed=6)), (d_model,)),
        "W_E": (ParamUse("rows", "W_E", None, random(B, POS, d_model, seed=7),
                     torch.randint(0, 9, (B, POS), generator=torch.Generator().manual_seed(8))), (9, d_model)),
    }


@pytest.mark.parametrize("name", ["W", "W_Q", "b", "ln.w", "W_E"])
def test_each_use_against_loops(name):
    use, shape = uses()[name]
    d = random(N_OUT, *use.y.shape, seed=9)
    got = tape_jacobians([use], [d], G, {name: torch.Size(shape)}, outer=OUTER)[name]
    want = oracle(use, d, shape)
    assert got.shape == want.shape
    assert_close_scaled(got, want, 1e-13)
    # the grouping matters: the same rows read as consecutive groups (outer=1) give another answer
    other = tape_jacobians([use], [d], G, {name: torch.Size(shape)}, outer=1)[name]
    assert float((other - want).abs().max()) > 1e-3


@pytest.mark.parametrize("pattern", [None, "head d_head d_model -> (head d_head) d_model",
                                     "head d_model d_head -> d_model (head d_head)", "d_head head d_model -> d_model (head d_head)"])
def test_products_of_one_row_per_group(pattern):
    """A product read at one row per group (one position, one node: the read-out's ``W_Q``, MLP
    and unembedding on a one-layer model) is each group's outer product ``x_gᵀ δ_g``, formed in
    the parameter's own order; against the definition written out per group and output, for the
    parameter itself, a reshaping of it, a head axis moved in front (``W_Q``) and a pattern that
    takes the batched product instead; written by index into a longer buffer too."""
    heads, d_a, d_b, groups = 2, 3, 4, 5
    if pattern is None:
        shape, d_in, d_out = (d_a, d_b), d_a, d_b
    elif pattern.startswith("head d_head"):
        shape, d_in, d_out = (heads, d_b, d_a), heads * d_b, d_a
    else:
        shape, d_in, d_out = ((heads, d_a, d_b) if pattern.startswith("head") else (d_b, heads, d_a)), d_a, heads * d_b
    use = ParamUse("mm", "W", random(groups, 1, d_in, seed=11), random(groups, 1, d_out, seed=12), pattern)
    d = random(N_OUT, groups, 1, d_out, seed=13)
    want = torch.zeros(groups, N_OUT, *shape, dtype=torch.float64)
    for g in range(groups):
        for o in range(N_OUT):
            w = torch.outer(use.x[g, 0], d[o, g, 0])
            if pattern is not None:
                left, right = pattern.split("->")
                w = einops.rearrange(w, f"{right} -> {left}", **dict(zip(left.split(), shape)))
            want[g, o] = w
    got = tape_jacobians([use], [d], groups, {"W": torch.Size(shape)})["W"]
    assert_close_scaled(got, want, 1e-14)
    index = torch.tensor([6, 1, 4, 0, 3])
    out = {"W": torch.full((8, N_OUT, *shape), 7.0, dtype=torch.float64)}
    tape_jacobians([use], [d], groups, {"W": torch.Size(shape)}, out=out, index=index)
    assert_close_scaled(out["W"][index], want, 1e-14)
    assert bool((out["W"][[2, 5, 7]] == 7.0).all())


def test_uses_add_up_unused_are_zero_and_out_is_written_in_place():
    """A parameter used twice gets the sum; one never used gets zeros; ``out`` (strided views of
    one buffer, filled with garbage first) receives exactly the returned values."""
    (use, shape) = uses()["W"]
    twice = ParamUse("mm", "W", random(*use.x.shape, seed=10), use.y)
    d1, d2 = random(N_OUT, *use.y.shape, seed=11), random(N_OUT, *use.y.shape, seed=12)
    shapes = {"W": torch.Size(shape), "unused": torch.Size((2, 3))}
    got = tape_jacobians([use, twice], [d1, d2], G, shapes, outer=OUTER)
    assert_close_scaled(got["W"], oracle(use, d1, shape) + oracle(twice, d2, shape), 1e-13)
    assert bool((got["unused"] == 0).all()) and got["unused"].shape == (G, N_OUT, 2, 3)

    buf = torch.full((G, N_OUT, 21 + 6), float("nan"), dtype=torch.float64)
    out = {"W": buf[:, :, :21].unflatten(2, shape), "unused": buf[:, :, 21:].unflatten(2, (2, 3))}
    ret = tape_jacobians([use, twice], [d1, d2], G, shapes, outer=OUTER, out=out)
    assert ret is out and not bool(buf.isnan().any())
    assert_close_scaled(buf[:, :, :21].unflatten(2, shape), got["W"], 1e-13)
    assert bool((buf[:, :, 21:] == 0).all())


def test_index_writes_the_groups_entries_of_a_longer_out_and_leaves_the_rest():
    """With ``index``, group ``g``'s results land at entry ``index[g]`` of ``out``'s first axis
    (longer than the groups), a parameter used twice is summed there, an unused one is zeroed
    there, and every other entry keeps what it held."""
    (use, shape) = uses()["W"]
    twice = ParamUse("mm", "W", random(*use.x.shape, seed=10), use.y)
    d1, d2 = random(N_OUT, *use.y.shape, seed=11), random(N_OUT, *use.y.shape, seed=12)
    shapes = {"W": torch.Size(shape), "unused": torch.Size((2, 3))}
    want = tape_jacobians([use, twice], [d1, d2], G, shapes, outer=OUTER)
    index = torch.tensor([5, 0, 3])  # not consecutive, not sorted
    buf = random(7, N_OUT, 21 + 6, seed=13)
    before = buf.clone()
    out = {"W": buf[:, :, :21].unflatten(2, shape), "unused": buf[:, :, 21:].unflatten(2, (2, 3))}
    ret = tape_jacobians([use, twice], [d1, d2], G, shapes, outer=OUTER, out=out, index=index)
    assert ret is out
    assert_close_scaled(buf[index, :, :21].unflatten(2, shape), want["W"], 1e-13)
    assert bool((buf[index, :, 21:] == 0).all())
    others = torch.tensor([1, 2, 4, 6])
    assert torch.equal(buf[others], before[others])
    with pytest.raises(ValueError, match="one entry per group"):
        tape_jacobians([use], [d1], G, shapes, outer=OUTER, out=out, index=index[:2])
    with pytest.raises(ValueError, match="index needs out"):
        tape_jacobians([use], [d1], G, shapes, outer=OUTER, index=index)


def test_refusals():
    use, _ = uses()["W"]
    with pytest.raises(ValueError, match="no parameter use"):
        tape_jacobians([], [], G, {"W": torch.Size((3, 7))})
    with pytest.raises(ValueError, match="unknown parameter use"):
        tape_jacobians([ParamUse("conv", "W", use.x, use.y)], [random(N_OUT, *use.y.shape, seed=0)], G, {"W": torch.Size((3, 7))})


@pytest.mark.parametrize("run_min", [1, 10**9], ids=["slices", "indexed"])
def test_index_with_runs_written_as_slices_or_by_index(monkeypatch, run_min):
    """An index with runs of consecutive ids (``[0, 1, 2, 5, 6, 9]`` into 11 entries) gives the
    same entries whether the runs are written as slices (a copy, a sum or zeros per run, or each
    one-row product formed in it) or by one indexed call (:data:`RUN_COPY_MIN` decides); the
    entries between runs keep what they held. Covers a product read at one row per group, its
    head-split pattern, a product read at several rows, a parameter used twice and one unused,
    and an ``out`` whose strides do not let the product be formed in place."""
    from explaind_tl.model import tape

    monkeypatch.setattr(tape, "RUN_COPY_MIN", run_min)
    groups, heads, d_model, d_head = 6, 2, 3, 4
    index = torch.tensor([0, 1, 2, 5, 6, 9])
    x1 = random(groups, 1, d_model, seed=21)
    one_row = ParamUse("mm", "W", x1, random(groups, 1, 5, seed=22))
    again = ParamUse("mm", "W", random(groups, 3, d_model, seed=23), random(groups, 3, 5, seed=24))
    w_q = ParamUse("mm", "W_Q", x1, random(groups, 1, heads * d_head, seed=25), "head d_model d_head -> d_model (head d_head)")
    w_o = ParamUse("mm", "W_O", random(groups, 1, heads * d_head, seed=26), random(groups, 1, d_model, seed=27),
                   "head d_head d_model -> (head d_head) d_model")
    shapes = {"W": torch.Size((d_model, 5)), "W_Q": torch.Size((heads, d_model, d_head)),
              "W_O": torch.Size((heads, d_head, d_model)), "unused": torch.Size((2, 2))}
    tape_uses = [one_row, again, w_q, w_o]
    ds = [random(N_OUT, *u.y.shape, seed=30 + i) for i, u in enumerate(tape_uses)]
    want = tape_jacobians(tape_uses, ds, groups, shapes)
    want_w = sum(oracle_rows(u, d, shapes["W"], groups) for u, d in zip(tape_uses[:2], ds[:2]))
    assert_close_scaled(want["W"], want_w, 1e-13)  # the no-index result is itself right

    out = {name: random(11, N_OUT, *shape, seed=40 + i) for i, (name, shape) in enumerate(shapes.items())}
    # W_O's buffer laid out [entry, output, d_head, head, d_model]: its (head d_head) does not merge by view
    out["W_O"] = random(11, N_OUT, d_head, heads, d_model, seed=45).transpose(2, 3)
    before = {name: t.clone() for name, t in out.items()}
    tape_jacobians(tape_uses, ds, groups, shapes, out=out, index=index)
    others = torch.tensor([3, 4, 7, 8, 10])
    for name in shapes:
        want_name = want[name] if name != "unused" else torch.zeros(groups, N_OUT, 2, 2, dtype=torch.float64)
        assert_close_scaled(out[name][index], want_name, 1e-13)
        assert torch.equal(out[name][others], before[name][others])


def oracle_rows(use: ParamUse, d: torch.Tensor, shape, groups: int) -> torch.Tensor:
    """``Σ_{rows of g} xᵀ δ`` for a product with rows ``[groups, rows, ...]`` (no pattern)."""
    out = torch.zeros(groups, N_OUT, *shape, dtype=torch.float64)
    for g in range(groups):
        for o in range(N_OUT):
            out[g, o] = torch.einsum("pi,pj->ij", use.x[g], d[o, g])
    return out
