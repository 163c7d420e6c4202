"""The optimizer algebra, in one place (docs/design.md §3).

Supported optimizers (exactly one param group holding exactly the model's trainable
parameters, in ``named_parameters()`` order):

* ``torch.optim.AdamW`` (decoupled weight decay),
* ``torch.optim.Adam`` (coupled L2 ``weight_decay``),
* ``torch.optim.SGD`` (``momentum``, ``dampening``, ``nesterov``, coupled ``weight_decay``).

Both recording and replay run torch's single-tensor implementation (``foreach=False``,
``fused=None``) so replay is bitwise identical to recording.

One step ``s`` (torch step counter ``t = s + 1``, learning rate ``lr``) is written in the
linear form used by the engine::

    gt_s    = g_s + coupled_wd * w_s
    b_{s+1} = beta * b_s + c * gt_s                 (adam: exp_avg; sgd: momentum_buffer)
    Δ_s     = -decoupled_wd * w_s + P ⊙ b_{s+1} + e ⊙ gt_s

with ``P`` (and ``e`` for nesterov) diagonal, computed in float64 from the recorded state.

Schedulers (OneCycleLR, CyclicLR) and hand edits may change ``lr``, ``betas``, ``eps``,
``momentum``, ``dampening`` and ``weight_decay`` between steps: the recorder stores the values
each step used (:func:`step_hparams`, columns :data:`HPARAM_COLUMNS`), replay sets them before
the step (:func:`apply_hparams`) and the algebra of step ``s`` uses that step's spec
(:func:`spec_for_step`), so ``beta``, ``c``, ``P``, ``e`` and the decays all carry an index
``s``. Settings that change the form of the update (:func:`fixed_settings`: nesterov, amsgrad,
maximize, foreach/fused, momentum on/off, the param groups) cannot change during a run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from explaind_tl.errors import UnsupportedOptimizerError

SUPPORTED = (
    "torch.optim.AdamW, torch.optim.Adam (coupled L2 weight_decay) and torch.optim.SGD "
    "(momentum, dampening, nesterov, weight_decay), with a single param group holding exactly "
    "the model's trainable parameters, float (not Tensor) hyper-parameters, and "
    "amsgrad/maximize/differentiable/capturable/fused all off"
)

StateDict = dict[str, dict[str, Tensor]]


@dataclass(frozen=True)
class OptimizerSpec:
    """Class and hyper-parameters of a supported optimizer (enough to rebuild it).

    Attributes:
        kind: ``"adamw"``, ``"adam"`` or ``"sgd"``.
        lr: Initial learning rate of the single param group.
        betas: Adam ``(beta1, beta2)``.
        eps: Adam epsilon.
        weight_decay: Decoupled for AdamW, coupled L2 for Adam and SGD.
        momentum: SGD momentum ``μ``.
        dampening: SGD dampening ``δ``.
        nesterov: SGD Nesterov momentum.
    """

    kind: Literal["adamw", "adam", "sgd"]
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        d = asdict(self)
        d["betas"] = [float(b) for b in self.betas]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptimizerSpec:
        """Rebuild from :meth:`to_dict` output."""
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(float(b) for b in d["betas"])
        if d.get("kind") not in ("adamw", "adam", "sgd"):
            raise UnsupportedOptimizerError(f"unknown optimizer kind {d.get('kind')!r}; supported: {SUPPORTED}")
        return cls(**d)

    @property
    def has_buffer(self) -> bool:
        """Whether the optimizer keeps a first-moment / momentum buffer."""
        return self.kind in ("adam", "adamw") or self.momentum != 0.0

    @property
    def state_keys(self) -> tuple[str, ...]:
        """Names of the per-parameter state tensors torch keeps."""
        if self.kind in ("adam", "adamw"):
            return ("step", "exp_avg", "exp_avg_sq")
        return ("momentum_buffer",) if self.momentum != 0.0 else ()


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        raise UnsupportedOptimizerError(f"{name} as a Tensor is not supported; use a Python float. Supported: {SUPPORTED}")
    return float(value)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, param)`` of the trainable parameters in ``named_parameters()`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def spec_from_optimizer(opt: torch.optim.Optimizer, model: nn.Module) -> OptimizerSpec:
    """Read the :class:`OptimizerSpec` of ``opt``, refusing anything not decomposable exactly.

    Args:
        opt: A torch optimizer over ``model``'s trainable parameters.
        model: The model being trained.

    Returns:
        The spec (``lr`` is the param group's current lr).

    Raises:
        UnsupportedOptimizerError: naming the offending setting and what is supported.
    """
    cls = type(opt)
    if cls is torch.optim.AdamW:
        kind = "adamw"
    elif cls is torch.optim.Adam:
        kind = "adam"
    elif cls is torch.optim.SGD:
        kind = "sgd"
    else:
        raise UnsupportedOptimizerError(f"optimizer {cls.__module__}.{cls.__qualname__} is not supported; supported: {SUPPORTED}")
    if len(opt.param_groups) != 1:
        raise UnsupportedOptimizerError(
            f"{cls.__name__} has {len(opt.param_groups)} param groups; exactly one is supported "
            f"(per-group hyper-parameters are not). Supported: {SUPPORTED}"
        )
    group = opt.param_groups[0]
    named = trainable_parameters(model)
    gparams = group["params"]
    if len(gparams) != len(named) or any(p is not q for p, (_, q) in zip(gparams, named)):
        ids = {id(p) for p in gparams}
        missing = [n for n, p in named if id(p) not in ids]
        raise UnsupportedOptimizerError(
            "the optimizer's param group must hold exactly the model's trainable parameters in "
            f"named_parameters() order (missing: {missing[:5]}, group size {len(gparams)}, "
            f"model has {len(named)}). Freeze parameters with requires_grad_(False) instead."
        )
    for flag in ("amsgrad", "maximize", "differentiable", "capturable"):
        if group.get(flag, False):
            raise UnsupportedOptimizerError(f"{cls.__name__}({flag}=True) is not supported; supported: {SUPPORTED}")
    if group.get("fused"):
        raise UnsupportedOptimizerError(f"{cls.__name__}(fused=True) is not supported (replay uses foreach=False); supported: {SUPPORTED}")
    lr = _as_float("lr", group["lr"])
    wd = _as_float("weight_decay", group.get("weight_decay", 0.0))
    if kind in ("adam", "adamw"):
        dwd = bool(group.get("decoupled_weight_decay", kind == "adamw"))
        if kind == "adam" and dwd:
            raise UnsupportedOptimizerError(
                "Adam(decoupled_weight_decay=True) is not supported: use torch.optim.AdamW "
                f"(numerically the same). Supported: {SUPPORTED}"
            )
        if kind == "adamw" and not dwd:
            raise UnsupportedOptimizerError(f"AdamW with decoupled_weight_decay=False is not supported; supported: {SUPPORTED}")
        b1, b2 = group["betas"]
        return OptimizerSpec(
            kind=kind,
            lr=lr,
            betas=(_as_float("betas[0]", b1), _as_float("betas[1]", b2)),
            eps=_as_float("eps", group["eps"]),
            weight_decay=wd,
        )
    return OptimizerSpec(
        kind="sgd",
        lr=lr,
        weight_decay=wd,
        momentum=_as_float("momentum", group.get("momentum", 0.0)),
        dampening=_as_float("dampening", group.get("dampening", 0.0)),
        nesterov=bool(group.get("nesterov", False)),
    )


# per-step hyper-parameters stored as step-record columns (besides ``lr``), per optimizer kind
HPARAM_COLUMNS: dict[str, tuple[str, ...]] = {
    "adamw": ("beta1", "beta2", "eps", "weight_decay"),
    "adam": ("beta1", "beta2", "eps", "weight_decay"),
    "sgd": ("momentum", "dampening", "weight_decay"),
}


def step_hparams(opt: torch.optim.Optimizer, kind: str) -> dict[str, float]:
    """The hyper-parameters the next ``opt.step()`` will use, as the columns of ``kind``.

    Args:
        opt: The (single-group) optimizer.
        kind: ``"adamw"``, ``"adam"`` or ``"sgd"``.

    Returns:
        ``{"lr": ..., "beta1": ..., ...}`` (:data:`HPARAM_COLUMNS` plus ``lr``), Python floats.

    Raises:
        UnsupportedOptimizerError: a value is a Tensor, not a number, or not finite.
    """
    group = opt.param_groups[0]
    raw: dict[str, Any] = {"lr": group["lr"], "weight_decay": group.get("weight_decay", 0.0)}
    if kind in ("adam", "adamw"):
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise UnsupportedOptimizerError(f"betas must be a pair of floats, got {betas!r}")
        raw.update(beta1=betas[0], beta2=betas[1], eps=group["eps"])
    else:
        raw.update(momentum=group.get("momentum", 0.0), dampening=group.get("dampening", 0.0))
    out = {}
    for k, v in raw.items():
        try:
            f = _as_float(k, v)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, UnsupportedOptimizerError):
                raise
            raise UnsupportedOptimizerError(f"the param group's {k} must be a number, got {v!r}") from exc
        if not math.isfinite(f):
            raise UnsupportedOptimizerError(f"the param group's {k} is not finite ({f})")
        out[k] = f
    return out


def apply_hparams(opt: torch.optim.Optimizer, kind: str, hparams: Mapping[str, float]) -> None:
    """Set a step's recorded hyper-parameters (:func:`step_hparams` output) on ``opt`` (replay)."""
    group = opt.param_groups[0]
    for k, v in hparams.items():
        if k in ("beta1", "beta2"):
            continue
        group[k] = v
    if kind in ("adam", "adamw") and "beta1" in hparams:
        group["betas"] = (hparams["beta1"], hparams["beta2"])


def spec_for_step(spec: OptimizerSpec, hparams: Mapping[str, float]) -> OptimizerSpec:
    """``spec`` with one step's hyper-parameters (``lr`` and :data:`HPARAM_COLUMNS`)."""
    kw: dict[str, Any] = {k: float(hparams[k]) for k in ("lr", "eps", "weight_decay", "momentum", "dampening") if k in hparams}
    if "beta1" in hparams:
        kw["betas"] = (float(hparams["beta1"]), float(hparams["beta2"]))
    return replace(spec, **kw) if kw else spec


def fixed_settings(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Settings that fix the form of the update and so cannot change during a recorded run.

    Returns:
        ``{setting: value}``: the class, the number of param groups and the identity of their
        parameters, the boolean flags (nesterov, amsgrad, maximize, foreach, fused,
        differentiable, capturable, decoupled_weight_decay) and whether SGD momentum is on.
    """
    groups = opt.param_groups
    g = groups[0]
    out: dict[str, Any] = {
        "optimizer class": type(opt).__qualname__,
        "number of param groups": len(groups),
        "parameters of the param group": tuple(id(p) for p in g["params"]),
    }
    for flag in ("nesterov", "amsgrad", "maximize", "foreach", "fused", "differentiable", "capturable", "decoupled_weight_decay"):
        if flag in g:
            out[flag] = g[flag]
    if "momentum" in g and not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        out["momentum on (momentum != 0)"] = g["momentum"] != 0
    return out


def force_single_tensor(opt: torch.optim.Optimizer) -> None:
    """Make ``opt`` use torch's single-tensor code path (``foreach=False``), as replay does."""
    for group in opt.param_groups:
        group["foreach"] = False
    opt.defaults["foreach"] = False


def build_optimizer(spec: OptimizerSpec, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Build the optimizer described by ``spec`` over ``params`` (``foreach=False``).

    Args:
        spec: The optimizer spec.
        params: Trainable parameters in ``named_parameters()`` order.
    """
    params = list(params)
    if spec.kind == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay, foreach=False)
    if spec.kind == "adam":
        return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay, foreach=False)
    if spec.kind == "sgd":
        return torch.optim.SGD(
            params,
            lr=spec.lr,
            momentum=spec.momentum,
            dampening=spec.dampening,
            nesterov=spec.nesterov,
            weight_decay=spec.weight_decay,
            foreach=False,
        )
    raise UnsupportedOptimizerError(f"unknown optimizer kind {spec.kind!r}; supported: {SUPPORTED}")


def _group_params(opt: torch.optim.Optimizer) -> list[Tensor]:
    return list(opt.param_groups[0]["params"])


def optimizer_state_to_tensors(opt: torch.optim.Optimizer, param_names: list[str]) -> dict[str, Tensor]:
    """Flatten the optimizer state into ``{"{key}/{name}": tensor}`` (cloned, contiguous).

    Keys are ``exp_avg``, ``exp_avg_sq``, ``step`` (0-d float32) for Adam/AdamW and
    ``momentum_buffer`` for SGD with momentum. Parameters without state are omitted (step 0).
    """
    params = _group_params(opt)
    if len(params) != len(param_names):
        raise ValueError(f"{len(param_names)} names for {len(params)} parameters")
    out: dict[str, Tensor] = {}
    for name, p in zip(param_names, params):
        for key, value in opt.state.get(p, {}).items():
            if value is None:
                continue
            if not isinstance(value, Tensor):
                value = torch.tensor(float(value), dtype=torch.float32)
            out[f"{key}/{name}"] = value.detach().clone().contiguous()
    return out


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: Mapping[str, Tensor], param_names: list[str]) -> None:
    """Inverse of :func:`optimizer_state_to_tensors`: replace ``opt``'s state (tensors are cloned)."""
    params = _group_params(opt)
    if len(params) != len(param_names):
        raise ValueError(f"{len(param_names)} names for {len(params)} parameters")
    by_name: dict[str, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        key, _, name = k.partition("/")
        by_name.setdefault(name, {})[key] = v
    unknown = set(by_name) - set(param_names)
    if unknown:
        raise ValueError(f"optimizer state for unknown parameters {sorted(unknown)[:5]}")
    opt.state.clear()
    for name, p in zip(param_names, params):
        st = by_name.get(name)
        if st:
            opt.state[p] = {k: v.detach().clone().to(device=p.device) for k, v in st.items()}


def state_dict_by_key(opt: torch.optim.Optimizer, param_names: list[str]) -> StateDict:
    """Optimizer state as ``{"exp_avg": {name: T}, ...}`` (cloned; ``{}`` before the first step)."""
    out: StateDict = {}
    for k, v in optimizer_state_to_tensors(opt, param_names).items():
        key, _, name = k.partition("/")
        out.setdefault(key, {})[name] = v
    return out


@dataclass
class UpdateCoefficients:
    """The linear form of one optimizer step ``s`` (docs/design.md §3); tensors are float64.

    Attributes:
        beta: Buffer decay: ``b_{s+1} = beta * b_s + c * gt_s`` (adam: beta1; sgd: momentum).
        c: Gradient weight into the buffer (adam: ``1-beta1``; sgd: ``1-dampening``, 1.0 on
            torch's first SGD step; plain SGD: 1.0).
        P: ``Δ_s = -decoupled_wd * w_s + P ⊙ b_{s+1} + e ⊙ gt_s``; per parameter, same shape
            as the parameter (SGD: a stride-0 expanded scalar).
        e: Nesterov only (``-lr``, expanded), else ``None``.
        decoupled_wd: ``lr_s * weight_decay`` for AdamW, else 0.
        coupled_wd: ``weight_decay`` for Adam/SGD, else 0 (``gt_s = g_s + coupled_wd * w_s``).
        has_buffer: False for plain SGD (``momentum == 0``): then ``b_{s+1} = gt_s``.
    """

    beta: float
    c: float
    P: dict[str, Tensor]
    e: dict[str, Tensor] | None
    decoupled_wd: float
    coupled_wd: float
    has_buffer: bool


class _ScalarDict(dict):
    """A dict that answers missing keys with one 0-d float64 tensor (plain SGD without names)."""

    def __init__(self, value: float, items: Mapping[str, Tensor]):
        super().__init__(items)
        self.value = value

    def __missing__(self, key: str) -> Tensor:
        return torch.tensor(self.value, dtype=torch.float64)


def _const(value: float, ref: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return _ScalarDict(value, {n: _expand(value, x) for n, x in ref.items()})


def _expand(value: float, like: Tensor) -> Tensor:
    return torch.tensor(value, dtype=torch.float64, device=like.device).expand(like.shape)


def update_coefficients(
    spec: OptimizerSpec, lr: float, step_count: int, state_after: StateDict, first_step: bool
) -> UpdateCoefficients:
    """Coefficients of the step that produced ``state_after``.

    Args:
        spec: Optimizer spec.
        lr: Learning rate used at this step (after any scheduler).
        step_count: torch's step counter after the step, ``t = s + 1``.
        state_after: Optimizer state after the step, ``{"exp_avg": {name: T}, ...}``. For plain
            SGD (no state, ``{}``) ``P`` answers any parameter name with a 0-d float64 tensor
            (broadcasts); :func:`update_coefficients_for` gives full-shape entries instead.
        first_step: Whether this is the optimizer's first step (torch's SGD initialises the
            momentum buffer to ``gt_0`` without dampening).

    Returns:
        The :class:`UpdateCoefficients` (float64).
    """
    lr = float(lr)
    if spec.kind in ("adam", "adamw"):
        b1, b2 = spec.betas
        t = int(step_count)
        bias_correction1 = 1 - b1**t
        bias_correction2 = 1 - b2**t
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        P: dict[str, Tensor] = {}
        for name, v in state_after["exp_avg_sq"].items():
            denom = (v.to(torch.float64).sqrt() / bias_correction2_sqrt).add_(spec.eps)
            P[name] = (-step_size) / denom
        return UpdateCoefficients(
            beta=b1,
            c=1.0 - b1,
            P=P,
            e=None,
            decoupled_wd=lr * spec.weight_decay if spec.kind == "adamw" else 0.0,
            coupled_wd=spec.weight_decay if spec.kind == "adam" else 0.0,
            has_buffer=True,
        )
    # SGD
    mu = spec.momentum
    ref = state_after.get("momentum_buffer") or state_after.get("_like") or {}
    if mu == 0.0:
        return UpdateCoefficients(
            beta=0.0,
            c=1.0,
            P=_const(-lr, ref),
            e=None,
            decoupled_wd=0.0,
            coupled_wd=spec.weight_decay,
            has_buffer=False,
        )
    if spec.nesterov:
        P = _const(-lr * mu, ref)
        e = _const(-lr, ref)
    else:
        P = _const(-lr, ref)
        e = None
    return UpdateCoefficients(
        beta=mu,
        c=1.0 if first_step else 1.0 - spec.dampening,
        P=P,
        e=e,
        decoupled_wd=0.0,
        coupled_wd=spec.weight_decay,
        has_buffer=True,
    )


def update_coefficients_for(
    spec: OptimizerSpec, lr: float, step_count: int, state_after: StateDict, first_step: bool, params: Mapping[str, Tensor]
) -> UpdateCoefficients:
    """Like :func:`update_coefficients`, with ``params`` giving names/shapes (needed for plain SGD)."""
    if spec.kind == "sgd" and not state_after.get("momentum_buffer"):
        state_after = {**state_after, "_like": dict(params)}
    return update_coefficients(spec, lr, step_count, state_after, first_step)


def effective_grad(spec: OptimizerSpec, g_s: Mapping[str, Tensor], w_s: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``gt_s = g_s + coupled_wd * w_s`` in float64."""
    wd = spec.weight_decay if spec.kind in ("adam", "sgd") else 0.0
    out = {}
    for n, g in g_s.items():
        gt = g.to(torch.float64)
        if wd != 0.0:
            gt = gt + wd * w_s[n].to(torch.float64)
        out[n] = gt
    return out


def buffer_after(
    spec: OptimizerSpec,
    state_after: StateDict,
    g_s: Mapping[str, Tensor] | None = None,
    w_s: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``b_{s+1}`` in float64: exp_avg (Adam/AdamW), momentum_buffer (SGD), ``gt_s`` (plain SGD).

    Args:
        spec: Optimizer spec.
        state_after: State after the step.
        g_s: Gradients (only needed for plain SGD).
        w_s: Parameters before the step (only needed for plain SGD with weight decay).
    """
    if spec.kind in ("adam", "adamw"):
        return {n: t.to(torch.float64) for n, t in state_after["exp_avg"].items()}
    if spec.momentum != 0.0:
        return {n: t.to(torch.float64) for n, t in state_after["momentum_buffer"].items()}
    if g_s is None or (spec.weight_decay != 0.0 and w_s is None):
        raise ValueError("plain SGD has no buffer: pass g_s (and w_s with weight decay) to get gt_s")
    return effective_grad(spec, g_s, w_s or {})


def reconstruct_update(
    spec: OptimizerSpec,
    coeffs: UpdateCoefficients,
    w_s: Mapping[str, Tensor],
    g_s: Mapping[str, Tensor],
    b_next: Mapping[str, Tensor] | None,
) -> dict[str, Tensor]:
    """Float64 reconstruction ``Δ̂_s = -decoupled_wd w_s + P ⊙ b_{s+1} + e ⊙ gt_s``.

    Args:
        spec: Optimizer spec.
        coeffs: From :func:`update_coefficients`.
        w_s: Parameters before the step.
        g_s: Gradients the optimizer saw (clipped, before coupled L2).
        b_next: ``b_{s+1}`` (from :func:`buffer_after`); ``None`` for plain SGD (uses ``gt_s``).

    Returns:
        ``{name: float64 tensor}`` with the parameter shapes.
    """
    gt = effective_grad(spec, g_s, w_s) if (coeffs.e is not None or not coeffs.has_buffer or b_next is None) else None
    out: dict[str, Tensor] = {}
    for n, w in w_s.items():
        b = b_next[n].to(torch.float64) if b_next is not None else gt[n]
        d = coeffs.P[n] * b
        if coeffs.e is not None:
            d = d + coeffs.e[n] * gt[n]
        if coeffs.decoupled_wd != 0.0:
            d = d - coeffs.decoupled_wd * w.to(torch.float64)
        out[n] = d
    return out

