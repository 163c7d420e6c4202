"""Execute the example notebooks with nbclient (tiny config: seconds each).

The kernel is started with this interpreter (``sys.executable -m ipykernel_launcher``), so the
notebooks run in the same virtual environment as the tests whatever kernelspecs are installed.
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


def _run(path: Path, timeout: int = 600) -> nbformat.NotebookNode:
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(path, as_version=4)
    km = KernelManager(
        kernel_cmd=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    )
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=timeout,
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute(cwd=str(ROOT))
    return nb


def test_notebooks_exist_and_have_no_outputs():
    names = {p.name for p in NOTEBOOKS}
    assert {
        "01_quickstart.ipynb",
        "02_grokking_components.ipynb",
        "03_custom_metric_and_components.ipynb",
    } <= names
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.get("outputs"), f"{path.name} is committed with outputs"
                assert cell.get("execution_count") is None


def test_notebooks_match_generator():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _make_notebooks as gen
    finally:
        sys.path.pop(0)
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
