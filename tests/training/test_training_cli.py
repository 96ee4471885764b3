"""`longitudinal train` and `longitudinal evaluate` end to end on a phantom store (real files, real CLI)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.data.phantoms import make_phantom_store


def test_train_then_evaluate_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGITUDINAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "220")  # the per-horizon table is wide (env, not console.width: no pinning)
    url = make_phantom_store(str(tmp_path / "c.zarr"), n_patients=5, seed=2, grid=(24, 24, 24)).url
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "model: tfm\nmodel_options: {width: 4, channel_mult: [1, 2], ctx_width: 4, emb_dim: 16, steps: 2}\n"
        "crop_size: [16, 16, 16]\nbatch_size: 2\nnum_workers: 0\naugment: null\nval_targets: 3\n"
        "log_every: 1\n"
    )
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--store", url, "--config", str(cfg), "--steps", "2", "--run-dir", str(run),
                                 "--no-track"])
    assert res.exit_code == 0, res.output
    assert "best val Dice" in res.output and (run / "model.pt").exists()
    split = json.loads((run / "split.json").read_text())
    assert split["test"], "the test split is used below"

    out = tmp_path / "rows.json"
    res = runner.invoke(app, ["evaluate", "--store", url, "--model", str(run / "checkpoints" / "best.pt"),
                              "--json", str(out), "--samples", "2", "--patients", str(run / "split.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    assert {r["model"] for r in rows} == {"lci", "linear", "tfm"}
    assert "lci" in res.output and "Dice WT" in res.output

    res = runner.invoke(app, ["evaluate", "--store", url, "--model", "lci"])
    assert res.exit_code == 0, res.output

    # Clean failures, no tracebacks.
    res = runner.invoke(app, ["evaluate", "--store", url, "--model", "nonsense"])
    assert res.exit_code == 1 and "cannot resolve model reference 'nonsense'" in res.output
    res = runner.invoke(app, ["train", "--store", url, "--model", "tfm", "--steps", "0", "--no-track"])
    assert res.exit_code == 1 and "steps" in res.output
