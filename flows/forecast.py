"""Flow ``forecast-patient``: one patient at the query times -> native-space maps, volume intervals, plot.

Thin: one task calls ``longitudinal.forecast.forecast_patient``, the same function as the CLI twin
``longitudinal forecast PATIENT --in DAYS / --at DATE``.

De-identification: parameters are the patient's PSEUDONYM (raw ids are refused: ``allow_raw_id=False``), the
store URL, the queries, the model reference, the sample count and the output folder. Dates given here are read
in the store's shifted calendar (``longitudinal.forecast.queries``), so no real date enters a parameter. The
same holds for ``plan`` (``KIND@START[:END]``, ``longitudinal.predict.plan``): a counterfactual forecast under
planned treatments; the artifacts name planned events by days since baseline only.

Retries: only on I/O (OSError: the store or the registry could not be read); a bad query, an unknown patient
or a missing model is final (``ForecastError``), never retried.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.retries import retry_on_io

SUMMARY_KEY = "forecast-summary"
TABLE_KEY = "forecast-volumes"


@task(name="forecast", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_io)
def forecast_task(patient_id: str, store: str | None, in_days: list[float], at: list[str],
                  days_since_baseline: list[float], model_ref: str | None, n_samples: int, out_dir: str | None,
                  seed: int, plan: list[str] | None = None) -> dict[str, Any]:
    from longitudinal.forecast import ForecastRequest, Queries, forecast_patient
    from longitudinal.predict.plan import parse_plan
    from longitudinal.settings import Settings

    request = ForecastRequest(patient_id, Queries.of(in_days, at, days_since_baseline), store_url=store,
                              model_ref=model_ref, n_samples=n_samples, out_dir=out_dir, seed=seed,
                              allow_raw_id=False, plan=parse_plan(plan or []))
    result = forecast_patient(Settings(), request)
    body = result.to_json()
    body["out_dir"] = str(result.out_dir)
    body["summary_path"] = str(result.summary_path)
    body["plan_days"] = result.plan_description()
    return body


def _volume_row(q: dict[str, Any], history: str | None) -> dict[str, Any]:
    """One artifact table row: a query's volumes (days, the query's date); ``history``: which treatment history
    ("recorded" or "plan") it forecasts under, None without a plan."""
    w, e = q["volume_whole_ml"], q["volume_enhancing_ml"]
    return {"days": round(q["days"], 2), "date": q["date"] or "-", **({"history": history} if history else {}),
            "whole_ml_median": round(w["median"], 3), "whole_ml_80": f"{w['lo80']:.3f}-{w['hi80']:.3f}",
            "whole_ml_95": f"{w['lo95']:.3f}-{w['hi95']:.3f}", "enhancing_ml_median": round(e["median"], 3),
            "enhancing_ml_95": f"{e['lo95']:.3f}-{e['hi95']:.3f}"}


@flow(name="forecast-patient")
def forecast_patient(
    patient_id: str,
    store: str | None = None,
    in_days: list[float] | None = None,
    at: list[str] | None = None,
    days_since_baseline: list[float] | None = None,
    model_ref: str | None = None,
    n_samples: int = 32,
    out_dir: str | None = None,
    seed: int = 0,
    plan: list[str] | None = None,
) -> dict[str, Any]:
    """patient_id: pseudonym in the store. store: URL (default Settings().store_url). in_days: days after the
    latest scan; at: dates YYYY-MM-DD in the store's shifted calendar; days_since_baseline: days since the
    baseline scan. model_ref: default <registered name>@champion. out_dir: default forecasts/<patient>.
    plan: planned treatments KIND@START[:END] (START/END: shifted-calendar dates as ``at``, or +DAYS after the
    latest scan): every query is also forecast under the recorded history plus the plan."""
    body = forecast_task(patient_id, store, list(in_days or []), list(at or []),
                         list(days_since_baseline or []), model_ref, n_samples, out_dir, seed, list(plan or []))
    rows = []
    for q in body["queries"]:
        rows.append(_volume_row(q, "recorded" if body["counterfactual"] else None))
        if q.get("counterfactual"):
            rows.append(_volume_row(q["counterfactual"], "plan"))
    create_table_artifact(key=TABLE_KEY, table=rows, description=f"Forecast volumes of {body['patient']}")
    # Planned events by days since baseline only: the artifact is kept by the Prefect server.
    plan_row = f"| counterfactual plan | {body['plan_days']} |\n" if body["counterfactual"] else ""
    create_markdown_artifact(
        key=SUMMARY_KEY,
        markdown=(
            f"## forecast-patient\n\n| field | value |\n|---|---|\n| patient | `{body['patient']}` |\n"
            f"| model | `{body['model']}` v{body['version'] or '-'} ({body['model_kind']}) |\n"
            f"| samples | {body['n_samples']} |\n{plan_row}| files | `{body['out_dir']}` |\n"
            f"| summary | `{body['summary_path']}` |\n| plot | `{body['plot']}` |\n"
        ),
        description="Forecast outputs and where they are",
    )
    return body
