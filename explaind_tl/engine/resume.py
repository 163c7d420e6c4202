"""Resumable explain calls: partial sums persisted after every checkpoint segment (docs/design.md §4).

The state (``explain_state.pt``) is written atomically (``.tmp`` then ``os.replace``) and keyed
by a :func:`fingerprint` of the run path, the query tensors and the settings that define the
result, so a state is only ever continued by the call that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from explaind_tl.errors import QueryError


class Resume:
    """Partial sums persisted atomically after every checkpoint segment."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.file = self.path / "explain_state.pt"
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        if not self.file.exists():
            return None
        state = torch.load(self.file, weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            raise QueryError(
                f"{self.file} holds partial results of a different explain() call; use another resume_dir or delete it"
            )
        return state

    def save(self, state: dict) -> None:
        tmp = self.file.with_suffix(".tmp")
        torch.save({**state, "fingerprint": self.fingerprint}, tmp)
        os.replace(tmp, self.file)


def fingerprint(trajectory, batch: dict[str, Tensor], config: dict) -> str:
    h = hashlib.sha256()
    h.update(str(Path(trajectory.run_dir).resolve()).encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for k in sorted(batch):
        h.update(k.encode())
        h.update(batch[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
