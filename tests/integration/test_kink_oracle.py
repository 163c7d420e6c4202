"""Brute-force oracle for the kink-aware (ReLU) path of ``explain``, in float64.

The oracle is written independently of ``explaind_tl``'s quadrature, functional and engine
code. It uses only torch, ``torch.func`` on the TransformerLens model (parameters passed with
``torch.func.functional_call``), the TransformerLens hook ``blocks.0.mlp.hook_pre``, numpy's
Gauss–Legendre rule, and the :class:`~explaind_tl.Trajectory` for ``w_s``, batch ids and
learning rates. For every step ``s`` it

1. samples the MLP pre-activations of every query, position and neuron on a uniform grid of
   the segment ``w_s + tΔ_s``, ``t ∈ [0, 1]``, and bisects every sign change on the true forward
   pass down to float64 resolution in ``t``;
2. cuts the segment at all of them (the union over queries, positions and neurons) and
   integrates ``∇q`` on every piece with many Gauss–Legendre nodes, checking that the
   activation pattern is the same at every node of a piece (a sign change the grid missed would
   show up here or in the exactness check), which gives ``φ_s = ∫_0^1 ∇q(w_s + tΔ_s) dt``.

The per-example split unrolls the optimizer's linear form by hand, ``O(T^2)``: an example seen at
step ``k`` enters the update of every step ``s >= k`` with a known coefficient (SGD:
``-lr_s μ^{s-k}``, Adam: ``P_s β1^{s-k}``). The component partitions are written out here from
the documented TransformerLens labels, not taken from :class:`~explaind_tl.ComponentMap`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import modular_addition, tiny_model
from torch.func import functional_call, grad, vmap

from explaind_tl import explain, train

P_MOD = 7
N_TRAIN, N_QUERY, BATCH, STEPS = 16, 4, 4, 6
HOOK = "blocks.0.mlp.hook_pre"
GRID = 32  # uniform samples per segment that bracket the sign changes
BISECT = 52  # bisection steps inside a 1/GRID bracket: below float64 resolution in t
NODES = 10  # Gauss–Legendre nodes per smooth piece
# explain() settings: float64, certified per step far below the comparison tolerance
EXPLAIN = dict(dtype=torch.float64, tol=1e-12, max_nodes=32, progress=False)
# entries must agree to K_AGREE times the largest oracle entry of the compared tensor
K_AGREE = 1e-9

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.15),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.03, betas=(0.9, 0.98), weight_decay=0.5),
}


def ce_loss(model, batch):
    """Per-example cross entropy at the last position (the recorded training loss)."""
    logits = model(batch["tokens"])[:, -1]
    return torch.nn.functional.cross_entropy(logits, batch["label"], reduction="none")


def split_data():
    """16 training rows and 4 query rows of modular addition mod 7 (disjoint, seeded)."""
    data = modular_addition(P_MOD)
    perm = torch.randperm(P_MOD * P_MOD, generator=torch.Generator().manual_seed(0))
    train_rows, query_rows = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_QUERY]
    return {k: v[train_rows] for k, v in data.items()}, {k: v[query_rows] for k, v in data.items()}


def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of the ``n``-point Gauss–Legendre rule on ``[0, 1]`` (float64)."""
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.tensor((x + 1) / 2), torch.tensor(w / 2)


