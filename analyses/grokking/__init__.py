"""The grokking study: ExPLAIND on modular addition (Nanda et al. 2023; Eichin et al. 2025).

Pipeline (``explaind-tl grokking`` runs all of it, :func:`run_study` is the Python entry):

* :mod:`.task` — the modular-addition task, its data and presets (``default``, ``nanda``, ``tiny``).
* :mod:`.training` — train a preset with the trajectory recorder (``explaind_tl.train``),
  stopping a fixed number of steps after test accuracy reaches 99%; log ``metrics.csv``.
* :mod:`.phases` — memorisation / circuit formation / cleanup boundaries from the curves,
  cross-checked with Nanda et al.'s progress measures computed on the checkpoints.
* :mod:`.components` — per-component ExPLAIND influence over time (test and training set),
  split into data and weight decay.
* :mod:`.alignment` — per-query influence alignment within step windows, and the swap
  experiment (final outer layers around the step-``s`` inner pipeline).
* :mod:`.report` — ``report.md`` with figures and a claims table.
* :mod:`.claims` — the rule of every claim (thresholds and why) as pure functions, and the
  verdict count (reproduced / not reproduced / not run).

Submodules are imported lazily so that importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "train_grokking": "analyses.grokking.training",
    "TrainingResult": "analyses.grokking.training",
    "find_phases": "analyses.grokking.phases",
    "progress_measures": "analyses.grokking.phases",
    "Phases": "analyses.grokking.phases",
    "component_influence": "analyses.grokking.components",
    "query_alignment": "analyses.grokking.alignment",
    "swap_experiment": "analyses.grokking.alignment",
    "write_report": "analyses.grokking.report",
    "run_study": "analyses.grokking.pipeline",
    "StudyResult": "analyses.grokking.pipeline",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analyses.grokking' has no attribute {name!r}")
