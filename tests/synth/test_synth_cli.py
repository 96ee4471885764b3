"""`longitudinal synth` end to end through the real typer app."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from longitudinal.cli import app


def test_synth_command_writes_a_cohort_and_prints_the_summary(tmp_path: Path) -> None:
    runner = CliRunner()
    home = tmp_path / "home"
    result = runner.invoke(app, ["--home", str(home), "synth", "--patients", "2", "--seed", "4", "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    data = home / "data" / "synthetic"  # OUT omitted -> Settings().data_path
    assert str(data) in result.output.replace("\n", "")
    assert "patients 2" in result.output
    assert "sub-002" in result.output
    assert sorted(p.name for p in data.glob("sub-*")) == ["sub-001", "sub-002"]
    assert (data / "derivatives" / "groundtruth" / "volumes.tsv").is_file()


def test_synth_command_fails_cleanly_on_a_bad_preset(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--preset", "huge"])
    assert result.exit_code == 1
    assert "huge" in result.output and "tiny" in result.output
    assert "Traceback" not in result.output
