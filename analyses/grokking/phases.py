"""Phases of grokking from the training curves, cross-checked with Nanda et al.'s progress measures.

**Phase rule** (applied to the logged curves, ``metrics.csv``):

* *memorisation* ``[0, t_mem)``: ``t_mem`` is the first logged step with train accuracy
  ``>= 99%``.
* *circuit formation* ``[t_mem, t_clean)``: train accuracy is saturated, test accuracy sits on its
  memorisation plateau ``acc_mem`` (its value at ``t_mem``).
* *cleanup* ``[t_clean, t_gen)``: ``t_clean`` is the first logged step ``>= t_mem`` at which test
  accuracy has closed half of the remaining gap, ``test_acc >= acc_mem + (1 - acc_mem) / 2``.
  (With 50% training data a memorising model already gets roughly half of the test pairs
  right, via ``a + b = b + a``, so a fixed "test accuracy crosses 50%" threshold would fire
  during memorisation; the half-gap rule is the same rule measured from the plateau.)
* *post-grokking* ``[t_gen, T]``: ``t_gen`` is the first logged step with test accuracy
  ``>= 99%``.

A boundary that is never reached is ``None`` and the later phases are empty.

**Progress measures** (Nanda et al. 2023, "Progress measures for grokking via mechanistic
interpretability"), computed from the checkpoints (``Trajectory.params_at``):

* *Fourier norms of* ``W_E``: the embedding of the ``p`` number tokens projected on the
  discrete Fourier basis over ``0..p-1``; the norm per frequency ``k`` combines its cos and sin
  components. *Key frequencies* are the ``n_keys`` largest at the final checkpoint.
* *restricted loss*: cross-entropy on all ``p**2`` pairs of the logits projected onto the
  key-frequency directions ``cos(w_k (a + b - c))``, ``sin(w_k (a + b - c))`` (``w_k = 2 pi k / p``,
  ``c`` the output class): how well the final Fourier circuit alone already solves the task.
* *excluded loss*: cross-entropy on the training pairs of the logits with those directions
  removed: how much the model still relies on memorisation.
* *total weight norm*: L2 norm of all parameters (what weight decay shrinks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from explaind_tl.model.bridge import embedding_matrix

from .claims import rule_excluded_loss_rises, rule_restricted_loss_falls

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "PHASE_NAMES",
    "Phases",
    "find_phases",
    "fourier_basis",
    "phase_checks",
    "progress_measures",
]

PHASE_NAMES = ("memorisation", "circuit_formation", "cleanup", "post_grokking")


@dataclass
class Phases:
    """Phase boundaries (parameter steps) of one run; see the module docstring for the rule.

    Attributes:
        memorisation_end: ``t_mem`` (first step with train acc ``>= threshold``).
        cleanup_start: ``t_clean``.
        generalisation: ``t_gen`` (first step with test acc ``>= threshold``).
        end: ``T``, the last step.
        test_acc_plateau: Test accuracy at ``t_mem``.
        threshold: The "solved" accuracy (0.99).
    """

    memorisation_end: int | None
    cleanup_start: int | None
    generalisation: int | None
    end: int
    test_acc_plateau: float | None
    threshold: float = 0.99

    def intervals(self) -> dict[str, tuple[int, int]]:
        """``{phase: (start, stop)}`` half-open step intervals; unreached phases are omitted."""
        bounds = [0]
        for b in (self.memorisation_end, self.cleanup_start, self.generalisation):
            if b is None:
                break
            bounds.append(b)
        bounds.append(self.end)
        out = {}
        for name, a, b in zip(PHASE_NAMES, bounds[:-1], bounds[1:]):
            if b > a:
                out[name] = (a, b)
        return out

    def phase_of(self, step: int) -> str | None:
        """Name of the phase containing ``step`` (``None`` outside ``[0, T]``)."""
        for name, (a, b) in self.intervals().items():
            if a <= step < b:
                return name
        if step == self.end and self.intervals():
            return list(self.intervals())[-1]
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["intervals"] = {k: list(v) for k, v in self.intervals().items()}
        return d


def _first(df: pd.DataFrame, mask) -> int | None:
    hit = df.loc[mask, "step"]
    return None if hit.empty else int(hit.iloc[0])


def find_phases(metrics: pd.DataFrame, threshold: float = 0.99) -> Phases:
    """Phase boundaries from a ``metrics.csv``-style frame (``step, train_acc, test_acc``).

    Args:
        metrics: Logged curves, sorted by step.
        threshold: Accuracy that counts as solved.

    Returns:
        :class:`Phases`.
    """
    df = metrics.sort_values("step").reset_index(drop=True)
    end = int(df["step"].iloc[-1])
    t_mem = _first(df, df["train_acc"] >= threshold)
    plateau = t_clean = t_gen = None
    if t_mem is not None:
        plateau = float(df.loc[df["step"] == t_mem, "test_acc"].iloc[0])
        after = df["step"] >= t_mem
        t_clean = _first(df, after & (df["test_acc"] >= plateau + 0.5 * (1.0 - plateau)))
        t_gen = _first(df, after & (df["test_acc"] >= threshold))
        if t_clean is not None and t_gen is not None:
            t_clean = min(t_clean, t_gen)
    return Phases(t_mem, t_clean, t_gen, end, plateau, threshold)


# --------------------------------------------------------------------------------------------
# progress measures
# --------------------------------------------------------------------------------------------


def fourier_basis(p: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, list[str]]:
    """Orthonormal discrete Fourier basis over ``0..p-1``.

    Returns:
        ``(basis [p, p], names)``: row 0 is the constant, rows ``2k-1, 2k`` are ``cos k``,
        ``sin k`` for ``k = 1..(p-1)//2`` (and a last ``cos`` row for even ``p``).
    """
    x = torch.arange(p, dtype=dtype)
    rows, names = [torch.ones(p, dtype=dtype)], ["const"]
    for k in range(1, p // 2 + 1):
        rows.append(torch.cos(2 * math.pi * k * x / p))
        names.append(f"cos {k}")
        if 2 * k != p:
            rows.append(torch.sin(2 * math.pi * k * x / p))
            names.append(f"sin {k}")
    basis = torch.stack(rows[:p])
    basis = basis / basis.norm(dim=1, keepdim=True)
    return basis, names[:p]


def frequency_norms(W_E: torch.Tensor, p: int) -> torch.Tensor:
    """Norm of ``W_E[:p]`` on each frequency ``k = 1..p//2`` (cos and sin combined): ``[p//2]``."""
    basis, _ = fourier_basis(p)
    proj = basis @ W_E[:p].double()  # [p, d_model]
    sq = proj.pow(2).sum(-1)
    out = []
    for k in range(1, p // 2 + 1):
        v = sq[2 * k - 1]
        if 2 * k < p:
            v = v + sq[2 * k]
        out.append(v)
    return torch.stack(out).sqrt()


def _key_directions(p: int, keys: list[int]) -> torch.Tensor:
    """Orthonormal ``cos/sin(w_k (a + b - c))`` directions over the ``[p, p, p]`` cube: ``[2K, p**3]``."""
    a = torch.arange(p, dtype=torch.float64).view(p, 1, 1)
    b = torch.arange(p, dtype=torch.float64).view(1, p, 1)
    c = torch.arange(p, dtype=torch.float64).view(1, 1, p)
    dirs = []
    for k in keys:
        ang = 2 * math.pi * k * (a + b - c) / p
        for d in (torch.cos(ang), torch.sin(ang)):
            d = d.reshape(-1)
            dirs.append(d / d.norm())
    return torch.stack(dirs)


@torch.no_grad()
def _all_logits(model: torch.nn.Module, p: int) -> torch.Tensor:
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return model(tokens)[:, -1, :].double().reshape(p, p, p)


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits, labels))


