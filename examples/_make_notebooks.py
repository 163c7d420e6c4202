"""Generate and execute the example notebooks (``make notebooks``).

Each notebook is built from the cell sources below, executed with nbclient in this interpreter's
environment (the repository root as working directory) and written with its outputs and figures,
as TransformerLens's demos are, so a reader on a code host sees the plots.
``tests/integration/test_notebooks.py`` checks that the committed notebooks match these sources,
were executed without errors, and still execute with the current code (``tiny`` config:
seconds). Each notebook runs from the repository root or from ``examples/``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SETUP = """\
import tempfile
from pathlib import Path

import torch

import explaind_tl
from analyses.grokking.task import get_config

torch.manual_seed(0)
workdir = Path(tempfile.mkdtemp(prefix="explaind_tl_example_"))
print("explaind_tl", explaind_tl.__version__, "| run files in", workdir)"""


def quickstart() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 01 — Quickstart: record → explain → per-head query → plot\n\n"
            "ExPLAIND writes the change of a trained model's output, from initialisation to the end "
            "of training, *exactly* as a sum over training steps, model components and training "
            "examples. This notebook records a tiny modular-addition run with "
            "`explaind_tl.train`, explains the mean test log-prob per step and per attention head, "
            "checks completeness and plots the result. It runs in seconds on a CPU."
        ),
        new_code_cell(SETUP),
        new_markdown_cell(
            "## 1. Record a training run\n\n`explaind_tl.train` trains in place and records the "
            "trajectory (batch ids, learning rates, checkpoints every `checkpoint_every` steps) "
            "so that every step can be replayed exactly."
        ),
        new_code_cell(
            """\
from explaind_tl.losses import last_token_cross_entropy

cfg = get_config("tiny")
train_ds, test_ds = cfg.data()
model = cfg.make_model()
optimizer = cfg.make_optimizer(model)

trajectory = explaind_tl.train(
    model, optimizer, train_ds, last_token_cross_entropy,
    steps=60, run_dir=workdir / "run", checkpoint_every=20, progress=False,
)
trajectory"""
        ),
        new_markdown_cell(
            "## 2. Explain the mean test log-prob per step bin and component\n\n"
            "Queries are test inputs; the metric is the log-prob of the correct answer. "
            "`reduce=\"mean\"` averages over the queries."
        ),
        new_code_cell(
            """\
queries = test_ds.select(range(16))
attr = explaind_tl.explain(
    trajectory, queries, metric="correct_logprob",
    by=("step", "component"), components="head", reduce="mean",
    step_bins=10, progress=False,
)
print(attr)
print(attr.completeness)"""
        ),
        new_markdown_cell("The attribution is complete: its total equals the actual change of the metric."),
        new_code_cell(
            """\
from explaind_tl.metrics import correct_logprob

q = {"tokens": torch.tensor(queries["tokens"][:]), "label": torch.tensor(queries["label"][:])}
with torch.no_grad():
    change = (correct_logprob(trajectory.model(trajectory.num_steps)(q["tokens"]), q)
              - correct_logprob(trajectory.model(0)(q["tokens"]), q)).mean().item()
print(f"actual change {change:+.5f}   attribution total {attr.total():+.5f}")
assert abs(change - attr.total()) < 1e-3 * max(1.0, abs(change))"""
        ),
        new_markdown_cell("## 3. Which components mattered? Per head, and the top components"),
        new_code_cell(
            """\
print("per head [layer, head]:", attr.heads())
attr.top(5)"""
        ),
        new_markdown_cell("## 4. Per query: one column per test example"),
        new_code_cell(
            """\
per_query = explaind_tl.explain(
    trajectory, queries.select(range(4)), by=("query", "component"),
    components="head", progress=False,
)
per_query.to_frame().pivot(index="component", columns="query", values="value")"""
        ),
        new_markdown_cell("## 5. Plot"),
        new_code_cell(
            """\
%matplotlib inline
from explaind_tl.plotting import plot_component_heatmap, plot_cumulative_influence

display(plot_component_heatmap(attr))
display(plot_cumulative_influence(attr))"""
        ),
    ]
    return new_notebook(cells=cells, metadata=_meta())


def grokking_components() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 02 — Grokking: phases, progress measures and component influence\n\n"
            "The pieces of `explaind-tl grokking` one at a time, on the `tiny` config (it memorises "
            "but does not grok within 100 steps; run `explaind-tl grokking` for the real study on "
            "the `default` config, a few minutes on a CPU)."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            """\
from analyses.grokking.training import dataset_tensors, train_grokking

cfg = get_config("tiny")
result = train_grokking(cfg, workdir / "run", progress=False)
print(f"{result.num_steps} steps, {result.ms_per_step:.1f} ms/step, grokked at {result.grok_step}")
result.metrics.tail()"""
        ),
        new_markdown_cell(
            "## Phases from the curves, cross-checked with Nanda et al.'s progress measures"
        ),
        new_code_cell(
            """\
