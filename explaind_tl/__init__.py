"""explaind_tl: exact ExPLAIND attribution for TransformerLens models.

A trained ``HookedTransformer`` is rewritten exactly as a sum over training steps, training
examples and model components (heads, embeddings, unembedding, MLPs). See ``README.md`` and
``docs/design.md``.

The layout, bottom to top (a module imports only from its own layer or the ones below):

* ``errors``, ``axes``, ``certificate``, ``attribution``, ``optim`` (``optim_step``), ``quadrature``,
  ``metrics``, ``losses`` — the foundations: no model, no run;
* ``run.storage``, ``run.format`` — crash-safe files and what a run directory holds;
* ``model`` — everything that knows TransformerLens internals (the seam);
* ``run`` — recording (``TrajectoryRecorder``, ``train``) and exact replay (``Trajectory``);
* ``engine`` — ``explain``: validate, plan, certified quadrature, the two sweeps, assemble;
  ``metagradient``: reverse mode through the recorded steps;
* ``questions``, ``plotting`` — answers and figures built on results.

Studies and the command line live in ``analyses/``; nothing here imports them. Imports are lazy
so that the command line starts fast (transformer_lens takes seconds).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from explaind_tl._version import __version__

if TYPE_CHECKING:  # what editors and type checkers see; at run time every name is loaded lazily
    from explaind_tl.attribution import Attribution as Attribution
    from explaind_tl.certificate import Completeness as Completeness
    from explaind_tl.engine.api import explain as explain
    from explaind_tl.engine.metagrad import metagradient as metagradient
    from explaind_tl.engine.options import ExplainOptions as ExplainOptions
    from explaind_tl.errors import CertificateError as CertificateError
    from explaind_tl.errors import CertificateWarning as CertificateWarning
    from explaind_tl.errors import ExplainWorkerError as ExplainWorkerError
    from explaind_tl.errors import QueryError as QueryError
    from explaind_tl.errors import RecordingError as RecordingError
    from explaind_tl.errors import StorageError as StorageError
    from explaind_tl.errors import TrajectoryError as TrajectoryError
    from explaind_tl.errors import UnsupportedOptimizerError as UnsupportedOptimizerError
    from explaind_tl.errors import UntrustedCodeError as UntrustedCodeError
    from explaind_tl.model.components import ComponentMap as ComponentMap
    from explaind_tl.questions import component_influence as component_influence
    from explaind_tl.questions import data_vs_weight_decay as data_vs_weight_decay
    from explaind_tl.questions import top_training_examples as top_training_examples
    from explaind_tl.run.recorder import TrajectoryRecorder as TrajectoryRecorder
    from explaind_tl.run.training import train as train
    from explaind_tl.run.trajectory import ReplayMismatchWarning as ReplayMismatchWarning
    from explaind_tl.run.trajectory import StepRecord as StepRecord
    from explaind_tl.run.trajectory import Trajectory as Trajectory

# public name -> module that defines it
_LAZY = {
    "TrajectoryRecorder": "explaind_tl.run.recorder",
    "train": "explaind_tl.run.training",
    "Trajectory": "explaind_tl.run.trajectory",
    "StepRecord": "explaind_tl.run.trajectory",
    "ReplayMismatchWarning": "explaind_tl.run.trajectory",
    "TrajectoryError": "explaind_tl.errors",
    "RecordingError": "explaind_tl.errors",
    "StorageError": "explaind_tl.errors",
    "UntrustedCodeError": "explaind_tl.errors",
    "UnsupportedOptimizerError": "explaind_tl.errors",
    "QueryError": "explaind_tl.errors",
    "CertificateWarning": "explaind_tl.errors",
    "CertificateError": "explaind_tl.errors",
    "ExplainWorkerError": "explaind_tl.errors",
    "explain": "explaind_tl.engine.api",
    "metagradient": "explaind_tl.engine.metagrad",
    "ExplainOptions": "explaind_tl.engine.options",
    "Attribution": "explaind_tl.attribution",
    "Completeness": "explaind_tl.certificate",
    "ComponentMap": "explaind_tl.model.components",
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