def progress_measures(
    trajectory: Any,
    p: int,
    train_pairs: torch.Tensor | None = None,
    steps: list[int] | None = None,
    n_keys: int = 5,
    key_freqs: list[int] | None = None,
) -> tuple[pd.DataFrame, list[int]]:
    """Nanda et al.'s progress measures at checkpoint steps.

    Args:
        trajectory: A recorded run with ``model(step)`` (and ``checkpoint_steps``).
        p: Modulus.
        train_pairs: Indices ``a * p + b`` of the training pairs (for the excluded loss); the
            excluded loss is omitted when ``None``.
        steps: Steps to evaluate (default: ``trajectory.checkpoint_steps``).
        n_keys: Number of key frequencies (top Fourier norms of ``W_E`` at the last step).
        key_freqs: Use these key frequencies instead.

    Returns:
        ``(frame, key_freqs)``; the frame has ``step, restricted_loss, excluded_loss,
        full_loss, weight_norm, key_fourier_frac`` and one ``freq_k`` column per frequency.
    """
    import pandas as pd

    from .training import weight_norm

    steps = list(trajectory.checkpoint_steps if steps is None else steps)
    final = trajectory.model(steps[-1])
    if key_freqs is None:
        norms = frequency_norms(embedding_matrix(final).detach(), p)
        key_freqs = [int(k) + 1 for k in torch.argsort(norms, descending=True)[:n_keys]]
    dirs = _key_directions(p, key_freqs)  # [2K, p^3]
    labels = ((torch.arange(p).repeat_interleave(p) + torch.arange(p).repeat(p)) % p).long()
    rows = []
    for s in steps:
        model = trajectory.model(s)
        logits = _all_logits(model, p)
        flat = logits.reshape(-1)
        coef = dirs @ flat
        restricted = (coef @ dirs).reshape(p * p, p)
        excluded = (flat - coef @ dirs).reshape(p * p, p)
        full = logits.reshape(p * p, p)
        norms = frequency_norms(embedding_matrix(model).detach(), p)
        row = {
            "step": int(s),
            "full_loss": _ce(full, labels),
            "restricted_loss": _ce(restricted, labels),
            "weight_norm": weight_norm({n: q for n, q in model.named_parameters()}),
            "key_fourier_frac": float(
                norms[[k - 1 for k in key_freqs]].pow(2).sum() / norms.pow(2).sum()
            ),
        }
        if train_pairs is not None:
            tp = torch.as_tensor(train_pairs).long()
            row["excluded_loss"] = _ce(excluded[tp], labels[tp])
            row["train_loss_ckpt"] = _ce(full[tp], labels[tp])
        for k, v in enumerate(norms.tolist(), start=1):
            row[f"freq_{k}"] = v
        rows.append(row)
    return pd.DataFrame(rows), key_freqs


