"""The ``explaind-tl`` command line: help is fast (no heavy imports), arguments are validated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys\n"
        "from analyses.cli import main\n"
        "for argv in (['--help'], ['grokking', '--help'], ['report', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "heavy = [m for m in ('transformer_lens', 'torch', 'datasets', 'pandas', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    res = _py(code)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout, res.stdout
    assert "grokking" in res.stdout and "--no-explain" in res.stdout
    for preset in ("default", "nanda", "tiny"):
        assert preset in res.stdout


def test_module_entry_point_prints_usage():
    """``python -m analyses.cli --help`` works; that it stays fast is checked above without a
    timing (no heavy import), since timings belong in benchmarks, not tests."""
    res = subprocess.run(
        [sys.executable, "-m", "analyses.cli", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "usage: explaind-tl" in res.stdout
