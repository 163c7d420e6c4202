"""The names of an attribution's axes, in one place (docs/design.md §0).

Imported by the engine that fills the axes and by :class:`explaind_tl.Attribution` that labels
them; depends on nothing.
"""

from __future__ import annotations

# every axis explain can keep (by=...), in canonical order
AXES = ("step", "component", "source", "query", "output", "position", "train", "train_position")
# the train_position coordinate of the pseudo-entries (no token's loss term)
NO_TOKEN = "none"
# the pieces of an update (the "source" axis)
SOURCES = ("data", "history", "weight_decay", "regularization", "update_residual")
# the sources other than data: on the "train" axis they follow the training examples as
# pseudo-entries
PSEUDO = ("history", "weight_decay", "regularization", "update_residual")

__all__ = ["AXES", "NO_TOKEN", "PSEUDO", "SOURCES"]
