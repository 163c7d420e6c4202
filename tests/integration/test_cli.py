"""The ``explaind-tl`` command line: help is fast (no heavy imports), arguments are validated."""

from __future__ import annotations

import subprocess
import sys
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


def test_module_entry_point_prints_usage():
    """``python -m analyses.cli --help`` works; that it stays fast is checked above without a
    timing (no heavy import), since timings belong in benchmarks, not tests."""
    res = subprocess.run(
        [sys.executable, "-m", "analyses.cli", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "usage: explaind-tl" in res.stdout


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


def test_migrate_reports_a_path_that_is_not_a_run(tmp_path, capsys):
    from analyses.cli import main

    (tmp_path / "mine").mkdir()
    assert main(["migrate", str(tmp_path / "mine")]) == 1
    assert "neither a run directory" in capsys.readouterr().err
