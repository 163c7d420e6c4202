"""explaind_tl: exact ExPLAIND attribution for TransformerLens models.

A trained ``HookedTransformer`` is rewritten exactly as a sum over training steps, training
examples and model components (heads, embeddings, unembedding, MLPs). See ``README.md`` and
``../shared/DESIGN.md``.

Imports are lazy so that ``explaind-tl --help`` starts fast (transformer_lens takes seconds).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "TrajectoryRecorder": "explaind_tl.recorder",
    "train": "explaind_tl.recorder",
    "Trajectory": "explaind_tl.trajectory",
    "StepRecord": "explaind_tl.trajectory",
    "ReplayMismatchWarning": "explaind_tl.trajectory",
    "TrajectoryError": "explaind_tl.errors",
    "UnsupportedOptimizerError": "explaind_tl.errors",
    "QueryError": "explaind_tl.errors",
    "CertificateWarning": "explaind_tl.errors",
    "CertificateError": "explaind_tl.errors",
    "explain": "explaind_tl.engine",
    "Attribution": "explaind_tl.attribution",
    "ComponentMap": "explaind_tl.components",
    "component_influence": "explaind_tl.questions",
    "top_training_examples": "explaind_tl.questions",
    "data_vs_weight_decay": "explaind_tl.questions",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return getattr(module, name)
    raise AttributeError(f"module 'explaind_tl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
