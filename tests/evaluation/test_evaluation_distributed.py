"""Evaluation, calibration and batch forecasts on a local 2-worker Dask cluster (processes): the same records in
the same order and the same table as the serial path, to float tolerance (torch's thread count may move the
last bits of a convolution); progress reported per finished patient; predictors rebuilt from their weights."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from longitudinal.data.phantoms import make_phantom_store
from longitudinal.evaluation.calibration import fit_volume_calibration
from longitudinal.evaluation.distributed import DaskEngine, PredictorSpec, current_engine, forecast_patients
from longitudinal.evaluation.harness import EvalConfig, evaluate_models
from longitudinal.models.base import build_model
from longitudinal.predict import Predictor

CFG = EvalConfig(crop_size=(16, 16, 16), max_context=2, n_samples=2, device="cpu")
TINY_TFM = {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 16, "steps": 2}
TOL = {"rel": 1e-4, "abs": 1e-5}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_phantom_store(str(tmp_path_factory.mktemp("dist") / "c.zarr"), n_patients=3, seed=5,
                              grid=(24, 24, 24), n_times=(3, 3), gap_days=(40.0, 400.0))


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = build_model("tfm", TINY_TFM, in_channels=2)
    return Predictor(model, CFG.crop_size, channels=("T1c", "FLAIR"), spacing_mm=(2.0, 2.0, 2.0), device="cpu")


@pytest.fixture(scope="module")
def engine() -> Any:
    """One cluster for the module's tests, open but not entered: the serial calls here stay serial."""
    eng = DaskEngine(workers=2)
    eng.client()
    try:
        yield eng
    finally:
        eng.close()


def _same_values(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, float) and math.isnan(va):
            assert isinstance(vb, float) and math.isnan(vb), key
        elif isinstance(va, float):
            assert vb == pytest.approx(va, **TOL), key
        else:
            assert vb == va, key


def test_dask_evaluation_gives_the_serial_table(cohort: Any, predictor: Predictor, engine: DaskEngine) -> None:
    serial = evaluate_models({"tfm": predictor}, cohort.url, config=CFG)
    lines: list[str] = []
    dist = evaluate_models({"tfm": predictor}, cohort.url, config=CFG, progress=lines.append, engine=engine)
    assert dist.models == serial.models == ["lci", "linear", "tfm"]
    assert dist.n_targets == serial.n_targets and dist.patients == serial.patients
    # Records in the serial order: (patient, cut) groups, every model per group.
    assert [(r["model"], r["patient_id"], r["target_idx"]) for r in dist.records] == \
        [(r["model"], r["patient_id"], r["target_idx"]) for r in serial.records]
    for a, b in zip(serial.records, dist.records, strict=True):
        _same_values(a, b)
    assert len(dist.rows) == len(serial.rows)
    for a, b in zip(serial.rows, dist.rows, strict=True):
        _same_values(a, b)
    # One progress line per finished patient, the last one with every target.
    assert len(lines) == len(cohort.patients)
    assert lines[-1].startswith(f"evaluated {len(cohort.patients)}/{len(cohort.patients)} patients "
                                f"({serial.n_targets}/{serial.n_targets} targets")


def test_entered_engine_runs_the_calibration(cohort: Any, predictor: Predictor, engine: DaskEngine) -> None:
    ids = sorted(cohort.patients)
    serial = fit_volume_calibration(predictor, cohort.url, ids, CFG)
    assert current_engine() is None
    with engine:  # as `longitudinal calibrate --workers N` and a tracked run do: the default of the harness
        assert current_engine() is engine
        dist = fit_volume_calibration(predictor, cohort.url, ids, CFG)
    assert current_engine() is None
    for structure in ("whole", "enhancing"):
        a, b = serial[structure].to_dict(), dist[structure].to_dict()
        assert a.keys() == b.keys()
        assert np.allclose(np.asarray(b["scores"]), np.asarray(a["scores"]), rtol=1e-4, atol=1e-6)
        assert b["n_patients"] == a["n_patients"] and b["edges_days"] == a["edges_days"]


def test_batch_forecasts_match_serial(cohort: Any, predictor: Predictor, engine: DaskEngine) -> None:
    ids = sorted(cohort.patients)[::-1]
    serial = forecast_patients(predictor, cohort.url, ids, [90.0, 180.0], n_samples=3, seed=1)
    lines: list[str] = []
    dist = forecast_patients(predictor, cohort.url, ids, [90.0, 180.0], n_samples=3, seed=1, engine=engine,
                             progress=lines.append)
    assert list(dist) == list(serial) == ids and len(lines) == len(ids)
    for pid in ids:
        for qa, qb in zip(serial[pid].queries, dist[pid].queries, strict=True):
            assert qb.days == qa.days and qb.context == qa.context
            assert np.allclose(qb.volumes_ml, qa.volumes_ml)
            assert np.allclose(qb.mean_image, qa.mean_image, rtol=1e-4, atol=1e-5)
            assert qb.whole.median == pytest.approx(qa.whole.median)


def test_predictor_spec_rebuilds_the_same_forecaster(predictor: Predictor) -> None:
    spec = PredictorSpec.of(predictor)
    assert all(t.device.type == "cpu" for t in spec.state_dict.values()) and spec.device == "cpu"
    rebuilt = spec.build()
    assert (rebuilt.kind, rebuilt.crop_size, rebuilt.channels, rebuilt.spacing_mm, rebuilt.data) == \
        (predictor.kind, predictor.crop_size, predictor.channels, predictor.spacing_mm, predictor.data)
    for key, value in predictor.model.state_dict().items():
        assert torch.equal(rebuilt.model.state_dict()[key], value)


def test_engine_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="tcp://"):
        DaskEngine(address="scheduler:8786")
    with pytest.raises(ValueError, match="at least 1"):
        DaskEngine(workers=0)
    assert "local Dask cluster of 3 worker processes" in DaskEngine(workers=3).describe()


def test_evaluate_cli_on_the_cluster_prints_the_serial_table(cohort: Any, engine: DaskEngine, tmp_path: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`longitudinal evaluate --dask-address` (the module's cluster) writes the rows of the serial command and
    prints a line per finished patient; `--workers N` with `--dask-address` is refused."""
    import json

    from typer.testing import CliRunner

    from longitudinal.cli import app

    monkeypatch.setenv("LONGITUDINAL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LONGITUDINAL_DASK_ADDRESS", raising=False)
    runner = CliRunner()
    address = engine.client().scheduler.address
    rows = {}
    for mode, extra in (("serial", []), ("dask", ["--dask-address", address])):
        res = runner.invoke(app, ["evaluate", "--store", cohort.url, "--model", "linear",
                                  "--json", str(tmp_path / f"{mode}.json"), *extra])
        assert res.exit_code == 0, res.output
        rows[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
        assert (f"evaluated {len(cohort.patients)}/{len(cohort.patients)} patients" in res.output) == (mode == "dask")
    assert len(rows["dask"]) == len(rows["serial"])
    for a, b in zip(rows["serial"], rows["dask"], strict=True):
        _same_values({k: v for k, v in a.items() if v is not None}, {k: v for k, v in b.items() if v is not None})
    res = runner.invoke(app, ["evaluate", "--store", cohort.url, "--model", "linear", "--workers", "2",
                              "--dask-address", address])
    assert res.exit_code != 0 and "--dask-address" in res.output
