"""The grokking study's claim rules: a constructed positive example and counter-example per claim,
the verdict counting, and the report wiring (claims table, summary, report.md) on a constructed
study directory. No training run: every number here is made up to sit on one side of a rule."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from analyses.grokking.claims import (
    ALIGN_Z,
    WD_MIN_SHARE,
    bootstrap_alignment_change,
    count_verdicts,
    mean_pairwise_cosine,
    rule_alignment_grows,
    rule_exact,
    rule_excluded_loss_rises,
    rule_grokking,
    rule_outer_layers_dominate,
    rule_restricted_loss_falls,
    rule_swap,
    rule_weight_decay_drives_cleanup,
    rule_weight_norm,
    verdict,
    verdict_line,
    weight_decay_share,
)


# ------------------------------------------------------------------------------- claims 1-4
def test_claim1_grokking():
    assert rule_grokking(t_mem=100, t_gen=1000) is True
    assert rule_grokking(t_mem=100, t_gen=150) is False  # generalised right after memorising
    assert rule_grokking(t_mem=100, t_gen=None) is False  # memorised, never generalised
    assert rule_grokking(t_mem=None, t_gen=None) is None  # never memorised: nothing to test


def test_claim2_restricted_loss_falls():
    assert rule_restricted_loss_falls(r_mem=2.0, r_clean=0.3) is True
    assert rule_restricted_loss_falls(r_mem=2.0, r_clean=1.2) is False  # falls, but by less than half
    assert rule_restricted_loss_falls(r_mem=2.0, r_clean=2.5) is False
    assert rule_restricted_loss_falls(r_mem=2.0, r_clean=None) is None


def test_claim3_excluded_loss_rises():
    assert rule_excluded_loss_rises(e_mem=0.1, e_clean=3.0) is True
    assert rule_excluded_loss_rises(e_mem=0.1, e_clean=0.05) is False
    assert rule_excluded_loss_rises(e_mem=None, e_clean=0.05) is None


def test_claim4_weight_norm():
    slopes = {"memorisation": 2e-3, "circuit_formation": -4e-3, "cleanup": -1e-3, "post_grokking": -5e-4}
    assert rule_weight_norm(w_mem=30.0, w_end=20.0, slopes=slopes) is True
    # falls, but fastest after generalisation
    late = {**slopes, "post_grokking": -9e-3}
    assert rule_weight_norm(w_mem=30.0, w_end=20.0, slopes=late) is False
    # fastest decrease in the right phase, but the norm ends above its value at t_mem
    assert rule_weight_norm(w_mem=30.0, w_end=31.0, slopes=slopes) is False
    assert rule_weight_norm(w_mem=30.0, w_end=20.0, slopes={}) is False
    assert rule_weight_norm(w_mem=None, w_end=20.0, slopes=slopes) is None


# ------------------------------------------------------------------------------- claim 5
def test_claim5_weight_decay_drives_cleanup():
    # weight decay carries 70% of a rise of 1.0
    assert rule_weight_decay_drives_cleanup(weight_decay=0.7, change=1.0) is True
    # the gradient updates pulled the other way; weight decay more than made up for them
    assert rule_weight_decay_drives_cleanup(weight_decay=1.5, change=1.0) is True
    assert weight_decay_share(1.5, 1.0) == pytest.approx(1.5)
    # counter-example: positive (the old rule's whole test) but a minor share of the rise
    wd, change = 0.2, 1.0
    assert wd > 0 and weight_decay_share(wd, change) < WD_MIN_SHARE
    assert rule_weight_decay_drives_cleanup(weight_decay=wd, change=change) is False
    # test performance fell during cleanup: weight decay drove nothing up
    assert rule_weight_decay_drives_cleanup(weight_decay=0.5, change=-0.1) is False
    assert math.isnan(weight_decay_share(0.5, -0.1))
    assert rule_weight_decay_drives_cleanup(weight_decay=-0.3, change=1.0) is False


def test_claim5_threshold_is_half():
    """At least as much as all gradient updates together: ``wd >= data`` when both help."""
    assert WD_MIN_SHARE == 0.5
    for wd, data in [(0.51, 0.49), (0.49, 0.51)]:
        assert rule_weight_decay_drives_cleanup(wd, wd + data) is (wd >= data)


# ------------------------------------------------------------------------------- claim 6
def test_claim6_outer_layers_dominate():
    assert rule_outer_layers_dominate(first_share=0.2, late_share=0.5, other_late_shares=[0.3, 0.2]) is True
    # grows but attention stays the largest group
    assert rule_outer_layers_dominate(first_share=0.2, late_share=0.35, other_late_shares=[0.4, 0.25]) is False
    # the largest group late, but no larger than during memorisation
    assert rule_outer_layers_dominate(first_share=0.6, late_share=0.5, other_late_shares=[0.3, 0.2]) is False


# ------------------------------------------------------------------------------- claim 7
def test_claim7_swap():
    assert rule_swap(s_hybrid=500, s_model=800) is True
    assert rule_swap(s_hybrid=500, s_model=None) is True  # only the hybrid gets there
    assert rule_swap(s_hybrid=800, s_model=500) is False
    assert rule_swap(s_hybrid=500, s_model=500) is False
    assert rule_swap(s_hybrid=None, s_model=500) is False  # the model does, the hybrid never
    assert rule_swap(s_hybrid=None, s_model=None) is None  # neither: the run cannot tell


# ------------------------------------------------------------------------------- claim 8
def _vectors(seed: int, q: int = 16, d: int = 12, common: float = 0.0, noise: float = 1.0) -> torch.Tensor:
    """``q`` random influence vectors plus ``common`` times one shared direction."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(d, generator=g, dtype=torch.float64)
    return common * shared[None, :] + noise * torch.randn(q, d, generator=g, dtype=torch.float64)


