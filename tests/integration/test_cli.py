"""The ``explaind-tl`` command line: help is fast (no heavy imports), arguments are validated."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_help_is_fast():
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "analyses.cli", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    assert "usage: explaind-tl" in res.stdout
    assert elapsed < 10.0  # typically ~0.1 s; generous for a loaded CI box


def test_bad_arguments_exit_2():
    from analyses.cli import main

    with pytest.raises(SystemExit) as e:
        main(["grokking", "--config", "nope"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["grokking", "--queries", "many"])
    assert e.value.code == 2


def test_no_command_prints_help(capsys):
    from analyses.cli import main

    assert main([]) == 0
    assert "usage: explaind-tl" in capsys.readouterr().out


def test_cli_presets_match_tasks():
    from analyses.cli import _PRESETS
    from analyses.grokking.task import CONFIGS

    assert set(_PRESETS) == set(CONFIGS)


def test_grokking_no_explain_tiny(tmp_path, capsys):
    from analyses.cli import main

    out = tmp_path / "study"
    assert main(["grokking", "--config", "tiny", "--out", str(out), "--no-explain", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "summary" in text and f"report: {out / 'report.md'}" in text
    assert (out / "report.md").exists() and (out / "metrics.csv").exists()
    # the report can be regenerated from the files alone
    assert main(["report", str(out)]) == 0