def partition(model, granularity: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Component id of every parameter coordinate of a 1-layer HookedTransformer.

    Written from the documented labels: ``embed``, ``pos_embed``, ``L0H{h}`` (``W_Q/W_K/W_V/W_O``
    and ``b_Q/b_K/b_V`` of head ``h``), ``L0.attn.b_O``, ``L0.mlp`` (``"head"``) or ``L0N{n}``
    (``W_in[:, n]``, ``b_in[n]``, ``W_out[n]``) plus ``L0.mlp.b_out`` (``"neuron"``), ``unembed``.

    Args:
        model: the HookedTransformer.
        granularity: ``"head"`` or ``"neuron"``.

    Returns:
        ``(labels, {parameter name: LongTensor of its shape holding label indices})``.
    """
    labels: list[str] = []

    def lid(label: str) -> int:
        if label not in labels:
            labels.append(label)
        return labels.index(label)

    index = {}
    for name, p in model.named_parameters():
        ids = torch.full(p.shape, -1, dtype=torch.long)
        kind = name.rsplit(".", 1)[1]
        if name == "embed.W_E":
            ids[:] = lid("embed")
        elif name == "pos_embed.W_pos":
            ids[:] = lid("pos_embed")
        elif name.startswith("unembed."):
            ids[:] = lid("unembed")
        elif name == "blocks.0.attn.b_O":
            ids[:] = lid("L0.attn.b_O")
        elif name.startswith("blocks.0.attn."):
            for h in range(p.shape[0]):
                ids[h] = lid(f"L0H{h}")
        elif name.startswith("blocks.0.mlp.") and granularity == "head":
            ids[:] = lid("L0.mlp")
        elif kind == "b_out":
            ids[:] = lid("L0.mlp.b_out")
        elif kind == "W_in":
            for n in range(p.shape[1]):
                ids[:, n] = lid(f"L0N{n}")
        elif kind in ("b_in", "W_out"):
            for n in range(p.shape[0]):
                ids[n] = lid(f"L0N{n}")
        assert int(ids.min()) >= 0, f"{name} is not covered by the {granularity} partition"
        index[name] = ids
    return labels, index


class KinkOracle:
    """φ_s by bisected kinks and piecewise Gauss–Legendre, and the optimizer unrolled by hand.

    Args:
        traj: the recorded run (float64 model).
        queries: ``{"tokens", "label"}``; the metric is the summed correct-label log-probability.
        train_data: the training set the run was recorded on (batch ids index its rows).
        nodes: Gauss–Legendre nodes per smooth piece.
    """

    def __init__(self, traj, queries, train_data, nodes: int = NODES) -> None:
        self.model = traj.model(0)  # the architecture; parameters are always passed explicitly
        self.names = [n for n, _ in self.model.named_parameters()]
        self.queries, self.train_data = queries, train_data
        self.T = traj.num_steps
        self.w = [{k: v.to(torch.float64) for k, v in traj.params_at(s).items()} for s in range(self.T + 1)]
        self.ids = [traj.batch_ids(s) for s in range(self.T)]
        self.lr = [traj.lr(s) for s in range(self.T)]
        self.kinks: list[torch.Tensor] = []
        self.phi = [self._phi(s, nodes) for s in range(self.T)]

    # ------------------------------------------------------------------ model
    def _forward(self, w, tokens):
        store = {}

        def keep(z, hook):
            store["pre"] = z

        with self.model.hooks(fwd_hooks=[(HOOK, keep)]):
            logits = functional_call(self.model, w, (tokens,))
        return logits, store["pre"]

    def q_and_pre(self, w):
        """``q(w)`` (sum over queries of the correct log-probability) and the pre-activations."""
        logits, pre = self._forward(w, self.queries["tokens"])
        lp = torch.log_softmax(logits[:, -1], -1).gather(1, self.queries["label"][:, None])
        return lp.sum(), pre

    def q(self, w) -> float:
        """``q(w)`` as a float."""
        with torch.no_grad():
            return float(self.q_and_pre(w)[0])

    def delta(self, s: int):
        """``Δ_s = w_{s+1} - w_s``."""
        return {k: self.w[s + 1][k] - self.w[s][k] for k in self.names}

    def _along(self, s: int, t: torch.Tensor):
        """Stacked parameters ``w_s + t_j Δ_s`` for every ``t_j``."""
        w, d = self.w[s], self.delta(s)
        return {k: w[k][None] + t.reshape(-1, *[1] * w[k].ndim) * d[k][None] for k in self.names}

    def _pre_at(self, s: int, t: torch.Tensor) -> torch.Tensor:
        """``[len(t), units]`` pre-activations of every query, position and neuron at ``t``."""
        with torch.no_grad():
            pre = vmap(lambda w: self._forward(w, self.queries["tokens"])[1])(self._along(s, t))
        return pre.reshape(len(t), -1)

    # ------------------------------------------------------------------ φ_s
    def _sign_changes(self, s: int) -> torch.Tensor:
        """Sorted ``t`` of every ReLU sign change along step ``s``, bisected on the forward pass."""
        grid = torch.linspace(0, 1, GRID + 1, dtype=torch.float64)
        z = self._pre_at(s, grid)
        cell, unit = torch.nonzero(z[:-1] * z[1:] < 0, as_tuple=True)
        lo, hi, z_lo = grid[cell], grid[cell + 1], z[cell, unit]
        for _ in range(BISECT if len(cell) else 0):
            mid = (lo + hi) / 2
            z_mid = self._pre_at(s, mid)[torch.arange(len(cell)), unit]
            left = z_mid * z_lo > 0  # the root lies right of mid
            lo, z_lo, hi = torch.where(left, mid, lo), torch.where(left, z_mid, z_lo), torch.where(left, hi, mid)
        return torch.sort((lo + hi) / 2).values

    def _phi(self, s: int, nodes: int):
        """``φ_s``: ``∇q`` integrated piece by piece between the sign changes of step ``s``."""
        cuts = self._sign_changes(s)
        self.kinks.append(cuts)
        bounds = torch.cat([torch.zeros(1, dtype=torch.float64), cuts, torch.ones(1, dtype=torch.float64)])
        x, wx = gauss_legendre(nodes)
        lo, width = bounds[:-1, None], (bounds[1:] - bounds[:-1])[:, None]
        t, weight = (lo + width * x).reshape(-1), (width * wx).reshape(-1)
        grads, pre = vmap(grad(self.q_and_pre, has_aux=True))(self._along(s, t))
        # one activation pattern per piece: a sign change the grid missed would break this
        pattern = pre.reshape(len(bounds) - 1, nodes, -1) > 0
        assert bool((pattern == pattern[:, :1]).all()), f"step {s}: activation pattern changes inside a piece"
        return {k: torch.einsum("n,n...->...", weight, grads[k]) for k in self.names}

    # ------------------------------------------------------------------ splits
    def per_component(self, a, b, index, n_comp: int) -> torch.Tensor:
        """``[C]`` ``<a|_c, b|_c>`` for every component ``c``."""
        out = torch.zeros(n_comp, dtype=torch.float64)
        for k in self.names:
            out.index_add_(0, index[k].reshape(-1), (a[k] * b[k]).reshape(-1))
        return out

    def example_grads(self, s: int):
        """``{name: [B, ...]}`` per-example training-loss gradients at ``w_s`` for the batch of step ``s``."""
        tokens, label = self.train_data["tokens"][self.ids[s]], self.train_data["label"][self.ids[s]]

        def loss(w, tok, lab):
            logits = functional_call(self.model, w, (tok[None],))[0, -1]
            return -torch.log_softmax(logits, -1).gather(0, lab[None])[0]

        return vmap(grad(loss), in_dims=(None, 0, 0))(self.w[s], tokens, label)

    def train_split(self, kind: str, hp: dict, index, n_comp: int, window: tuple[int, int] | None = None):
        """Per-example entries on the seen clock, with the optimizer's linear form unrolled.

        Forward pass over the run: per-example gradients ``∇ℓ_i(w_k)``, the momentum buffer /
        ``exp_avg`` and ``exp_avg_sq`` by our own recursion (from our gradients), and the
        coefficient ``coef_s`` with which the buffer enters ``Δ_s`` (SGD: ``-lr_s``; AdamW:
        ``P_s = -lr_s / (1 - β1^t) / (sqrt(v_{s+1} / (1 - β2^t)) + eps)``). A unit ``u`` entered
        into the buffer at step ``k`` is then ``coef_s decay^{s-k} u`` of ``Δ_s`` for ``s >= k``.

        Args:
            kind: ``"sgd"`` (momentum, dampening, coupled weight decay) or ``"adamw"``.
            hp: the optimizer's hyper-parameters (as given to torch).
            index, n_comp: a component partition (see :func:`partition`).
            window: ``(a, b)``: the steps whose ``<φ_s, Δ_s>`` are explained (default: all).

        Returns:
            ``(data [C, N, T], pseudo {name: [C, T]})``: the entry of example ``i`` seen at step
            ``k`` restricted to component ``c``, and the pseudo-entries ``regularization``,
            ``weight_decay`` and ``history`` (the buffer carried into the window, on its first step).
        """
        a, b = window or (0, self.T)
        N = len(self.train_data["label"])
        names = self.names
        buf = {n: torch.zeros_like(v) for n, v in self.w[0].items()}
        sq = {n: torch.zeros_like(v) for n, v in self.w[0].items()}
        grads, units, regs, coef, carried = [], [], [], [], None
        if kind == "sgd":
            mu, damp, lam = hp["momentum"], hp["dampening"], hp["weight_decay"]
            decay = mu
        else:
            (b1, b2), eps, lam = hp["betas"], hp["eps"], hp["weight_decay"]
            decay = b1
        for k in range(b):
            g = self.example_grads(k)
            gmean = {n: g[n].mean(0) for n in names}
            B = len(self.ids[k])
            if k == a:
                carried = {n: decay * buf[n] for n in names}
            if kind == "sgd":
                c = 1.0 if (k == 0 or mu == 0.0) else 1.0 - damp  # torch: buffer = gradient at the first step
                units.append(c / B)
                regs.append({n: c * lam * self.w[k][n] for n in names})
                buf = {n: mu * buf[n] + c * (gmean[n] + lam * self.w[k][n]) for n in names}
                coef.append({n: torch.full_like(buf[n], -self.lr[k]) for n in names})
            else:
                t = k + 1
                units.append((1 - b1) / B)
                regs.append(None)
                buf = {n: b1 * buf[n] + (1 - b1) * gmean[n] for n in names}
                sq = {n: b2 * sq[n] + (1 - b2) * gmean[n] ** 2 for n in names}
                coef.append({n: -self.lr[k] / (1 - b1**t) / (sq[n].sqrt() / (1 - b2**t) ** 0.5 + eps) for n in names})
            grads.append(g)
        data = torch.zeros(n_comp, N, self.T, dtype=torch.float64)
        pseudo = {p: torch.zeros(n_comp, self.T, dtype=torch.float64) for p in ("regularization", "weight_decay", "history")}
        for k in range(a, b):
            # Ψ_k = Σ_{k <= s < b} coef_s decay^{s-k} φ_s: what a unit entered at step k does to q
            psi = {n: sum(coef[s][n] * decay ** (s - k) * self.phi[s][n] for s in range(k, b)) for n in names}
            for j, i in enumerate(self.ids[k].tolist()):
                gi = {n: units[k] * grads[k][n][j] for n in names}
                data[:, i, k] += self.per_component(psi, gi, index, n_comp)
            if kind == "sgd":
                pseudo["regularization"][:, k] = self.per_component(psi, regs[k], index, n_comp)
            else:  # decoupled decay acts on Δ_k directly
                wd = {n: -self.lr[k] * lam * self.w[k][n] for n in names}
                pseudo["weight_decay"][:, k] = self.per_component(self.phi[k], wd, index, n_comp)
            if k == a:
                pseudo["history"][:, k] = self.per_component(psi, carried, index, n_comp)
        return data, pseudo


def record(tmp_path, opt_name: str, seed: int):
    """Record ``STEPS`` minibatch steps of a float64 ReLU model; returns the run, queries, data, hyper-parameters."""
    train_data, queries = split_data()
    model = tiny_model(P_MOD, seed=seed, dtype=torch.float64)
    opt = OPTIMIZERS[opt_name](model.parameters())
    traj = train(model, opt, train_data, ce_loss, steps=STEPS, batch_size=BATCH, seed=seed,
                 run_dir=tmp_path / opt_name, checkpoint_every=3, progress=False)
    return traj, queries, train_data, opt.defaults


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(name)``: a recorded float64 ReLU run with optimizer ``name`` and its oracle (built once)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            traj, queries, train_data, hp = record(tmp_path_factory.mktemp(name), name, seed=1)
            cache[name] = traj, queries, hp, KinkOracle(traj, queries, train_data)
        return cache[name]

    return get


def entries(attr, dims: tuple[str, ...]) -> torch.Tensor:
    """``attr.values`` with its axes in the order ``dims``."""
    return attr.values.permute(*[attr.dims.index(d) for d in dims])


def reorder(oracle_values: torch.Tensor, labels: list[str], attr) -> torch.Tensor:
    """Oracle rows (first axis, labelled ``labels``) in the order of ``attr``'s component axis."""
    assert sorted(attr.coords["component"]) == sorted(labels)
    return oracle_values[[labels.index(c) for c in attr.coords["component"]]]


def assert_agree(ours: torch.Tensor, oracle: torch.Tensor, k: float = K_AGREE) -> float:
    """``max |ours - oracle| <= k * max |oracle|``; returns the relative deviation."""
    scale = float(oracle.abs().max())
    assert scale > 1e-8  # the compared entries are not all zero
    dev = float((ours - oracle).abs().max()) / scale
    assert dev <= k, f"deviation {dev:.3g} of the largest entry exceeds {k:g}"
    return dev


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_oracle_is_exact(runs, name):
    """(a) Σ_p φ_s Δ_s = q(w_{s+1}) - q(w_s) per step, to float64 rounding; kinks are really cut."""
    traj, queries, _, orc = runs(name)
    assert sum(len(c) for c in orc.kinks) > 0  # ReLUs switch inside steps
    measured = torch.tensor([orc.q(orc.w[s + 1]) - orc.q(orc.w[s]) for s in range(orc.T)], dtype=torch.float64)
    total = torch.tensor([sum(float((orc.phi[s][k] * orc.delta(s)[k]).sum()) for k in orc.names) for s in range(orc.T)], dtype=torch.float64)
    assert float((total - measured).abs().max()) <= 1e-12 * float(measured.abs().max())
    # and the explained model is the recorded one: the summed changes telescope to q(w_T) - q(w_0)
    m = traj.model(traj.num_steps).double()
    with torch.no_grad():
        lp = torch.log_softmax(m(queries["tokens"])[:, -1], -1).gather(1, queries["label"][:, None]).sum()
    assert abs(float(measured.sum()) - (float(lp) - orc.q(orc.w[0]))) <= 1e-12 * float(measured.abs().sum())


def component_oracle(orc, granularity: str):
    """``(labels, [C, T])``: the oracle's ``<φ_s|_c, Δ_s|_c>``."""
    labels, index = partition(orc.model, granularity)
    return labels, torch.stack([orc.per_component(orc.phi[s], orc.delta(s), index, len(labels)) for s in range(orc.T)], 1)


@pytest.mark.parametrize("name,granularity", [("sgd", "head"), ("sgd", "neuron"), ("momentum", "head"), ("adamw", "neuron")])
def test_step_component_split_matches_oracle(runs, name, granularity):
    """(b) explain's <φ_s|_c, Δ_s|_c> per step and component = the oracle's."""
    traj, queries, _, orc = runs(name)
    attr = explain(traj, queries, by=("step", "component"), components=granularity, **EXPLAIN)
    assert attr.meta["kinks"] > 0  # the kink-aware path was taken
    labels, oracle = component_oracle(orc, granularity)
    assert_agree(entries(attr, ("component", "step")), reorder(oracle, labels, attr))


@pytest.mark.parametrize("nodes", [1, 32])
def test_wrong_quadrature_is_caught(runs, nodes):
    """The comparison is not vacuous: a rule that ignores the kinks misses the oracle by far more
    than the tolerance, with one node (midpoint) and with as many as explain's refinement cap."""
    traj, queries, _, orc = runs("sgd")
    attr = explain(traj, queries, by=("step", "component"), components="head", dtype=torch.float64,
                   kink_aware=False, nodes=nodes, max_nodes=nodes, progress=False)
    labels, oracle = component_oracle(orc, "head")
    with pytest.raises(AssertionError, match="exceeds"):
        assert_agree(entries(attr, ("component", "step")), reorder(oracle, labels, attr))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_train_split_matches_oracle(runs, name):
    """(c) explain's per-example entries (seen clock, adjoint) = the optimizer unrolled by hand."""
    traj, queries, hp, orc = runs(name)
    granularity = "neuron" if name == "adamw" else "head"  # neuron: per-example gradients; head: jvp
    attr = explain(traj, queries, by=("component", "train", "step"), components=granularity, **EXPLAIN)
    assert attr.meta["kinks"] > 0
    assert attr.meta["train_grads"] == ("per_example" if granularity == "neuron" else "jvp")
    labels, index = partition(orc.model, granularity)
    data, pseudo = orc.train_split("adamw" if name == "adamw" else "sgd", hp, index, len(labels))
    check_train_entries(attr, labels, data, pseudo, orc.T, traj.num_train)


def test_train_split_window_carries_history(runs):
    """A window that starts mid-run: momentum carried in is the ``history`` entry of its first step."""
    traj, queries, hp, orc = runs("momentum")
    a = 2
    attr = explain(traj, queries, by=("component", "train", "step"), components="head", steps=(a, orc.T), **EXPLAIN)
    labels, index = partition(orc.model, "head")
    data, pseudo = orc.train_split("sgd", hp, index, len(labels), window=(a, orc.T))
    assert float(pseudo["history"].abs().max()) > 1e-3 * float(data.abs().max())  # not a trivial check
    check_train_entries(attr, labels, data[..., a:], {p: v[..., a:] for p, v in pseudo.items()}, orc.T - a, traj.num_train)


def check_train_entries(attr, labels, data, pseudo, n_steps: int, N: int) -> None:
    """Compare a ``(component, train, step)`` attribution with the oracle's ``[C, N, T]`` entries."""
    assert attr.coords["train"][N:] == ["history", "weight_decay", "regularization", "update_residual"]
    assert len(attr.coords["step"]) == n_steps
    ours = entries(attr, ("component", "train", "step"))
    data = reorder(data, labels, attr)
    assert_agree(ours[:, :N], data)
    scale = float(data.abs().max())
    col = attr.coords["train"].index
    for p, v in pseudo.items():  # exactly zero where the optimizer has no such entry
        v = reorder(v, labels, attr)
        assert float((ours[:, col(p)] - v).abs().max()) <= K_AGREE * scale, p
    # a float64 run: the update's reconstruction leaves only rounding
    assert float(ours[:, col("update_residual")].abs().max()) <= K_AGREE * scale
