"""`longitudinal models list` shows versions, aliases, kind and gate figures; `models resolve` prints the
checkpoint of a reference and fails cleanly on a bad one."""

from __future__ import annotations

import json
from pathlib import Path

from trackinghelpers import TINY_TRAIN, baseline_checkpoint
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.data.phantoms import make_phantom_store
from longitudinal.settings import Settings
from longitudinal.tracking import uri
from longitudinal.tracking.logged_model import log_forecaster
from longitudinal.tracking.registry import GateMetrics, apply_decision, gate, register_version


def test_models_list_and_resolve(tmp_path: Path, empty_cwd: Path) -> None:
    home = tmp_path / "home"
    s = Settings(home=home)
    client = uri.client(s)
    run_id = client.create_run(uri.ensure_experiment(s)).info.run_id
    model_uri = log_forecaster(baseline_checkpoint(tmp_path / "l.pt", "linear"), run_id, s.tracking_uri)
    mv, _ = register_version(client, s.registered_model_name, model_uri, run_id, None,
                             {"model_kind": "linear", "intervals": "point forecast"})
    apply_decision(client, s.registered_model_name, str(mv.version),
                   gate(GateMetrics(0.9, 1.0, 5), GateMetrics(0.8, 2.0, 5)))

    runner = CliRunner()
    res = runner.invoke(app, ["--home", str(home), "models", "list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.strip().startswith("│ 1"))
    for text in ("challenger, champion", "linear", "promoted", "0.9000", "1.0000", "point forecast"):
        assert text in line, (text, line)
    assert s.tracking_uri in res.output.replace("\n", "")

    res = runner.invoke(app, ["--home", str(home), "models", "resolve", "tumor-growth-forecaster@champion"],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    resolved = json.loads(res.output)
    assert Path(resolved["checkpoint"]).is_file() and resolved["metadata"]["version"] == "1"

    res = runner.invoke(app, ["--home", str(home), "models", "resolve", "nonsense ref"])
    assert res.exit_code == 1 and "NAME@ALIAS" in res.output
    assert list(empty_cwd.iterdir()) == []


def test_train_track_is_the_flow_twin_and_evaluate_takes_an_alias(tmp_path: Path, empty_cwd: Path) -> None:
    home = tmp_path / "home"
    store = str(tmp_path / "store.zarr")
    make_phantom_store(store, n_patients=6, seed=6, grid=(24, 24, 24))
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({**TINY_TRAIN, "model": "linear"}))
    runner = CliRunner()
    env = {"COLUMNS": "200"}
    res = runner.invoke(app, ["--home", str(home), "train", "--store", store, "--config", str(cfg), "--track"],
                        env=env)
    assert res.exit_code == 0, res.output
    assert "tumor-growth-forecaster v1 (new)" in res.output and "challenger, champion" in res.output
    assert "promoted" in res.output

    res = runner.invoke(app, ["--home", str(home), "evaluate", "--store", store, "--model",
                              "tumor-growth-forecaster@champion"], env=env)
    assert res.exit_code == 0, res.output
    assert "linear" in res.output and "lci" in res.output
    assert list(empty_cwd.iterdir()) == []
