"""The grokking study: task data, configs, phase rule, progress measures, and the whole pipeline
on the ``tiny`` config (train -> explain -> analyses -> report)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import assert_close_scaled

from analyses.grokking.task import (
    CONFIGS,
    GrokkingConfig,
    get_config,
    modular_addition_data,
    modular_addition_tensors,
)


# ------------------------------------------------------------------------------- data + configs
def test_modular_addition_split():
    p = 7
    t = modular_addition_tensors(p, 0.5, seed=3)
    n_train = int(0.5 * p * p)
    assert t["train_tokens"].shape == (n_train, 3) and t["test_tokens"].shape == (p * p - n_train, 3)
    for split in ("train", "test"):
        tok, lab = t[f"{split}_tokens"], t[f"{split}_label"]
        assert (tok[:, 2] == p).all()
        assert torch.equal(lab, (tok[:, 0] + tok[:, 1]) % p)
        assert torch.equal(t[f"{split}_pairs"], tok[:, 0] * p + tok[:, 1])
    pairs = torch.cat([t["train_pairs"], t["test_pairs"]])
    assert torch.equal(pairs.sort().values, torch.arange(p * p))  # a partition of all pairs
    assert torch.equal(modular_addition_tensors(p, 0.5, seed=3)["train_pairs"], t["train_pairs"])
    assert not torch.equal(modular_addition_tensors(p, 0.5, seed=4)["train_pairs"], t["train_pairs"])


def test_modular_addition_datasets():
    train, test = modular_addition_data(5, 0.6, seed=0)
    assert len(train) == 15 and len(test) == 10
    assert set(train.column_names) == {"tokens", "label", "id"}
    assert train["id"][:] == list(range(15))
    row = train[0]
    assert row["label"] == (row["tokens"][0] + row["tokens"][1]) % 5


@pytest.mark.parametrize("bad", [dict(p=1, train_fraction=0.5), dict(p=5, train_fraction=1.0), dict(p=5, train_fraction=0.01)])
def test_modular_addition_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        modular_addition_tensors(**bad)


def test_presets():
    assert set(CONFIGS) == {"default", "nanda", "tiny"}
    d = CONFIGS["default"]
    assert (d.p, d.train_fraction, d.d_model, d.n_heads, d.d_head, d.d_mlp) == (59, 0.5, 64, 4, 16, 256)
    assert (d.lr, d.weight_decay, d.betas, d.batch_size, d.extra_steps) == (1e-3, 1.0, (0.9, 0.98), None, 200)
    assert d.n_test_queries is None  # the demo explains the whole test set
    n = CONFIGS["nanda"]
    assert (n.p, n.train_fraction, n.d_model, n.d_mlp, n.d_head, n.max_steps, n.extra_steps) == (113, 0.3, 128, 512, 32, 25_000, None)
    assert get_config("tiny", seed=5).seed == 5
    with pytest.raises(KeyError, match="unknown grokking config"):
        get_config("huge")
    assert GrokkingConfig.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def test_model_and_optimizer():
    from analyses.induction.task import resolve_backend

    cfg = get_config("tiny")
    if resolve_backend("auto") == "hooked":  # TransformerLens 4 has no HookedTransformerConfig
        hc = cfg.hooked_config()
        assert (hc.d_vocab, hc.d_vocab_out, hc.n_ctx, hc.act_fn, hc.normalization_type) == (cfg.p + 1, cfg.p, 3, "relu", None)
    model = cfg.make_model()
    out = model(torch.tensor([[1, 2, cfg.p]]))
    assert out.shape == (1, 3, cfg.p)
    opt = cfg.make_optimizer(model)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["weight_decay"] == 1.0 and opt.defaults["betas"] == (0.9, 0.98)
    # seeded initialisation
    m2 = cfg.make_model()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters()))


# ------------------------------------------------------------------------------- phases
def _curves(steps, train, test):
    return pd.DataFrame({"step": steps, "train_acc": train, "test_acc": test})


def test_find_phases_rule():
    from analyses.grokking.phases import find_phases

    df = _curves(
        [0, 100, 200, 300, 400, 500, 600],
        [0.1, 0.995, 1.0, 1.0, 1.0, 1.0, 1.0],
        [0.0, 0.50, 0.52, 0.80, 0.95, 0.995, 1.0],
    )
    ph = find_phases(df)
    assert (ph.memorisation_end, ph.cleanup_start, ph.generalisation, ph.end) == (100, 300, 500, 600)
    assert ph.test_acc_plateau == 0.5
    assert ph.intervals() == {
        "memorisation": (0, 100),
        "circuit_formation": (100, 300),
        "cleanup": (300, 500),
        "post_grokking": (500, 600),
    }
    assert ph.phase_of(250) == "circuit_formation" and ph.phase_of(600) == "post_grokking"
    # never grokked: later phases are empty
    ph2 = find_phases(_curves([0, 10, 20], [0.2, 1.0, 1.0], [0.1, 0.3, 0.3]))
    assert ph2.generalisation is None and list(ph2.intervals()) == ["memorisation", "circuit_formation"]
    ph3 = find_phases(_curves([0, 10], [0.2, 0.5], [0.1, 0.1]))
    assert list(ph3.intervals()) == ["memorisation"]


def test_fourier_basis_orthonormal_and_key_frequency():
    from analyses.grokking.phases import fourier_basis, frequency_norms

    for p in (7, 8, 11):
        basis, names = fourier_basis(p)
        assert basis.shape == (p, p) and len(names) == p
        assert_close_scaled(basis @ basis.T, torch.eye(p, dtype=torch.float64), 1e-12)  # O(1) entries
    p = 11
    x = torch.arange(p, dtype=torch.float64)
    W = torch.stack([torch.cos(2 * torch.pi * 3 * x / p), torch.sin(2 * torch.pi * 3 * x / p)], dim=1)
    norms = frequency_norms(W, p)
    assert int(norms.argmax()) + 1 == 3 and norms[2] > 100 * norms.sum() / 1e4


def test_component_group():
    from analyses.grokking.components import component_group

    assert component_group("embed") == component_group("unembed") == "embed/unembed"
    assert component_group("L0H3") == component_group("L0.attn.b_O") == "attention"
    assert component_group("L0.mlp") == component_group("L0N12") == component_group("L0.mlp.b_out") == "mlp"


# ------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from analyses.grokking.pipeline import run_study

    out = tmp_path_factory.mktemp("grokking") / "tiny"
    return run_study(get_config("tiny"), out, progress=False, log=None)


REPORT_FILES = (
    "config.json", "metrics.csv", "phases.json", "progress_measures.csv", "swap.csv",
    "components_test.csv", "components_train.csv", "phase_shares_test.csv", "alignment.csv",
    "timings.json", "claims.csv", "summary.json", "report.md",
)  # fmt: skip
FIGURES = ("curves.png", "progress_measures.png", "heatmap_test.png", "cumulative_test.png", "swap.png", "alignment.png")


def check_report(out: Path, config: str) -> pd.DataFrame:
    """A study's report directory is complete: every file and figure, claims with verdicts.

    Args:
        out: The study's output directory.
        config: The name of the config the study ran.

    Returns:
        The claims table.
    """
    for name in REPORT_FILES:
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert "## Claims" in report and "| # | claim |" in report
    claims = pd.read_csv(out / "claims.csv")
    assert len(claims) >= 8 and set(claims["verdict"]) <= {"reproduced", "not reproduced", "not run"}
    assert (claims["verdict"] != "not run").sum() >= 5
    # every verdict counted, in the summary and the report alike
    from analyses.grokking.claims import count_verdicts, verdict_line

    line = verdict_line(count_verdicts(claims["verdict"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["claims"] == line and f"**{line}.**" in report
    # the alignment claim is decided from the saved per-query attributions, with its bootstrap
    align = claims[claims["claim"].str.contains("aligned late")].iloc[0]
    assert align["verdict"] != "not run" and "bootstrap std" in align["evidence"]
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    for f in FIGURES:
        assert f in figs
        assert f"figures/{f}" in report
    assert summary["config"] == config
    return claims


def check_test_attribution(out: Path, config: GrokkingConfig) -> None:
    """The saved test-set attribution sums to the actual change of the mean test log-prob.

    The change is measured with a float64 forward pass (as the certificate measures it); the
    attribution itself is float32, so its rounding accumulates step by step and the scale is the
    path length ``sum_s |q(w_s+1) - q(w_s)|``: 1e-5 of it is float32 rounding with ample headroom
    (~3e-7 seen on the tiny config), while a dropped step or source shows up at its own size.

    Args:
        out: The study's output directory.
        config: The config the study ran (its queries are the whole test set).
    """
    from analyses.grokking.training import dataset_tensors
    from explaind_tl import Trajectory
    from explaind_tl.attribution import Attribution
    from explaind_tl.metrics import correct_logprob

    assert config.n_test_queries is None  # the queries are the whole test set
    attr = Attribution.load(out / "attributions" / "components_test.safetensors")
    assert set(attr.dims) == {"step", "component", "source"}
    assert "embed" in attr.coords["component"] and "unembed" in attr.coords["component"]
    assert "weight_decay" in attr.coords["source"]
    traj = Trajectory.load(out / "run")
    q = dataset_tensors(config.data()[1])
    with torch.no_grad():
        f = lambda s: correct_logprob(traj.model(s).double()(q["tokens"]), q).mean().item()  # noqa: E731
        change = f(traj.num_steps) - f(0)
    path = float(attr.completeness.step_measured.abs().sum())
    assert_close_scaled(attr.total(), change, 1e-5, scale=path)
    table = pd.read_csv(out / "components_test.csv")
    # the CSV's rows re-add the same entries in another order (float64, written at full precision)
    assert_close_scaled(table["total"].sum(), attr.total(), 1e-12, scale=float(table["total"].abs().sum()))


def check_certificates(out: Path) -> int:
    """Every saved attribution of a study meets its completeness certificate.

    Each step is certified to ``tol`` of its own change (float64), so a row's total residual is
    at most ``tol`` times its path length ``sum_s |step change|`` plus rounding: ``2 * tol`` of
    the longest path is the bound. float32 attributions may stop refining at float32 rounding,
    so they get the float32 bound 1e-5 of the path.

    Args:
        out: The study's output directory.

    Returns:
        The number of attributions checked.
    """
    from explaind_tl.attribution import Attribution

    paths = sorted((out / "attributions").glob("*.safetensors"))
    for path in paths:
        attr = Attribution.load(path)
        c = attr.completeness
        k = 2 * attr.meta["tol"] if attr.meta["dtype"] == "float64" else 1e-5
        assert_close_scaled(c.attributed, c.measured, k, scale=float(c.step_measured.abs().sum(0).max()))
    return len(paths)


def test_pipeline_writes_report(study):
    check_report(study.out, "tiny")
    assert study.summary["config"] == "tiny"


def test_pipeline_training_and_phases(study):
    out = study.out
    m = pd.read_csv(out / "metrics.csv")
    assert m["step"].iloc[0] == 0 and m["step"].iloc[-1] == get_config("tiny").max_steps
    assert m["train_acc"].iloc[-1] == 1.0  # tiny memorises (about half-way through the run)
    ph = json.loads((out / "phases.json").read_text())
    assert ph["phases"]["memorisation_end"] is not None
    assert len(ph["key_frequencies"]) == get_config("tiny").n_fourier_keys
    pm = pd.read_csv(out / "progress_measures.csv")
    assert {"restricted_loss", "excluded_loss", "weight_norm"} <= set(pm.columns)


def test_attribution_is_complete(study):
    """The saved test-set attribution sums to the actual change of the mean test log-prob, and
    every saved attribution (test, train, per-query alignment) meets its certificate."""
    check_test_attribution(study.out, get_config("tiny"))
    assert check_certificates(study.out) >= 4


def test_swap_experiment_endpoints(study):
    sw = pd.read_csv(study.out / "swap.csv")
    last = sw.iloc[-1]
    # at s = T every hybrid is the final model
    assert last["actual"] == last["final_outer"] == last["final_inner"] == last["final_outer_mlp_out"]


def test_alignment_rows(study):
    al = pd.read_csv(study.out / "alignment.csv")
    assert "all" in set(al["component"])
    cos = al["mean_cosine"].dropna()
    assert ((cos >= -1 - 1e-9) & (cos <= 1 + 1e-9)).all()


def test_tiny_grokking_on_a_transformer_bridge(tmp_path, capsys):
    """`--backend bridge`: the same study on a TransformerBridge with the HookedTransformer's
    initial numbers; the two runs' curves agree to rounding while the run is not yet chaotic
    (its first 50 steps; this memorising run amplifies float32 rounding afterwards)."""
    pytest.importorskip("transformer_lens.model_bridge")
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        pytest.skip("no HookedTransformer to compare with (TransformerLens 4)")
    from analyses.cli import main

    curves = {}
    for backend in ("bridge", "hooked"):
        out = tmp_path / backend
        assert main(["grokking", "--config", "tiny", "--out", str(out), "--quiet", "--no-explain", "--backend", backend]) == 0
        assert f"backend {backend}" in capsys.readouterr().out
        curves[backend] = pd.read_csv(out / "metrics.csv")
    early = curves["hooked"]["step"] <= 50
    for col in ("train_loss", "test_loss"):
        got = torch.tensor(curves["bridge"][col][early].values)
        want = torch.tensor(curves["hooked"][col][early].values)
        assert_close_scaled(got, want, 1e-4)
