"""MlflowLogger and the tracking URI: everything lands in the run, nothing lands in the current directory."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from longitudinal.settings import Settings  # noqa: E402
from longitudinal.tracking import figures, uri  # noqa: E402
from longitudinal.tracking.logger import MlflowLogger, evaluation_metrics, flatten, metric_key  # noqa: E402
from longitudinal.training.logger import MetricLogger  # noqa: E402

ROWS = [
    {"model": "lci", "horizon": "0-90", "horizon_lo": 0, "horizon_hi": 90, "n": 4, "dice_whole": 0.8,
     "volume_error_ml": 2.0, "hd95_mm": 4.0},
    {"model": "tfm", "horizon": "0-90", "horizon_lo": 0, "horizon_hi": 90, "n": 4, "dice_whole": 0.9,
     "volume_error_ml": 1.0, "hd95_mm": 2.0},
    {"model": "tfm", "horizon": ">365", "horizon_lo": 365, "horizon_hi": None, "n": 2, "dice_whole": 0.5,
     "volume_error_ml": float("nan"), "hd95_mm": 9.0},
]


@pytest.mark.parametrize(
    ("nested", "flat"),
    [
        ({"a": 1}, {"a": 1}),
        ({"model": {"width": 8, "solver": {"method": "rk4"}}, "lr": 1e-3},
         {"model.width": 8, "model.solver.method": "rk4", "lr": 1e-3}),
        ({"crop": [32, 32, 32]}, {"crop": [32, 32, 32]}),
    ],
)
def test_flatten(nested: dict, flat: dict) -> None:
    assert flatten(nested) == flat


def test_metric_keys_are_valid_and_evaluation_rows_flatten() -> None:
    assert metric_key("test", "tfm", ">365", "dice_whole") == "test/tfm/gt365/dice_whole"
    m = evaluation_metrics(ROWS, "val")
    assert m["val/tfm/0-90/dice_whole"] == 0.9
    assert m["val/lci/0-90/n"] == 4
    assert "val/tfm/gt365/volume_error_ml" not in m  # NaN is not a metric
    assert "val/tfm/gt365/horizon_hi" not in m  # None is not a metric
    # Rows of a treatment stratum get their own keys; the "all" stratum keeps the plain ones.
    strata = [{**r, "stratum": s, "dice_whole": d} for r in ROWS[1:2] for s, d in (("all", 0.9), ("treated", 0.6),
                                                                                  ("untreated", 0.95))]
    m = evaluation_metrics(strata, "test")
    assert (m["test/tfm/0-90/dice_whole"], m["test/treated/tfm/0-90/dice_whole"],
            m["test/untreated/tfm/0-90/dice_whole"]) == (0.9, 0.6, 0.95)


def test_skill_table_known_answers() -> None:
    t = {(r["model"], r["horizon"], r["metric"]): r["skill"] for r in figures.skill_table(ROWS)}
    assert t[("tfm", "0-90", "dice_whole")] == pytest.approx(1 - 0.1 / 0.2)
    assert t[("tfm", "0-90", "volume_error_ml")] == pytest.approx(0.5)
    assert ("tfm", ">365", "dice_whole") not in t  # LCI has no row for that horizon


def test_logger_sqlite_default_under_home_and_nothing_in_cwd(tmp_path: Path, empty_cwd: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    assert settings.tracking_uri == f"sqlite:///{(tmp_path / 'home').resolve() / 'mlflow.db'}"
    tracking = uri.configure(settings)
    exp = uri.ensure_experiment(settings)
    client = MlflowClient(tracking)
    run_id = client.create_run(exp).info.run_id
    logger = MlflowLogger(run_id, tracking)
    assert isinstance(logger, MetricLogger)

    logger.log_params({"model": {"kind": "tfm", "width": 8}, "crop_size": [32, 32, 32]})
    logger.log_params({"model": {"kind": "tfm"}})  # a resumed run re-logs equal params: no error
    for step, loss in enumerate([1.0, 0.5, 0.25]):
        logger.log_metrics({"train/loss": loss}, step=step)
    logger.set_tags({"split_id": "abc", "store_hash": "123"})
    logger.log_table(ROWS, "test", prefix="test")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    logger.log_figure(fig, "line.png")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"a": 1}))
    logger.log_artifact(cfg)

    run = client.get_run(run_id)
    assert run.data.params["model.kind"] == "tfm"
    assert json.loads(run.data.params["crop_size"]) == [32, 32, 32]
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [1.0, 0.5, 0.25]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2]
    assert run.data.metrics["test/tfm/0-90/dice_whole"] == 0.9
    assert run.data.tags["split_id"] == "abc"
    names = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for d in ("evaluation", "figures") for a in client.list_artifacts(run_id, d)}
    assert {"config.json", "evaluation/test.csv", "evaluation/test.json", "figures/line.png"} <= names

    home = (tmp_path / "home").resolve()
    assert (home / "mlflow.db").is_file()
    assert run.info.artifact_uri.startswith((home / "mlartifacts").as_uri())
    assert list(empty_cwd.iterdir()) == []


def test_mlflow_tracking_uri_env_wins_over_the_default(
    tmp_path: Path, empty_cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "elsewhere" / "t.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    settings = Settings(home=tmp_path / "home")
    assert uri.configure(settings) == f"sqlite:///{other}"
    uri.ensure_experiment(settings)
    assert other.is_file()
    assert not (tmp_path / "home" / "mlflow.db").exists()
    assert list(empty_cwd.iterdir()) == []
