"""How a run stores a model and rebuilds it (docs/design.md §5).

A ``HookedTransformer`` is stored by its ``HookedTransformerConfig`` (as JSON), a
``TransformerBridge`` by its ``TransformerBridgeConfig`` (booted again natively); any other
``nn.Module`` by the import path (``"module:qualname"``) of a zero-argument factory. Loss
functions are stored by import path too when they have one. :func:`explaind_tl.run.trust.resolve_import_path`
is the one place that turns a stored import path back into an object (paths of objects that
have moved since a run was recorded are translated by its ``IMPORT_ALIASES``), and
:func:`~explaind_tl.run.trust.resolve_recorded_callable` decides which recorded paths may be
imported without the user's consent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from explaind_tl.errors import ModelMismatchError, TrajectoryError
from explaind_tl.model import is_hooked_transformer
from explaind_tl.model.bridge import bridge_config_to_dict, build_bridge, is_transformer_bridge
from explaind_tl.run.storage import to_jsonable
from explaind_tl.run.trust import import_path, resolve_import_path, resolve_recorded_callable  # noqa: F401 (re-exported)


def hooked_transformer_config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-serialisable dict of a ``HookedTransformerConfig`` (dtype as ``"torch.float32"``)."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    out = to_jsonable(d)
    # n_params is derived in __post_init__; keeping it is harmless but keep the dict minimal.
    return out


def _parse_dtype(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("torch."):
        dt = getattr(torch, value.split(".", 1)[1], None)
        if isinstance(dt, torch.dtype):
            return dt
    return value


def hooked_transformer_config_from_dict(d: Mapping[str, Any], device: str | None = "cpu") -> Any:
    """Inverse of :func:`hooked_transformer_config_to_dict`.

    Args:
        d: The stored dict.
        device: Device to build on (``None`` keeps the stored one).
    """
    from transformer_lens import HookedTransformerConfig

    fields = set(HookedTransformerConfig.__dataclass_fields__)
    kw = {k: _parse_dtype(v) for k, v in d.items() if k in fields}
    kw.pop("n_params", None)
    if device is not None:
        kw["device"] = device
    return HookedTransformerConfig(**kw)


def model_spec(model: nn.Module, model_factory: Callable[[], nn.Module] | None) -> dict[str, Any]:
    """The manifest entry describing how to rebuild ``model``.

    Raises:
        TrajectoryError: for a non-HookedTransformer model without ``model_factory``.
    """
    if model_factory is not None:
        return {"kind": "factory", "factory": import_path(model_factory), "class": type(model).__qualname__}
    if is_hooked_transformer(model):
        return {"kind": "hooked_transformer", "config": hooked_transformer_config_to_dict(model.cfg)}
    if is_transformer_bridge(model):
        return {"kind": "transformer_bridge", "config": bridge_config_to_dict(model.cfg)}
    raise TrajectoryError(
        f"cannot record a {type(model).__qualname__} without model_factory: pass a zero-argument, "
        "importable function (module-level, not a lambda) that builds the model; "
        "HookedTransformer and TransformerBridge models need none"
    )


def build_model(spec: Mapping[str, Any], model_factory: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild a model (random init; RNG state is preserved) from :func:`model_spec` output."""
    with torch.random.fork_rng(devices=[]):
        if model_factory is not None:
            return model_factory()
        if spec["kind"] == "hooked_transformer":
            from transformer_lens import HookedTransformer

            return HookedTransformer(hooked_transformer_config_from_dict(spec["config"]))
        if spec["kind"] == "transformer_bridge":
            return build_bridge(spec["config"])
        if spec.get("factory"):  # built-in factories only: anything else is passed in
            return resolve_recorded_callable(spec["factory"], what="model factory", arg="model_factory")()
    raise TrajectoryError(
        "this run was recorded with a model_factory that is not importable (lambda or local "
        "function): pass model_factory=... to Trajectory.load / resume"
    )


def param_signature(model: nn.Module) -> dict[str, Any]:
    """Names, shapes and dtypes of trainable params, frozen params and buffers."""
    return {
        "param_names": [n for n, p in model.named_parameters() if p.requires_grad],
        "param_shapes": {n: list(p.shape) for n, p in model.named_parameters()},
        "param_dtypes": {n: str(p.dtype) for n, p in model.named_parameters()},
        "frozen_names": [n for n, p in model.named_parameters() if not p.requires_grad],
        "buffer_names": [n for n, _ in model.named_buffers()],
    }


def check_model_matches(model: nn.Module, manifest: Mapping[str, Any]) -> None:
    """Raise :class:`ModelMismatchError` unless ``model`` has the recorded parameters."""
    sig = param_signature(model)
    for key in ("param_names", "param_shapes", "param_dtypes", "frozen_names"):
        want, got = manifest.get(key), sig[key]
        if want is not None and want != got:
            diff = ""
            if isinstance(want, dict):
                bad = [k for k in set(want) | set(got) if want.get(k) != got.get(k)]
                diff = "; ".join(f"{k}: recorded {want.get(k)}, model {got.get(k)}" for k in sorted(bad)[:5])
            else:
                diff = f"recorded {want[:6]}..., model {got[:6]}..."
            raise ModelMismatchError(f"model does not match the recorded run ({key} differ): {diff}")
