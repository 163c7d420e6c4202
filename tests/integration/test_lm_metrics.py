"""Language-model metrics and loss: next-token log-prob / loss at one or several positions.

Oracles are written independently of the library: a Python loop over positions and examples
with ``torch.nn.functional.cross_entropy`` / ``log_softmax`` on TransformerLens's own logits.
The explain tests compare the built-in metric with a callable that computes the same thing by
other means, in float64, and check the decomposition against the measured change of the metric.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled

from explaind_tl import Trajectory, TrajectoryRecorder, explain
from explaind_tl.errors import QueryError
from explaind_tl.losses import next_token_cross_entropy
from explaind_tl.metrics import check_position, read_positions, resolve_metric

N_CTX, VOCAB = 8, 10


def seq_model(seed: int = 0, dtype=torch.float64):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=N_CTX, d_vocab=VOCAB,
                                  attn_only=True, normalization_type="LN", dtype=dtype, seed=seed, device="cpu")
    return HookedTransformer(cfg)


def sequences(n: int, seed: int = 0) -> torch.Tensor:
    """Random first halves, copied: the second half repeats the first (a learnable pattern)."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(0, VOCAB, (n, N_CTX // 2), generator=g)
    return torch.cat([half, half], 1)


def oracle_logprobs(model, tokens) -> torch.Tensor:
    """``[Q, n-1]``: log P(tokens[p+1] | prefix) by a loop over queries and positions."""
    logits = model(tokens)
    out = torch.empty(tokens.shape[0], tokens.shape[1] - 1, dtype=logits.dtype)
    for q in range(tokens.shape[0]):
        for p in range(tokens.shape[1] - 1):
            out[q, p] = torch.log_softmax(logits[q, p], dim=-1)[tokens[q, p + 1]]
    return out


def test_next_token_cross_entropy_against_a_loop():
    model, tokens = seq_model(), sequences(5)
    lp = oracle_logprobs(model, tokens)
    got = next_token_cross_entropy(model, {"tokens": tokens})
    assert_close_scaled(got, -lp.mean(1), 1e-12)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, N_CTX // 2:] = True  # only the copied half counts
    mask[0] = False  # a sequence with nothing marked counts 0
    got = next_token_cross_entropy(model, {"tokens": tokens, "loss_mask": mask})
    want = torch.stack([-lp[q, mask[q, 1:]].mean() if mask[q, 1:].any() else torch.tensor(0.0, dtype=lp.dtype)
                        for q in range(5)])
    assert_close_scaled(got, want, 1e-12)