def test_mean_pairwise_cosine():
    from analyses.grokking.alignment import _mean_offdiag_cosine

    v = _vectors(0)
    assert mean_pairwise_cosine(v) == pytest.approx(_mean_offdiag_cosine(v), abs=1e-12)  # = alignment.csv
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    v = torch.stack([a, b, torch.zeros(2)])
    assert mean_pairwise_cosine(v) == pytest.approx(2**-0.5)  # the zero row is skipped
    # a resample with a repeated row leaves out the row's cosine with itself
    assert mean_pairwise_cosine(v, torch.tensor([0, 0, 1])) == pytest.approx(2**-0.5)
    assert math.isnan(mean_pairwise_cosine(v, torch.tensor([0, 0, 0])))


def test_claim8_alignment_grows_beyond_bootstrap_noise():
    first = _vectors(1)  # unrelated directions: cosine near 0
    last = _vectors(2, common=3.0)  # one shared direction dominates: cosine near 1
    ch = bootstrap_alignment_change(first, last)
    assert ch.n_boot == 200 and ch.lo > 0
    assert ch.increase > ALIGN_Z * ch.boot_std
    assert rule_alignment_grows(ch.increase, ch.boot_std) is True


def test_claim8_counter_example_one_pair():
    """Two queries that become identical raise the mean cosine a little; that is not alignment."""
    first = _vectors(3)
    last = first.clone()
    last[1] = last[0]
    ch = bootstrap_alignment_change(first, last)
    assert ch.increase > 0  # the old rule (any increase) would call this reproduced
    assert ch.lo <= 0 < ch.hi
    assert ch.increase <= ALIGN_Z * ch.boot_std
    assert rule_alignment_grows(ch.increase, ch.boot_std) is False


def test_claim8_counter_examples():
    first = _vectors(4, common=3.0)
    last = _vectors(5)
    ch = bootstrap_alignment_change(first, last)  # alignment falls
    assert rule_alignment_grows(ch.increase, ch.boot_std) is False
    assert rule_alignment_grows(0.05, 0.03) is False  # within 2 standard deviations
    assert rule_alignment_grows(0.07, 0.03) is True
    assert rule_alignment_grows(math.nan, 0.03) is None
    with pytest.raises(ValueError, match="same queries"):
        bootstrap_alignment_change(first, last[:-1])


def test_claim8_bootstrap_is_seeded():
    first, last = _vectors(6), _vectors(7, common=1.0)
    a, b = bootstrap_alignment_change(first, last), bootstrap_alignment_change(first, last)
    assert a == b
    c = bootstrap_alignment_change(first, last, seed=1)
    assert c.increase == a.increase and c.boot_std != a.boot_std


# ------------------------------------------------------------------------------- claim 9
def test_claim9_exact():
    assert rule_exact(rel_residual=1e-7, replay_mismatch=0.0) is True
    assert rule_exact(rel_residual=1e-3, replay_mismatch=0.0) is False
    assert rule_exact(rel_residual=1e-7, replay_mismatch=1e-6) is False  # replay was not exact
    assert rule_exact(rel_residual=None, replay_mismatch=0.0) is None
    assert rule_exact(rel_residual=1e-7, replay_mismatch=0.0, certified=False) is False  # a step missed
    assert rule_exact(rel_residual=1e-7, replay_mismatch=0.0, certified=None) is True  # unknown (old file)


