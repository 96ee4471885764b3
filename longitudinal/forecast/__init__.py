"""Forecast queries: "patient X on date D" -> forecast images and tumour probability maps in the patient's native
space, volume intervals, a JSON summary and a plot.

Public API::

    from longitudinal.forecast import ForecastRequest, Queries, forecast_patient
    request = ForecastRequest("p-0123456789ab", Queries(in_days=(90, 180)), store_url=store_url, n_samples=32)
    result = forecast_patient(settings, request)
    result.out_dir, result.summary_path, result.plot_path, result.queries[0].volume_whole_ml.median

``Queries(in_days=...)`` are days after the latest scan; ``at=("2027-03-01",)`` and ``days_since_baseline=(...)``
are the other query forms (calendars: ``longitudinal.predict.queries``). Errors: ``longitudinal.predict.errors``.
A counterfactual: ``ForecastRequest(..., plan=[PlannedTreatment("radiotherapy", "+14", "+56")])`` forecasts every
query under the recorded treatment history and under the history plus the plan.
"""

from longitudinal.forecast.api import (
    ForecastRequest,
    LoadedModel,
    forecast_patient,
    load_model,
    open_store,
    resolve_patient,
)
from longitudinal.predict.errors import (
    DateBeforeBaselineError,
    ForecastError,
    InvalidQueryError,
    ModelDataMismatchError,
    ModelNotFoundError,
    ScanInputError,
    StoreUnreadableError,
    UnknownPatientError,
)
from longitudinal.predict.plan import PlannedTreatment
from longitudinal.predict.queries import Queries
from longitudinal.predict.result import (
    QUANTILE_LEVELS,
    ForecastResult,
    NativeSpace,
    ObservedScan,
    QueryForecast,
    VolumeInterval,
)
from longitudinal.predict.scans import ScanInput, parse_scans

__all__ = [
    "QUANTILE_LEVELS",
    "DateBeforeBaselineError",
    "ForecastError",
    "ForecastRequest",
    "ForecastResult",
    "InvalidQueryError",
    "LoadedModel",
    "ModelDataMismatchError",
    "ModelNotFoundError",
    "NativeSpace",
    "ObservedScan",
    "PlannedTreatment",
    "Queries",
    "QueryForecast",
    "ScanInput",
    "ScanInputError",
    "StoreUnreadableError",
    "UnknownPatientError",
    "VolumeInterval",
    "forecast_patient",
    "load_model",
    "open_store",
    "parse_scans",
    "resolve_patient",
]
