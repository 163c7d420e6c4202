"""What every sweep of the engine shares: the parameter layout, the query function, the
component index, the queries on the device, and the optimizer algebra of a step.

:class:`Setup` is built once per :func:`explaind_tl.explain` call, after the plan. It holds no
per-step state: the certified quadrature (:mod:`.certify`) and the sweeps (:mod:`.realized`,
:mod:`.seen`) keep theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from explaind_tl.contraction import Blocks
from explaind_tl.engine.options import TRAIN_GRADS, ExplainOptions
from explaind_tl.engine.plan import Plan
from explaind_tl.model.functional import ParamLayout, Params, QueryFunction
from explaind_tl.optim import buffer_after, update_coefficients_for

# replay_mb="auto" with a spare core: the records budget of a train-axis sweep
AUTO_REPLAY_MB = 8.0


class Setup:
    """The shared state of one explain call.

    Args:
        trajectory: the run.
        batch: the queries (``normalize_queries``), moved to ``device`` here.
        metric_fn: ``(logits, batch) -> [Q] or [Q, O]``.
        plan: what is computed.
        cmap: the component map, or ``None`` without a component axis.
        options: the resolved options (``dtype`` and ``query_chunk`` set).
        device: where the work runs.
        position: the position a built-in metric reads, or a next-token metric's read positions
            (``None`` for a callable metric).
        directional: per-query rows by forward-mode derivatives (``query_grads``).
        sweep_window: the steps to sweep, inside ``plan.window`` (default: all of it).
    """

    def __init__(
        self,
        trajectory: Any,
        batch: dict[str, Tensor],
        metric_fn: Callable,
        plan: Plan,
        cmap: Any,
        options: ExplainOptions,
        device: torch.device,
        position: int | list[int] | None,
        directional: bool,
        sweep_window: tuple[int, int] | None = None,
    ) -> None:
        dtype = options.dtype
        self.traj = trajectory
        self.plan = plan
        # the steps this sweep covers: the plan's window, or one rank's range of it (the plan's
        # window still defines the bins and the ends of the total certificate)
        self.sweep_window = sweep_window if sweep_window is not None else plan.window
        self.options = options
        self.dtype = dtype
        self.device = device
        # replay the next segment in a background thread when there is a core to spare
        self.prefetch = torch.get_num_threads() > 1
        self.query_chunk = options.query_chunk
        self.train_chunk = options.train_chunk
        self.jvp_chunk = options.train_chunk  # activations of a chunk are what the jvp holds: memory flat in N_train
        self.batch = {k: v.to(device) for k, v in batch.items()}
        model = trajectory.model()
        self.names = list(trajectory.param_names)
        params0 = dict(model.named_parameters())
        self.layout = ParamLayout(tuple(self.names), tuple(params0[n].shape for n in self.names))
        self.layout_shapes = dict(zip(self.layout.names, self.layout.shapes))
        self.run_itemsize = params0[self.names[0]].element_size()  # the replayed records' dtype
        self.fast_forward = options.fast_forward
        self.position = position
        self.qf = QueryFunction(
            model, self.names, metric_fn, dtype=dtype, device=device,
            position=position if options.fast_forward else None,  # read-out: a built-in metric's position(s)
        )
        # the read-out forward is checked against TransformerLens on the queries before use
        self.readout_error = None
        self._qf64: QueryFunction | None = None
        self.checkpoints = set(trajectory.checkpoint_steps)
        if "tokens" in self.batch:
            self.readout_error = self.qf.check_readout(self.batch["tokens"][:64])
        else:
            self.qf.readout = self.qf.cert_readout = None
        self.kink_aware = options.kinks and self.qf.has_kinks
        self.unit_filter = self.unit_index = None
        if self.kink_aware and "tokens" in self.batch:
            self.unit_filter = self.qf.relevant_units(self.batch["tokens"].shape[1], position)
            if self.unit_filter is not None:
                self.unit_index = torch.nonzero(self.unit_filter).reshape(-1)
        self.spec = trajectory.optimizer_spec
        self.cmap = cmap
        if cmap is not None:
            self.flat_index = self._flat_component_index(cmap).to(device)
            self.n_comp = len(cmap.labels)
        else:
            self.flat_index = None
            self.n_comp = 1
        # the components as contiguous column blocks of the flat vector (the seen sweep's order)
        self.blocks = Blocks.from_index(self.flat_index, self.layout.numel, self.n_comp)
        self.eps = torch.finfo(dtype).eps
        # per-query rows on the realized clock: forward-mode derivatives along each (update vector,
        # component) instead of per-query gradients
        self.directional = directional
        # train axis: data entries by forward-mode derivatives when rows x components are few
        # token terms (train_position) exist only on the forward-mode path (no [B, terms, P] block)
        self.train_jvp = plan.n_terms > 0 or plan.n_rows * self.n_comp <= TRAIN_GRADS[options.train_grads]
        self._onehot: Tensor | None = None
        # seen clock, per-query rows, one thread: each query chunk's φ̂ rows are folded into Ã as
        # soon as the chunk is certified (run_seen), so only a chunk's rows of φ̂ are held; a chunk
        # is then what one per-query Jacobian call takes (evenly sized, at most jacobian_mb)
        self.stream_phi = (plan.clock == "seen" and plan.resolve_query and not self.prefetch
                           and self.blocks.perm is None and not self.spec.nesterov)
        if self.stream_phi:
            per_query = plan.rows_per_query * self.layout.numel * torch.finfo(dtype).bits // 8
            cap = min(self.query_chunk, max(1, int(options.jacobian_mb * 2**20) // per_query))
            self.query_chunk = -(-plan.n_query // -(-plan.n_query // cap))  # ceil(Q / ceil(Q / cap))

    def float64_query_function(self) -> QueryFunction:
        """The query function in float64 (its own model copies, so it never shares a module with
        the certificate's forwards on the replay thread), for the steps whose working-dtype
        ``φ̂`` misses the certificate (:meth:`Certifier.phi`). Built on first use."""
        if self._qf64 is None:
            qf64 = QueryFunction(
                self.traj.model(), self.names, self.qf.metric, dtype=torch.float64, cert_dtype=torch.float64,
                device=self.device, position=self.position if self.fast_forward else None,
            )
            if self.qf.readout is None:  # switched off by its check: stay with TransformerLens's forward
                qf64.readout = qf64.cert_readout = None
            self._qf64 = qf64
        return self._qf64

    def note_readout_error(self, err: float | None) -> None:
        """Keep the largest read-out difference seen (``meta["readout_error"]``)."""
        if err is not None:
            self.readout_error = max(self.readout_error or 0.0, err)

    # ---------------------------------------------------------------- layout
    def _flat_component_index(self, cmap) -> Tensor:
        parts = []
        for name in self.names:
            if name not in cmap.index:
                raise ValueError(f"component map does not cover trainable parameter {name!r}")
            parts.append(cmap.index[name].reshape(-1).long())
        return torch.cat(parts)

    def reduce(self, prod: Float[Tensor, "... param"]) -> Float[Tensor, "... component"]:
        """Per-component sums of a flat product (or the plain sum without a component axis)."""
        if self.flat_index is None:
            return prod.sum(-1, keepdim=True)
        return self.cmap.reduce_flat(prod)

    def per_component(self, V: Float[Tensor, "vector param"]) -> Float[Tensor, "tangent param"]:
        """Each vector restricted to each component, ``[X * C, P]`` (vector-major); ``V`` itself
        without a component axis."""
        if self.flat_index is None:
            return V
        if self._onehot is None:
            self._onehot = torch.zeros(self.n_comp, self.layout.numel, dtype=torch.float64, device=self.device)
            self._onehot[self.flat_index, torch.arange(self.layout.numel, device=self.device)] = 1.0
        return (V[:, None, :] * self._onehot[None].to(V.dtype)).reshape(-1, V.shape[1])

    def flat64(self, d: Params) -> Tensor:
        return self.layout.flatten({k: v.to(self.device) for k, v in d.items()}, dtype=torch.float64)

    def sorted64(self, d: Params) -> Tensor:
        """:meth:`flat64` in the component blocks' order (:attr:`blocks`)."""
        return self.blocks.sort(self.flat64(d))

    def to_work(self, d: Params) -> Params:
        return {k: d[k].to(self.device, self.dtype) for k in self.names}

    def to_cert(self, d: Params) -> Params:
        return {k: d[k].to(self.device, self.qf.cert_dtype) for k in self.names}

    def replay_hold(self) -> int | None:
        """The most steps of records a reverse sweep holds before it replays a checkpoint
        segment in sub-segments (``options.replay_mb``, ``"auto"``: :data:`AUTO_REPLAY_MB` when
        segments are replayed on a spare core; ``None``: whole segments). A step's
        record holds its parameters and the optimizer's per-parameter state (Adam: two
        vectors; SGD with momentum: one), in the run's dtype."""
        mb = self.options.replay_mb
        if mb == "auto":  # the extra replay is free only on a spare core
            mb = AUTO_REPLAY_MB if self.prefetch else None
        if mb is None:
            return None
        spec = self.spec
        vectors = 1 + (2 if spec.kind in ("adam", "adamw") else int(spec.momentum > 0))
        return max(1, int(mb * 2**20) // (vectors * self.layout.numel * self.run_itemsize))

    def chunks(self) -> list[Tensor]:
        q = self.plan.n_query
        return [torch.arange(i, min(i + self.query_chunk, q), device=self.device) for i in range(0, q, self.query_chunk)]

    def row_slice(self, idx: Tensor) -> slice:
        if not self.plan.resolve_query:
            return slice(0, self.plan.rows_per_query)
        o = self.plan.rows_per_query
        return slice(int(idx[0]) * o, (int(idx[-1]) + 1) * o)

    # ---------------------------------------------------------- optimizer algebra
    def step_spec(self, rec):
        """The optimizer spec of step ``rec.step``: hyper-parameters may change between steps."""
        return rec.spec if getattr(rec, "spec", None) is not None else self.spec

    def beta_of(self, s: int) -> float:
        """``β_s`` (Adam: ``beta1``; SGD: ``momentum``) of step ``s``, from the recorded hyper-parameters."""
        spec = self.traj.optimizer_spec_at(s)
        return spec.betas[0] if spec.kind in ("adam", "adamw") else spec.momentum

    def coefficients(self, rec):
        """``β_s, c_s, P_s, e_s`` and the decays of step ``rec.step``, from that step's spec."""
        first = not rec.state_before or not any(rec.state_before.values())
        return update_coefficients_for(self.step_spec(rec), rec.lr, rec.step_count, rec.state_after, first, rec.params)

    def buffer(self, state: dict, spec=None, sort: bool = False) -> Tensor:
        """The flat float64 momentum buffer held in an optimizer state (zero when absent);
        in the component blocks' order with ``sort``."""
        if not state or not any(state.values()):
            return torch.zeros(self.layout.numel, dtype=torch.float64, device=self.device)
        flat = self.flat64(buffer_after(spec or self.spec, state))
        return self.blocks.sort(flat) if sort else flat
