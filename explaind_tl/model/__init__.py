"""The model seam: everything that knows TransformerLens internals lives in this package.

The rest of explaind_tl sees a model only through these modules:

* :mod:`.spec` — how a run directory stores a model and rebuilds it (a ``HookedTransformer`` by
  its config, anything else by a factory's import path), parameter signatures, and the one
  place that resolves stored import paths (:func:`.spec.resolve_import_path`).
* :mod:`.functional` — the model as pure functions of its trainable parameters for
  ``torch.func``: metric values, gradients, ReLU pre-activations and forcing
  (:class:`.functional.QueryFunction`).
* :mod:`.training_loss` — the training loss's per-example gradients and directional
  derivatives (:class:`.training_loss.LossFunction`), for the data axis.
* :mod:`.readout` — the read-out forward of a ``HookedTransformer`` (only what reaches the
  metric's position), which can record a tape of its parameter uses.
* :mod:`.tape` — per-query parameter Jacobians from such a tape (the per-example-gradient
  trick), pure tensor math.
* :mod:`.components` — :class:`.components.ComponentMap`, the partition of the parameters into
  heads, MLPs, embeddings (TransformerLens naming), or any user-defined grouping.

* :mod:`.bridge` — TransformerLens 4's ``TransformerBridge``: the same component labels from its
  fused weights, and the hook points where its ReLU kinks are observed.

:func:`is_hooked_transformer` and :func:`.bridge.is_transformer_bridge` are the two tests of
"is this a TransformerLens model" that all of them use; the engine and the run see neither.
"""

from __future__ import annotations

from typing import Any


def is_hooked_transformer(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens ``HookedTransformer`` or a subclass of it.

    Decided by the class hierarchy (a class named ``HookedTransformer`` defined in a
    ``transformer_lens`` module), so transformer_lens is never imported to answer.
    """
    for cls in type(model).__mro__:
        if cls.__name__ == "HookedTransformer" and cls.__module__.startswith("transformer_lens"):
            return True
    return False


def move_model(model: Any, device: Any = None, dtype: Any = None) -> Any:
    """``model`` on ``device`` and/or in ``dtype`` (in place, returned). A ``HookedTransformer``
    moves through its own ``.to`` (which keeps ``cfg.device`` and ``cfg.dtype`` true), quietly."""
    if is_hooked_transformer(model):
        if device is not None:
            model = model.to(device, print_details=False)
        if dtype is not None:
            model = model.to(dtype, print_details=False)
            model.cfg.dtype = dtype
        return model
    return model.to(device=device, dtype=dtype)