from analyses.grokking.phases import find_phases, phase_checks, progress_measures
from analyses.grokking.task import modular_addition_tensors

phases = find_phases(result.metrics)
print(phases.intervals())
split = modular_addition_tensors(cfg.p, cfg.train_fraction, cfg.data_seed)
measures, keys = progress_measures(result.trajectory, cfg.p, split["train_pairs"], n_keys=cfg.n_fourier_keys)
print("key frequencies:", keys)
measures[["step", "restricted_loss", "excluded_loss", "weight_norm"]]"""
        ),
        new_code_cell("phase_checks(phases, measures)"),
        new_markdown_cell(
            "## Per-component influence, split into data and weight decay\n\n"
            "`by=(\"step\", \"component\", \"source\")` on the whole test set (mean log-prob)."
        ),
        new_code_cell(
            """\
from analyses.grokking.components import component_influence, influence_table, phase_shares

test_q = dataset_tensors(result.test_data)
attr = component_influence(result.trajectory, test_q, step_bin=cfg.step_bin, progress=False)
print(attr.completeness)
influence_table(attr, phases)"""
        ),
        new_code_cell("phase_shares(attr, phases)"),
        new_markdown_cell("## Swap experiment: final outer layers around the step-s inner model"),
        new_code_cell(
            """\
from analyses.grokking.alignment import swap_experiment

swap_experiment(result.trajectory, test_q)"""
        ),
        new_code_cell(
            """\
%matplotlib inline
from explaind_tl.plotting import plot_cumulative_influence

display(plot_cumulative_influence(attr.sum("source"), accuracy=result.metrics))"""
        ),
    ]
    return new_notebook(cells=cells, metadata=_meta())


def custom_metric() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 03 — A custom metric and custom components\n\n"
            "Any `(logits, batch) -> [Q]` function can be the query, and any partition of the "
            "parameters can be the component axis (`ComponentMap.from_dict`)."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            """\
from explaind_tl.losses import last_token_cross_entropy

cfg = get_config("tiny")
train_ds, test_ds = cfg.data()
model = cfg.make_model()
trajectory = explaind_tl.train(
    model, cfg.make_optimizer(model), train_ds, last_token_cross_entropy,
    steps=40, run_dir=workdir / "run", checkpoint_every=20, progress=False,
)"""
        ),
        new_markdown_cell(
            "## A callable metric: the margin of the correct logit over the wrong ones\n\n"
            "Write it with `gather`/masking (no Python indexing on tensors) so it works under "
            "`torch.func.vmap`. Keep it smooth: the margin over the *best* wrong logit "
            "(`max`) jumps in slope wherever the runner-up changes along a step, and the "
            "kink-aware quadrature only locates ReLU kinks, so such steps would miss their "
            "certificate (`explain` says so with a `CertificateWarning`). A log-sum-exp over "
            "the wrong logits is the smooth version."
        ),
        new_code_cell(
            """\
def margin(logits, batch):
    last = logits[:, -1, :]
    correct = last.gather(1, batch["label"].reshape(-1, 1))[:, 0]
    wrong = last.masked_fill(torch.nn.functional.one_hot(batch["label"], last.shape[-1]).bool(), -1e9)
    return correct - wrong.logsumexp(dim=-1)"""
        ),
        new_markdown_cell(
            "## Custom components: QK vs OV circuit per head, embeddings, MLP in/out\n\n"
            "The groups must partition the trainable parameters (every coordinate exactly once)."
        ),
        new_code_cell(
            """\
from explaind_tl import ComponentMap

groups = {"embed": ["embed.W_E", "pos_embed.W_pos"], "unembed": ["unembed.W_U", "unembed.b_U"]}
for h in range(cfg.n_heads):
    groups[f"QK{h}"] = [("blocks.0.attn.W_Q", h), ("blocks.0.attn.b_Q", h),
                        ("blocks.0.attn.W_K", h), ("blocks.0.attn.b_K", h)]
    groups[f"OV{h}"] = [("blocks.0.attn.W_V", h), ("blocks.0.attn.b_V", h), ("blocks.0.attn.W_O", h)]
groups["attn.b_O"] = ["blocks.0.attn.b_O"]
groups["mlp_in"] = ["blocks.0.mlp.W_in", "blocks.0.mlp.b_in"]
groups["mlp_out"] = ["blocks.0.mlp.W_out", "blocks.0.mlp.b_out"]
cmap = ComponentMap.from_dict(trajectory.model(0), groups)
cmap.labels"""
        ),
        new_code_cell(
            """\
