"""Forecast queries: "patient X on date D" -> forecast images and tumour probability maps in the patient's native
space, volume intervals, a JSON summary and a plot.

Public API::

    from longitudinal.forecast import forecast_patient
    result = forecast_patient(settings, "p-0123456789ab", store_url, query_days=[90, 180], n_samples=32)
    result.out_dir, result.summary_path, result.plot_path, result.queries[0].volume_whole_ml.median

``query_days`` are days after the latest scan; ``dates=["2027-03-01"]`` and ``days_since_baseline=[...]`` are
the other query forms (calendars: ``longitudinal.forecast.queries``). Errors: ``longitudinal.forecast.errors``.
"""

from longitudinal.forecast.api import LoadedModel, forecast_patient, load_model, open_store, resolve_patient
from longitudinal.forecast.errors import (
    DateBeforeBaselineError,
    ForecastError,
    InvalidQueryError,
    ModelDataMismatchError,
    ModelNotFoundError,
    ScanInputError,
    StoreUnreadableError,
    UnknownPatientError,
)
from longitudinal.forecast.result import (
    QUANTILE_LEVELS,
    ForecastResult,
    NativeSpace,
    ObservedScan,
    QueryForecast,
    VolumeInterval,
)
from longitudinal.forecast.scans import ScanInput, parse_scans

__all__ = [
    "QUANTILE_LEVELS",
    "DateBeforeBaselineError",
    "ForecastError",
    "ForecastResult",
    "InvalidQueryError",
    "LoadedModel",
    "ModelDataMismatchError",
    "ModelNotFoundError",
    "NativeSpace",
    "ObservedScan",
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
