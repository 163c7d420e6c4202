"""Resumable explain calls: partial sums persisted after every checkpoint segment (docs/design.md §4).

The state (``explain_state.safetensors``: tensors plus their structure as JSON, no pickle, so
loading a resume directory runs no code; :mod:`explaind_tl.run.codec`) is written atomically and
keyed by a :func:`fingerprint` of the run path, the query tensors and the settings that define
the result, so a state is only ever continued by the call that wrote it. An old pickled
``explain_state.pt`` is refused with a pointer to ``python -m explaind_tl.run.migrate``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import Tensor

from explaind_tl.errors import QueryError
from explaind_tl.run import codec
from explaind_tl.run.format import EXPLAIN_STATE


class Resume:
    """Partial sums persisted atomically after every checkpoint segment."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.file = self.path / EXPLAIN_STATE
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        codec.check_legacy_explain_state(self.path)
        if not self.file.exists():
            return None
        state = codec.load_state(self.file)
        if state.get("fingerprint") != self.fingerprint:
            raise QueryError(
                f"{self.file} holds partial results of a different explain() call; use another resume_dir or delete it"
            )
        return state

    def save(self, state: dict) -> None:
        codec.save_state(self.file, {**state, "fingerprint": self.fingerprint})


def fingerprint(trajectory, batch: dict[str, Tensor], config: dict) -> str:
    h = hashlib.sha256()
    h.update(str(Path(trajectory.run_dir).resolve()).encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for k in sorted(batch):
        h.update(k.encode())
        h.update(batch[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