def _at(df: pd.DataFrame, step: int | None, col: str) -> float | None:
    """Value of ``col`` at the row whose step is nearest to ``step``."""
    if step is None or col not in df:
        return None
    i = (df["step"] - step).abs().idxmin()
    return float(df.loc[i, col])


def phase_checks(phases: Phases, measures: pd.DataFrame) -> dict[str, Any]:
    """Cross-check the curve-based phases with the progress measures.

    Returns:
        A dict of measured values at the phase boundaries and booleans:

        * ``restricted_falls_before_cleanup``: restricted loss at ``t_clean`` is below half of
          its value at ``t_mem`` (the Fourier circuit forms during circuit formation, before
          test accuracy moves much; :func:`.claims.rule_restricted_loss_falls`).
        * ``excluded_rises``: excluded (train) loss at ``t_clean`` exceeds its value at
          ``t_mem`` (the memorising parts are being replaced;
          :func:`.claims.rule_excluded_loss_rises`).
        * ``weight_norm_falls``: weight norm at the end is below its value at ``t_mem``.
        * ``weight_norm_fastest_in``: phase with the steepest weight-norm decrease per step.
    """
    out: dict[str, Any] = {}
    named = {
        "mem": phases.memorisation_end,
        "clean": phases.cleanup_start,
        "gen": phases.generalisation,
        "end": phases.end,
        "init": 0,
    }
    for col in ("restricted_loss", "excluded_loss", "full_loss", "weight_norm", "key_fourier_frac"):
        for tag, s in named.items():
            out[f"{col}@{tag}"] = _at(measures, s, col)
    out["restricted_falls_before_cleanup"] = rule_restricted_loss_falls(
        out["restricted_loss@mem"], out["restricted_loss@clean"]
    )
    out["excluded_rises"] = rule_excluded_loss_rises(out["excluded_loss@mem"], out["excluded_loss@clean"])
    w_mem, w_end = out["weight_norm@mem"], out["weight_norm@end"]
    out["weight_norm_falls"] = None if w_mem is None else bool(w_end < w_mem)
    slopes = {}
    for name, (a, b) in phases.intervals().items():
        wa, wb = _at(measures, a, "weight_norm"), _at(measures, b, "weight_norm")
        if wa is not None and b > a:
            slopes[name] = (wb - wa) / (b - a)
    out["weight_norm_slope"] = slopes
    out["weight_norm_fastest_in"] = min(slopes, key=slopes.get) if slopes else None
    return out