attr = explaind_tl.explain(
    trajectory, test_ds.select(range(16)), metric=margin,
    by=("component", "source"), components=cmap, reduce="mean", progress=False,
)
print(attr.completeness)
assert attr.completeness.ok
attr.to_frame().pivot(index="component", columns="source", values="value")"""
        ),
        new_markdown_cell("Components add up to the total, whatever the partition:"),
        new_code_cell(
            """\
coarse = explaind_tl.explain(trajectory, test_ds.select(range(16)), metric=margin,
                             by=("step",), reduce="mean", progress=False)
print(f"custom components {attr.total():+.6f}   by step {coarse.total():+.6f}")
assert abs(attr.total() - coarse.total()) < 1e-6 * max(1.0, abs(coarse.total()))"""
        ),
    ]
    return new_notebook(cells=cells, metadata=_meta())


def induction_heads() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 04 — Sequence models: next-token metrics, read positions and the induction task\n\n"
            "A 2-layer attention-only model trained on generated sequences in which a random segment "
            "is copied to a later offset (the task of `explaind-tl induction`, here its `tiny` preset: "
            "seconds, too short for induction heads to form). The training loss is "
            "`explaind_tl.losses.next_token_cross_entropy`; the query is the log-prob of each copied "
            "token (`metric=\"next_token_logprob\"` with the copied positions as the queries' `loss_mask`)."
        ),
        new_code_cell(SETUP.replace("from analyses.grokking.task import get_config",
                                    "from analyses.induction.task import get_config, make_sequences")),
        new_code_cell(
            """\
from explaind_tl.losses import next_token_cross_entropy

cfg = get_config("tiny")
data = make_sequences(cfg, cfg.n_train, seed=0)
model = cfg.make_model()
trajectory = explaind_tl.train(
    model, cfg.make_optimizer(model), {"tokens": data["tokens"]}, next_token_cross_entropy,
    steps=cfg.steps, batch_size=cfg.batch_size, run_dir=workdir / "run", checkpoint_every=10, progress=False,
)
held_out = make_sequences(cfg, 8, seed=1, repeat_fraction=1.0)
queries = {"tokens": held_out["tokens"], "loss_mask": held_out["copy_mask"]}
print(held_out["tokens"][0].tolist())
print(held_out["copy_mask"][0].int().tolist())"""
        ),
        new_markdown_cell(
            "## Per step and head\n\nThe mean in-context log-prob of the copied tokens, per step and "
            "attention head; the certificate compares it with the measured change."
        ),
        new_code_cell(
            """\
%matplotlib inline
from explaind_tl.plotting import plot_component_heatmap

attr = explaind_tl.explain(trajectory, queries, metric="next_token_logprob", by=("component", "step"),
                           components="head", reduce="mean", progress=False)
print(attr.completeness)
assert attr.completeness.ok
heads = [c for c in attr.coords["component"] if "H" in c and "." not in c]
fig = plot_component_heatmap(attr.sel(component=heads), title="copied-token log-prob per head and step")
display(fig)"""
        ),
        new_markdown_cell(
            "## Per read position\n\n`by=(..., \"position\")` keeps each read position's share of the "
            "mean (the shares add up to it). `position=` picks the predicting positions: an int, a "
            "slice, a list or `\"all\"` (the default). Here every token of the second half counts "
            "(no `loss_mask`)."
        ),
        new_code_cell(
            """\
tokens_only = {"tokens": held_out["tokens"]}
per_pos = explaind_tl.explain(trajectory, tokens_only, metric="next_token_logprob", by=("position",),
                              position=slice(cfg.n_ctx // 2, None), reduce="mean", progress=False)
mean = explaind_tl.explain(trajectory, tokens_only, metric="next_token_logprob", by=(),
                           position=slice(cfg.n_ctx // 2, None), reduce="mean", progress=False)
print(dict(zip(per_pos.coords["position"], [round(float(v), 5) for v in per_pos.values])))
print(f"sum over positions {per_pos.total():+.6f}   averaged metric {mean.total():+.6f}")
assert abs(per_pos.total() - mean.total()) < 1e-5 * max(1.0, abs(mean.total()))"""
        ),
    ]
    return new_notebook(cells=cells, metadata=_meta())


def _meta() -> dict:
    return {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_grokking_components.ipynb": grokking_components,
    "03_custom_metric_and_components.ipynb": custom_metric,
    "04_induction_heads.ipynb": induction_heads,
}


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    """Run ``nb`` in place with a kernel of this interpreter (``sys.executable``), from the
    repository root, whatever kernelspecs are installed; returns it with its outputs."""
    import sys

    import nbclient
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_cmd=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    client = nbclient.NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(ROOT)}})
    client.execute(cwd=str(ROOT))
    return nb


def main() -> None:
    for name, build in NOTEBOOKS.items():
        nb = build()
        nbformat.validate(nb)
        execute(nb)
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name} (executed)")


if __name__ == "__main__":
    main()
