"""The example notebooks: committed executed with their figures, in sync with their generator,
and still executing with the current code (nbclient; tiny config: seconds each).

The kernel is started with this interpreter (``examples/_make_notebooks.execute``: ``sys.executable
-m ipykernel_launcher``), so the notebooks run in the same virtual environment as the tests
whatever kernelspecs are installed.
The working directory is the repository root, so ``analyses`` and ``explaind_tl`` import even
without an install.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "examples").glob("[0-9][0-9]_*.ipynb"))


def _generator():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _make_notebooks as gen
    finally:
        sys.path.pop(0)
    return gen


def _run(path: Path, timeout: int = 600) -> nbformat.NotebookNode:
    return _generator().execute(nbformat.read(path, as_version=4), timeout=timeout)


def test_notebooks_are_committed_executed_with_figures():
    """Committed with outputs (``make notebooks``), as TransformerLens's demos are: every code
    cell ran, in order, without an error or a certificate warning; the plotting ones show figures."""
    names = {p.name for p in NOTEBOOKS}
    assert {
        "01_quickstart.ipynb",
        "02_grokking_components.ipynb",
        "03_custom_metric_and_components.ipynb",
        "04_induction_heads.ipynb",
    } <= names
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert [c.get("execution_count") for c in code] == list(range(1, len(code) + 1)), (
            f"{path.name} is not committed executed: run `make notebooks`"
        )
        outputs = [o for c in code for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"], path.name
        text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
        assert "CertificateWarning" not in text, f"{path.name}: a result missed its certificate"
        if "plot_" in "".join(c.source for c in code):
            assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no figure"


def test_notebooks_match_generator():
    gen = _generator()
    for name, build in gen.NOTEBOOKS.items():
        on_disk = nbformat.read(ROOT / "examples" / name, as_version=4)
        fresh = build()
        assert [c.source for c in on_disk.cells] == [c.source for c in fresh.cells], (
            f"{name} is stale: run `python examples/_make_notebooks.py`"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path: Path):
    nb = _run(path)
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
