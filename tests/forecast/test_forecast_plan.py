"""Counterfactual plans ("what if we treat on date D?"): planned treatments are added to the recorded history for
one query, the patient is forecast under both histories with the same seed, and every surface (CLI, Python API,
JSON, plot, MLflow model) marks the forecast under the plan. ``fk`` is the model that applies treatments."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from forecasthelpers import KEY, Cohort, baseline_checkpoint
from PIL import Image
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.forecast import ForecastRequest, InvalidQueryError, Queries, forecast_patient
from longitudinal.predict.plan import PlannedTreatment

SAMPLES = 4


def _cli(cohort: Cohort, out: Path, *args: str, patient: str | None = None) -> object:
    return CliRunner().invoke(
        app, ["--home", str(cohort.settings.home), "forecast", patient or cohort.pids["sub-01"], "--store",
              cohort.store, "--model", "fk", "--samples", str(SAMPLES), "--out", str(out), *args],
        env={"LONGITUDINAL_PSEUDONYM_KEY": KEY, "LONGITUDINAL_MLFLOW_TRACKING_URI": cohort.settings.tracking_uri,
             "COLUMNS": "100"})


def _request(cohort: Cohort, queries: Queries, plan: tuple[PlannedTreatment, ...] = (), **kw: object) -> ForecastRequest:
    return ForecastRequest(cohort.pids["sub-01"], queries, store_url=cohort.store, model_ref="fk",
                           n_samples=SAMPLES, plan=plan, **kw)  # type: ignore[arg-type]


def _flat(text: str) -> str:
    return " ".join(text.split())  # the console wraps long lines


def test_planned_resection_shrinks_a_growing_tumour(cohort: Cohort, tmp_path: Path) -> None:
    # sub-01 grows (radius 5 -> 6.5 -> 8 mm) and is untreated; a resection 10 days after its latest scan
    # removes the enhancing core, so 60 days on the tumour is smaller than without it.
    plan = (PlannedTreatment("surgery", "+10"),)
    result = forecast_patient(cohort.settings, _request(cohort, Queries(in_days=(60.0,)), plan,
                                                         out_dir=tmp_path / "api"))
    (q,) = result.queries
    assert q.counterfactual is not None and result.counterfactual
    assert q.counterfactual.volume_whole_ml.median < q.volume_whole_ml.median, (q.volume_whole_ml,
                                                                                  q.counterfactual.volume_whole_ml)
    # The forecast under the recorded history is the one a query without a plan gets (same seed).
    plain = forecast_patient(cohort.settings, _request(cohort, Queries(in_days=(60.0,)), out_dir=tmp_path / "plain"))
    assert plain.queries[0].volume_whole_ml == q.volume_whole_ml
    body = plain.to_json()
    assert body["counterfactual"] is False and body["plan"] == [] and body["queries"][0]["counterfactual"] is None
    assert Image.open(plain.plot_path).text["Description"] == "no warnings"
    assert not list((tmp_path / "plain").glob("*_plan_*"))


def test_a_plan_after_the_query_changes_nothing(cohort: Cohort, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _cli(cohort, out, "--in", "30", "--plan", "radiotherapy@+60:+100", "--plan", "chemotherapy@+45")
    assert res.exit_code == 0, res.output
    body = json.loads(next(out.glob("*_forecast.json")).read_text())
    (q,) = body["queries"]
    cf = q["counterfactual"]
    for key in ("volume_whole_ml", "volume_enhancing_ml", "field_of_view", "n_context"):
        assert cf[key] == q[key], key
    assert set(cf["files"]) == set(q["files"])
    for kind, path in q["files"].items():
        assert "_plan_" in Path(cf["files"][kind]).name and "_plan_" not in Path(path).name
        np.testing.assert_array_equal(np.asarray(nib.load(cf["files"][kind]).dataobj),
                                      np.asarray(nib.load(path).dataobj), err_msg=kind)


def test_a_plan_before_the_latest_scan_is_refused(cohort: Cohort, tmp_path: Path) -> None:
    # The raw id with the site's key: dates are real; sub-01's latest scan is on 2024-08-07.
    res = _cli(cohort, tmp_path / "out", "--in", "30", "--plan", "surgery@2024-05-01", "--plan", "laser@+5",
               patient="sub-01")
    assert res.exit_code == 2, res.output
    text = _flat(res.output)
    assert "--plan 'surgery@2024-05-01': 2024-05-01 starts before the latest scan of 2024-08-07" in text, text
    assert "unknown treatment kind 'laser'; valid kinds: surgery, radiotherapy, chemotherapy" in text, text
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()
    with pytest.raises(InvalidQueryError, match="starts before the latest scan"):
        forecast_patient(cohort.settings, ForecastRequest(
            "sub-01", Queries(in_days=(30.0,)), store_url=cohort.store, model_ref="fk", n_samples=SAMPLES,
            plan=(PlannedTreatment("radiotherapy", "2024-08-01", "2024-09-10"),), write=False))
    res = _cli(cohort, tmp_path / "out", "--in", "30", "--plan", "surgery+10")
    assert res.exit_code == 2 and "not KIND@START[:END]" in _flat(res.output), res.output


def test_json_table_and_plot_mark_the_counterfactual(cohort: Cohort, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _cli(cohort, out, "--in", "20", "--in", "60", "--plan", "surgery@+10")
    assert res.exit_code == 0, res.output
    text = _flat(res.output)
    assert "counterfactual plan" in text and ": recorded history" in text and ": under the plan" in text, text
    body = json.loads(next(out.glob("*_forecast.json")).read_text())
    last = body["observed"][-1]
    assert body["counterfactual"] is True
    (event,) = body["plan"]
    assert event["kind"] == "surgery" and event["start_days"] == pytest.approx(last["days"] + 10)
    assert event["end_days"] == event["start_days"] and event["calendar"] == "shifted"
    assert event["start_date"] > last["date"]  # ISO dates order as strings
    assert all(q["counterfactual"]["days"] == q["days"] for q in body["queries"])
    assert all("_plan_" in Path(f).name for q in body["queries"] for f in q["counterfactual"]["files"].values())
    description = Image.open(body["plot"]).text["Description"]
    assert description.startswith(f"counterfactual: plan surgery day {event['start_days']:g}"), description
    assert event["start_date"] not in description  # the plot's metadata names days, never dates


def test_the_served_model_accepts_a_plan_and_refuses_a_malformed_one(cohort: Cohort, tmp_path: Path) -> None:
    from longitudinal.settings import Settings
    from longitudinal.tracking.served import ServedForecaster, output_columns

    patient = cohort.patients["sub-01"]
    frame = pd.DataFrame([{"patient_id": patient.raw_id, "date": d, "T1c": str(f["T1c"]), "FLAIR": str(f["FLAIR"]),
                           "label": str(f["label"])} for d, f in zip(patient.dates, patient.files, strict=True)])
    served = ServedForecaster(baseline_checkpoint(tmp_path / "fk.pt", "fk"))
    settings = Settings(home=tmp_path / "home", pseudonym_key=KEY)
    for plan, message in ((["surgery+10"], "not KIND@START"), ("surgery@+10", "must be a list of strings"),
                          ([3], "must be a list of strings"), (["laser@+10"], "valid kinds: surgery"),
                          (["surgery@+1:+2"], "a surgery is a single day")):
        with pytest.raises(ValueError, match=message):
            served.predict(frame, {"in_days": [60.0], "plan": plan}, settings)
    params = {"in_days": [60.0], "n_samples": SAMPLES, "plan": ["surgery@+10"]}
    out = served.predict(frame, params, settings)
    assert list(out.columns) == output_columns() and len(out) == 1
    row = out.iloc[0]
    assert row["plan_volume_whole_ml_median"] < row["volume_whole_ml_median"]
    assert row["plan_volume_whole_ml_lo95"] <= row["plan_volume_whole_ml_median"] <= row["plan_volume_whole_ml_hi95"]


def test_a_plan_can_change_what_serves_the_query(cohort: Cohort, tmp_path: Path) -> None:
    """A policy that serves lci with no treatment in the gap and the model after one: the recorded-history
    forecast is lci's, the forecast under a planned resection the model's, and the CLI says which served which."""
    import dataclasses

    from longitudinal.models.checkpoint import Checkpoint
    from longitudinal.predict.serving import ServingPolicy

    path = baseline_checkpoint(tmp_path / "linear.pt", "linear")
    policy = ServingPolicy((1000.0,), ("model", "model"),
                           by_stratum={"untreated": ("lci", "lci"), "treated": ("model", "model")})
    ckpt = Checkpoint.load(path)
    dataclasses.replace(ckpt, provenance={**ckpt.provenance, "serving": policy.to_meta()}).save(path)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["--home", str(cohort.settings.home), "forecast", cohort.pids["sub-01"], "--store", cohort.store,
              "--model", str(path), "--out", str(out), "--in", "30", "--plan", "surgery@+10"],
        env={"LONGITUDINAL_PSEUDONYM_KEY": KEY, "LONGITUDINAL_MLFLOW_TRACKING_URI": cohort.settings.tracking_uri,
             "COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    (q,) = json.loads(next(out.glob("*_forecast.json")).read_text())["queries"]
    assert q["served_by"] == "lci" and q["counterfactual"]["served_by"] == "model"
    text = _flat(res.output)
    assert "served by a simple baseline at +30 d: lci" in text, text
    assert "served under the plan" not in text, text