@pytest.mark.parametrize("position,cols", [
    (None, list(range(N_CTX - 1))), ("all", list(range(N_CTX - 1))), (2, [2]), (-2, [N_CTX - 2]),
    (slice(N_CTX // 2, None), list(range(N_CTX // 2, N_CTX - 1))), ([5, 1, 5], [1, 5]), (slice(None, None, 3), [0, 3, 6]),
])
def test_next_token_logprob_positions(position, cols):
    model, tokens = seq_model(), sequences(4)
    lp = oracle_logprobs(model, tokens)
    fn, needs_label = resolve_metric("next_token_logprob", position)
    assert not needs_label
    logits = model(tokens)
    assert_close_scaled(fn(logits, {"tokens": tokens}), lp[:, cols].mean(1), 1e-12)
    loss_fn, _ = resolve_metric("next_token_loss", position)
    assert_close_scaled(loss_fn(logits, {"tokens": tokens}), -lp[:, cols].mean(1), 1e-12)
    mask = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(1)) < 0.6
    for q in range(4):  # at least one read position marked per query
        mask[q, cols[q % len(cols)] + 1] = True
    want = torch.stack([lp[q, [c for c in cols if mask[q, c + 1]]].mean() for q in range(4)])
    assert_close_scaled(fn(logits, {"tokens": tokens, "loss_mask": mask}), want, 1e-12)


def test_position_errors():
    with pytest.raises(QueryError, match="last position: no next token"):
        read_positions(-1, N_CTX)
    with pytest.raises(QueryError, match="outside"):
        read_positions([0, N_CTX], N_CTX)
    with pytest.raises(QueryError, match="selects no position"):
        read_positions(slice(3, 3), N_CTX)
    with pytest.raises(ValueError, match="reads one position"):
        check_position("correct_logprob", [0, 1])
    with pytest.raises(ValueError, match="reads one position"):
        check_position("logits", "all")
    with pytest.raises(ValueError, match="callable metric"):
        check_position(lambda logits, batch: logits[:, 0, 0], slice(0, 2))
    with pytest.raises(TypeError, match="position"):
        check_position("next_token_logprob", True)
    with pytest.raises(TypeError, match="position"):
        check_position("next_token_logprob", [0, 1.5])
    with pytest.raises(TypeError, match="position"):
        check_position("next_token_logprob", "last")
    with pytest.raises(ValueError, match="step"):
        check_position("next_token_logprob", slice(None, None, 0))
    assert check_position("next_token_logprob", [1, 2]) == (1, 2)


# ----------------------------------------------------------------------------- explain
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = seq_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train = {"tokens": sequences(32, seed=1)}
    rec = TrajectoryRecorder(model, opt, tmp_path_factory.mktemp("lm") / "run", train, next_token_cross_entropy,
                             checkpoint_every=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        rec.step(torch.randperm(32, generator=g)[:8])
    rec.close()
    return Trajectory.load(rec.run_dir)


def copied_half_logprob(logits, batch):
    """The in-context log-prob of the copied half, written without the library's helpers."""
    lp = torch.log_softmax(logits[:, N_CTX // 2 - 1: -1], dim=-1)
    return lp.gather(2, batch["tokens"][:, N_CTX // 2:].unsqueeze(-1))[..., 0].mean(1)


def test_explain_next_token_logprob_matches_a_callable_and_the_measured_change(run):
    queries = {"tokens": sequences(6, seed=2)}
    kw = dict(by=("step", "component"), components="head", progress=False)
    built_in = explain(run, queries, metric="next_token_logprob", position=slice(N_CTX // 2 - 1, None), **kw)
    callable_ = explain(run, queries, metric=copied_half_logprob, **kw)
    assert built_in.completeness.ok and callable_.completeness.ok
    assert built_in.meta["position"] == list(range(N_CTX // 2 - 1, N_CTX - 1))
    assert_close_scaled(built_in.values, callable_.values, 1e-10)
    # the total is the measured change of the metric between the window's ends
    m0, m1 = run.model(0), run.model(run.num_steps)
    with torch.no_grad():
        change = (copied_half_logprob(m1(queries["tokens"]), queries) - copied_half_logprob(m0(queries["tokens"]), queries)).sum()
    assert_close_scaled(built_in.values.sum(), change, 1e-8)


def test_explain_next_token_loss_with_a_loss_mask(run):
    tokens = sequences(6, seed=3)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, N_CTX // 2:] = True
    q = {"tokens": tokens, "loss_mask": mask}
    kw = dict(by=("step", "query"), progress=False)
    masked = explain(run, q, metric="next_token_loss", **kw)
    want = explain(run, {"tokens": tokens}, metric=lambda logits, batch: -copied_half_logprob(logits, batch), **kw)
    assert masked.completeness.ok
    assert_close_scaled(masked.values, want.values, 1e-10)


def test_explain_refuses_bad_lm_queries(run):
    tokens = sequences(3)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[1:, -1] = True
    with pytest.raises(QueryError, match=r"queries \[0\] mark none of the tokens predicted at positions 0\.\.6"):
        explain(run, {"tokens": tokens, "loss_mask": mask}, metric="next_token_logprob", progress=False)
    with pytest.raises(QueryError, match="last position"):
        explain(run, {"tokens": tokens}, metric="next_token_logprob", position=-1, progress=False)
    early = torch.zeros_like(tokens, dtype=torch.bool)
    early[:, 1:3] = True
    early[2, -1] = True
    with pytest.raises(QueryError, match=r"queries \[0, 1\] mark none of the tokens predicted at positions 4\.\.6"):
        explain(run, {"tokens": tokens, "loss_mask": early}, metric="next_token_logprob", position=slice(4, None),
                progress=False)
    with pytest.raises(ValueError, match="reads one position"):
        explain(run, {"tokens": tokens}, metric="correct_logprob", position=[0, 1], progress=False)
    with pytest.raises(QueryError, match="pos >= 2"):
        explain(run, {"tokens": tokens[:, :1]}, metric="next_token_logprob", progress=False)


def test_position_axis_keeps_each_positions_share(run):
    tokens = sequences(5, seed=4)
    cols = [2, 4, 5, 6]
    # one fixed rule for every call (no refinement choices), so they agree to rounding, not to tol
    rule = dict(nodes=8, max_nodes=8, adaptive_nodes=False, progress=False)
    kw = dict(position=cols, **rule)
    mean = explain(run, {"tokens": tokens}, metric="next_token_logprob", by=("step", "query"), **kw)
    per = explain(run, {"tokens": tokens}, metric="next_token_logprob", by=("step", "query", "position"), **kw)
    assert per.dims == ("step", "query", "position") and per.coords["position"] == cols
    assert per.completeness.ok
    assert_close_scaled(per.values.sum(-1), mean.values, 1e-10)  # the shares add up to the mean
    # each position's entry against a callable reading that position alone, divided by k
    for j, p in enumerate(cols):
        one = explain(run, {"tokens": tokens}, by=("step", "query"), **rule,
                      metric=lambda logits, batch, p=p: torch.log_softmax(logits[:, p], -1).gather(
                          1, batch["tokens"][:, p + 1: p + 2])[:, 0] / len(cols))
        assert_close_scaled(per.values[..., j], one.values, 1e-10, scale=float(per.values.abs().max()))
    loss = explain(run, {"tokens": tokens}, metric="next_token_loss", by=("position",), **kw)
    assert_close_scaled(loss.values, -per.values.sum((0, 1)), 1e-10)
    with pytest.raises(ValueError, match="next-token metric"):
        explain(run, {"tokens": tokens}, metric="correct_logprob", by=("position",), progress=False)
    with pytest.raises(ValueError, match="'position' or 'output'"):
        explain(run, {"tokens": tokens}, metric="next_token_logprob", by=("position", "output"), progress=False)


def test_train_position_splits_each_sequence_by_its_token_terms(run):
    from explaind_tl.axes import NO_TOKEN, PSEUDO

    q = {"tokens": sequences(4, seed=5)}
    kw = dict(metric="next_token_logprob", position=slice(N_CTX // 2 - 1, None), dtype=torch.float64, progress=False)
    per_seq = explain(run, q, by=("train", "query"), **kw)
    per_tok = explain(run, q, by=("train", "train_position", "query"), **kw)
    assert per_tok.dims == ("train", "train_position", "query")
    assert per_tok.coords["train"] == list(range(run.num_train)) + list(PSEUDO)
    assert per_tok.coords["train_position"] == list(range(1, N_CTX)) + [NO_TOKEN]
    assert per_tok.completeness.ok
    # the token terms of an example add up to its entry; pseudo-entries sit at "none" only
    assert_close_scaled(per_tok.values.sum(1), per_seq.values, 1e-10)
    n = run.num_train
    assert torch.equal(per_tok.values[:n, -1], torch.zeros_like(per_tok.values[:n, -1]))
    assert torch.equal(per_tok.values[n:, :-1], torch.zeros_like(per_tok.values[n:, :-1]))
    seen = set().union(*(run.batch_ids(s).tolist() for s in range(run.num_steps)))
    unseen = [i for i in range(n) if i not in seen]
    if unseen:
        assert torch.equal(per_tok.values[unseen], torch.zeros_like(per_tok.values[unseen]))
    # with components too, and summing queries
    comp = explain(run, q, by=("component", "train", "train_position"), components="head", **kw)
    assert comp.dims == ("component", "train", "train_position")
    assert_close_scaled(comp.values.sum((0, 2)), per_seq.values.sum(-1), 1e-10)
    with pytest.raises(ValueError, match="keep 'train' as well"):
        explain(run, q, by=("train_position",), **kw)


def test_train_position_needs_a_loss_split_into_tokens(tmp_path):
    from conftest import modular_data, tiny_model

    from explaind_tl.losses import last_token_cross_entropy

    model = tiny_model(7)
    train, test = modular_data(7, 12, 4)
    rec = TrajectoryRecorder(model, torch.optim.AdamW(model.parameters(), lr=1e-2), tmp_path / "run", train,
                             last_token_cross_entropy)
    rec.step()
    rec.close()
    with pytest.raises(ValueError, match="per_token"):
        explain(Trajectory.load(tmp_path / "run"), test, by=("train", "train_position"), progress=False)


def test_token_terms_of_the_loss_add_up_to_it():
    from explaind_tl.losses import next_token_cross_entropy_per_token

    model, tokens = seq_model(), sequences(5)
    assert next_token_cross_entropy.per_token is next_token_cross_entropy_per_token
    terms = next_token_cross_entropy_per_token(model, {"tokens": tokens})
    assert terms.shape == (5, N_CTX - 1)
    assert_close_scaled(terms.sum(1), next_token_cross_entropy(model, {"tokens": tokens}), 1e-12)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 3:6] = True
    b = {"tokens": tokens, "loss_mask": mask}
    terms = next_token_cross_entropy_per_token(model, b)
    assert_close_scaled(terms.sum(1), next_token_cross_entropy(model, b), 1e-12)
    assert torch.equal(terms[:, :2], torch.zeros_like(terms[:, :2]))  # unmasked tokens: no term