# ------------------------------------------------------------------------------- counting
def test_verdict_counting_keeps_not_run_explicit():
    assert [verdict(x) for x in (True, False, None)] == ["reproduced", "not reproduced", "not run"]
    counts = count_verdicts(["reproduced", "not run", "not reproduced", "not run", "reproduced", "not run"])
    assert counts == {"reproduced": 2, "not reproduced": 1, "not run": 3}
    line = verdict_line(counts)
    assert line == "2 reproduced, 1 not reproduced, 3 not run (6 claims)"
    assert "2/3" not in line
    assert count_verdicts([]) == {"reproduced": 0, "not reproduced": 0, "not run": 0}
    with pytest.raises(ValueError, match="unknown verdict"):
        count_verdicts(["reproduced", "maybe"])


# ------------------------------------------------------------------------------- report wiring
def _study_dir(path, wd_share: float, aligned: bool):
    """A study directory with just enough files for claims 4-8 (no training run)."""
    from analyses.grokking.phases import Phases
    from explaind_tl.attribution import Attribution

    path.mkdir()
    phases = Phases(memorisation_end=100, cleanup_start=400, generalisation=600, end=800, test_acc_plateau=0.5)
    checks = {"weight_norm@mem": 30.0, "weight_norm@end": 20.0,
              "weight_norm_slope": {"memorisation": 1e-3, "circuit_formation": -2e-2, "cleanup": -1e-2, "post_grokking": -1e-3}}
    (path / "phases.json").write_text(json.dumps({"phases": phases.to_dict(), "key_frequencies": [3], "checks": checks}))
    change = 1.0
    rows = [
        dict(phase="memorisation", start=0, stop=100, change=-2.0, data=-2.5, weight_decay=0.5, wd_abs_share=0.2),
        dict(phase="cleanup", start=400, stop=600, change=change, data=change * (1 - wd_share),
             weight_decay=change * wd_share, wd_abs_share=0.4),
    ]
    shares = [(0.2, 0.5, 0.3), (0.5, 0.3, 0.2)]
    for r, (e, a, m) in zip(rows, shares):
        r.update({"share:embed/unembed": e, "share:attention": a, "share:mlp": m})
    pd.DataFrame(rows).to_csv(path / "phase_shares_test.csv", index=False)
    (path / "attributions").mkdir()
    first = _vectors(1)
    last = _vectors(2, common=3.0) if aligned else first.clone()
    if not aligned:
        last[1] = last[0]
    al = []
    for name, v, (a, b) in (("memorisation", first, (0, 20)), ("cleanup", last, (580, 600))):
        # [Q, C * S] with C = 2 components x S = 6 step bins, stored as (query, component, step)
        attr = Attribution(v.reshape(16, 2, 6), ("query", "component", "step"), {"component": ["embed", "L0H0"]})
        attr.save(path / "attributions" / f"alignment_{name}.safetensors")
        al.append(dict(phase=name, start=a, stop=b, component="all", mean_cosine=mean_pairwise_cosine(v), mean_influence=0.0))
    pd.DataFrame(al).to_csv(path / "alignment.csv", index=False)
    return path


@pytest.mark.parametrize("good", [True, False])
def test_report_counts_and_margins(tmp_path, good):
    from analyses.grokking.report import write_report

    out = _study_dir(tmp_path / "study", wd_share=0.8 if good else 0.2, aligned=good)
    report = write_report(out).read_text()
    claims = pd.read_csv(out / "claims.csv")
    by_claim = dict(zip(claims["claim"], claims["verdict"]))
    expected = "reproduced" if good else "not reproduced"
    assert by_claim["Weight decay drives cleanup: it raises test performance"] == expected
    assert by_claim["Test examples' influence becomes aligned late in training"] == expected
    assert by_claim["Weight norm falls after memorisation, fastest during circuit formation/cleanup"] == "reproduced"
    assert by_claim["The final phase aligns the outer layers: embed/unembed influence dominates late"] == "reproduced"
    # one count per verdict, the same in claims.csv, summary.json and report.md
    counts = count_verdicts(claims["verdict"])
    assert counts["not run"] > 0  # no progress measures, swap or attribution of the test set here
    line = verdict_line(counts)
    assert json.loads((out / "summary.json").read_text())["claims"] == line
    assert f"**{line}.**" in report
    assert "| claims | " + line + " |" in report
