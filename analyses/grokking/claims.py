"""The rules that decide the grokking study's claims, as small pure functions of plain numbers.

:func:`analyses.grokking.report.evaluate_claims` reads the study's files, takes the numbers each
rule needs and calls the rule here; the tests feed the rules constructed positive examples and
counter-examples. A rule returns ``True`` (reproduced), ``False`` (not reproduced) or ``None``
(not run: the study has no data for it, e.g. no cleanup phase or ``--no-explain``).

Thresholds and why:

* :data:`RESTRICTED_DROP` (claim 2): the restricted loss must at least halve between ``t_mem``
  and ``t_clean`` (the rule :func:`analyses.grokking.phases.phase_checks` has always applied).
* :data:`WD_MIN_SHARE` (claim 5): weight decay must account for at least half of the rise of
  the mean test log-prob during cleanup, i.e. at least as much as all gradient (data and
  momentum) updates together. "Weight decay drives cleanup" says it is the main driver; with a
  smaller share the gradient signal would be, and the old rule (any positive weight-decay
  contribution) accepted a 1% contribution.
* :data:`ALIGN_Z`, :data:`ALIGN_BOOT`, :data:`ALIGN_SEED` (claim 8): the increase of the mean
  pairwise cosine of the queries' influence vectors (last window minus first) must exceed
  ``ALIGN_Z = 2`` standard deviations of its paired bootstrap over the queries (``ALIGN_BOOT =
  200`` resamples, seeded). The cosines are means over the pairs of a small query sample (16
  in the default config), so a positive difference can come from which queries were drawn;
  the old rule accepted any positive difference. The bootstrap measures that sampling noise on
  the study's own queries, and two standard deviations is the usual ~95% two-sided margin.
* :data:`SWAP_ACC` (claim 7): the test accuracy the swap experiment's models must reach.
* :data:`EXACT_TOL` (claim 9): the float32-gradient certificate's relative residual bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "ALIGN_BOOT",
    "ALIGN_SEED",
    "ALIGN_Z",
    "EXACT_TOL",
    "RESTRICTED_DROP",
    "SWAP_ACC",
    "VERDICTS",
    "WD_MIN_SHARE",
    "AlignmentChange",
    "Claim",
    "bootstrap_alignment_change",
    "count_verdicts",
    "mean_pairwise_cosine",
    "rule_alignment_grows",
    "rule_excluded_loss_rises",
    "rule_exact",
    "rule_grokking",
    "rule_outer_layers_dominate",
    "rule_restricted_loss_falls",
    "rule_swap",
    "rule_weight_decay_drives_cleanup",
    "rule_weight_norm",
    "verdict",
    "verdict_line",
    "weight_decay_share",
]

VERDICTS = ("reproduced", "not reproduced", "not run")
RESTRICTED_DROP = 0.5
WD_MIN_SHARE = 0.5
ALIGN_Z = 2.0
ALIGN_BOOT = 200
ALIGN_SEED = 0
SWAP_ACC = 0.9
EXACT_TOL = 1e-5
LATE_PHASES = ("circuit_formation", "cleanup")


@dataclass
class Claim:
    """One row of the claims table."""

    claim: str
    source: str
    rule: str
    evidence: str
    verdict: str  # one of VERDICTS


def verdict(ok: bool | None) -> str:
    """``True`` -> "reproduced", ``False`` -> "not reproduced", ``None`` -> "not run"."""
    return "not run" if ok is None else ("reproduced" if ok else "not reproduced")


def count_verdicts(verdicts: Iterable[str]) -> dict[str, int]:
    """How many claims got each verdict (every key of :data:`VERDICTS`, zeros included).

    Raises:
        ValueError: a verdict outside :data:`VERDICTS`.
    """
    counts = dict.fromkeys(VERDICTS, 0)
    for v in verdicts:
        if v not in counts:
            raise ValueError(f"unknown verdict {v!r}; expected one of {VERDICTS}")
        counts[v] += 1
    return counts


def verdict_line(counts: Mapping[str, int]) -> str:
    """``"4 reproduced, 2 not reproduced, 3 not run (9 claims)"``: every verdict, none left out."""
    n = sum(counts[v] for v in VERDICTS)
    return ", ".join(f"{counts[v]} {v}" for v in VERDICTS) + f" ({n} claims)"


# ------------------------------------------------------------------------------------- rules
def rule_grokking(t_mem: int | None, t_gen: int | None) -> bool | None:
    """Claim 1: generalisation comes long after memorisation, ``t_gen - t_mem > t_mem``.

    ``None`` when the model never memorised (``t_mem`` is None); ``False`` when it memorised but
    never generalised within the run.
    """
    if t_mem is None:
        return None
    return t_gen is not None and (t_gen - t_mem) > t_mem


def rule_restricted_loss_falls(r_mem: float | None, r_clean: float | None, factor: float = RESTRICTED_DROP) -> bool | None:
    """Claim 2: restricted loss at ``t_clean`` < ``factor`` x restricted loss at ``t_mem``."""
    if r_mem is None or r_clean is None:
        return None
    return bool(r_clean < factor * r_mem)


def rule_excluded_loss_rises(e_mem: float | None, e_clean: float | None) -> bool | None:
    """Claim 3: excluded (training-pair) loss at ``t_clean`` > at ``t_mem``."""
    if e_mem is None or e_clean is None:
        return None
    return bool(e_clean > e_mem)


def rule_weight_norm(w_mem: float | None, w_end: float | None, slopes: Mapping[str, float]) -> bool | None:
    """Claim 4: the weight norm falls after ``t_mem`` and falls fastest in circuit formation or cleanup.

    Args:
        w_mem, w_end: total weight norm at ``t_mem`` and at the end.
        slopes: per phase, the weight norm's change per step over the phase.
    """
    if w_mem is None or w_end is None:
        return None
    fastest = min(slopes, key=slopes.get) if slopes else None
    return bool(w_end < w_mem and fastest in LATE_PHASES)


def weight_decay_share(weight_decay: float, change: float) -> float:
    """Weight decay's share of the net change, ``weight_decay / change`` (NaN unless ``change > 0``).

    Above 1 when the gradient updates pulled the other way and weight decay made up for them.
    """
    return weight_decay / change if change > 0 else math.nan


def rule_weight_decay_drives_cleanup(weight_decay: float, change: float, min_share: float = WD_MIN_SHARE) -> bool:
    """Claim 5: over cleanup the mean test log-prob rises, and weight decay carries ``>= min_share`` of the rise.

    Args:
        weight_decay: the ExPLAIND weight-decay source summed over the cleanup phase.
        change: the net change of the mean test log-prob over the cleanup phase (all sources).
        min_share: the required share (see :data:`WD_MIN_SHARE`).
    """
    return bool(change > 0 and weight_decay >= min_share * change)


def rule_outer_layers_dominate(first_share: float, late_share: float, other_late_shares: Iterable[float]) -> bool:
    """Claim 6: the embed/unembed share of absolute influence grows and is the largest group late.

    Args:
        first_share: embed/unembed share in the first phase (memorisation).
        late_share: its share in cleanup (else the last phase).
        other_late_shares: the other groups' shares in that phase.
    """
    others = list(other_late_shares)
    return bool(late_share > first_share and late_share >= max(others, default=-math.inf))


def rule_swap(s_hybrid: int | None, s_model: int | None) -> bool | None:
    """Claim 7: final outer layers around the step-``s`` inner layers reach :data:`SWAP_ACC` earlier.

    Args:
        s_hybrid: first checkpoint at which the hybrid reaches the accuracy (``None``: never).
        s_model: the same for the step-``s`` model itself.

    Returns:
        ``None`` when neither reaches it (the run cannot tell); ``False`` when only the model does.
    """
    if s_hybrid is None:
        return None if s_model is None else False
    return s_model is None or s_hybrid < s_model


def mean_pairwise_cosine(v: torch.Tensor, idx: torch.Tensor | None = None) -> float:
    """Mean cosine similarity over pairs of distinct rows of ``v`` ``[Q, D]``; zero rows are skipped.

    Args:
        v: one influence vector per query.
        idx: a resample of row indices (with repeats); pairs of the same original row are left
            out, so a bootstrap resample does not count a query's cosine with itself.

    Returns:
        The mean, NaN when fewer than two usable rows are left.
    """
    v = v.to(torch.float64)
    norms = v.norm(dim=1)
    keep = norms > 0
    unit = torch.where(keep[:, None], v / norms.clamp_min(1e-300)[:, None], torch.zeros_like(v))
    g = unit @ unit.T
    idx = torch.arange(v.shape[0]) if idx is None else idx
    pair = (idx[:, None] != idx[None, :]) & keep[idx][:, None] & keep[idx][None, :]
    n = int(pair.sum())
    return float(g[idx][:, idx][pair].sum() / n) if n else math.nan


@dataclass
class AlignmentChange:
    """Claim 8's numbers: the increase of the mean pairwise cosine and its bootstrap spread.

    Attributes:
        first, last: mean pairwise cosine in the first and the last window.
        increase: ``last - first``.
        boot_std: standard deviation of the increase over query resamples.
        lo, hi: its 2.5% and 97.5% bootstrap quantiles.
        n_boot: usable resamples.
    """

    first: float
    last: float
    increase: float
    boot_std: float
    lo: float
    hi: float
    n_boot: int


def bootstrap_alignment_change(
    first: torch.Tensor, last: torch.Tensor, n_boot: int = ALIGN_BOOT, seed: int = ALIGN_SEED
) -> AlignmentChange:
    """Paired bootstrap of the increase of the mean pairwise cosine over the queries.

    Args:
        first, last: ``[Q, D1]``, ``[Q, D2]`` influence vectors of the same ``Q`` queries (same
            row order) in the first and the last window.
        n_boot: resamples (queries drawn with replacement, the same draw for both windows).
        seed: seed of the resampling generator.
    """
    if first.shape[0] != last.shape[0]:
        raise ValueError(f"the windows must have the same queries, got {first.shape[0]} and {last.shape[0]} rows")
    c0, c1 = mean_pairwise_cosine(first), mean_pairwise_cosine(last)
    g = torch.Generator().manual_seed(int(seed))
    q = first.shape[0]
    diffs = []
    for _ in range(n_boot):
        idx = torch.randint(q, (q,), generator=g)
        d = mean_pairwise_cosine(last, idx) - mean_pairwise_cosine(first, idx)
        if math.isfinite(d):
            diffs.append(d)
    t = torch.tensor(diffs, dtype=torch.float64)
    if len(diffs) >= 2:
        std, lo, hi = float(t.std()), float(t.quantile(0.025)), float(t.quantile(0.975))
    else:
        std = lo = hi = math.nan
    return AlignmentChange(c0, c1, c1 - c0, std, lo, hi, len(diffs))


def rule_alignment_grows(increase: float, boot_std: float, z: float = ALIGN_Z) -> bool | None:
    """Claim 8: the mean pairwise cosine grows by more than ``z`` bootstrap standard deviations.

    ``None`` when either number is undefined (too few queries with non-zero influence).
    """
    if not (math.isfinite(increase) and math.isfinite(boot_std)):
        return None
    return bool(increase > z * boot_std)


def rule_exact(
    rel_residual: float | None, replay_mismatch: float | None, tol: float = EXACT_TOL, certified: bool | None = True
) -> bool | None:
    """Claim 9: the attribution's total relative residual is ``<= tol``, replay was exact and the
    certificate passed (``certified``: ``Completeness.ok``; ``None``, unknown, does not fail it)."""
    if rel_residual is None:
        return None
    return bool(rel_residual <= tol and not replay_mismatch and certified is not False)
