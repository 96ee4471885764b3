"""The forecast of one stored patient: queries resolved, the Predictor applied, files written.

``longitudinal.forecast.forecast_patient`` (CLI, flow, demo) and the MLflow model (``longitudinal.tracking``)
both end here, so both give the same volumes and write the same files for the same scans, query and seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from longitudinal.data.context import PatientSeries
from longitudinal.predict.errors import InvalidQueryError, ModelDataMismatchError, StoreUnreadableError
from longitudinal.predict.output import ForecastWriter, output_geometry, write_summary
from longitudinal.predict.plan import PlannedEvent, PlannedTreatment, resolve_plan
from longitudinal.predict.predictor import Predictor, QueryPrediction
from longitudinal.predict.queries import PatientCalendar, Queries, ResolvedQuery
from longitudinal.predict.result import (
    ForecastResult,
    NativeSpace,
    ObservedScan,
    QueryForecast,
    interval_basis,
)


@dataclass(frozen=True)
class ModelInfo:
    """How outputs name the model: ``name`` (``NAME@ALIAS`` or a file name), registry ``version`` (None for a
    file) and ``kind``."""

    name: str
    version: str | None
    kind: str | None


def forecast_stored(
    predictor: Predictor,
    model: ModelInfo,
    arrays: Any,
    calendar: PatientCalendar,
    queries: Queries,
    n_samples: int,
    seed: int = 0,
    out_dir: Path | None = None,
    native_session: str | None = None,
    plan: Sequence[PlannedTreatment] = (),
) -> ForecastResult:
    """Forecast the stored patient ``arrays`` (``storage.store.PatientArrays``) at ``queries``.

    calendar: how dates map to days for this patient (``queries.patient_calendar``). out_dir: where the maps, the
    JSON and the plot go (None: nothing is written). native_session: the session whose native grid the maps are
    written on (default the latest). plan: planned treatments (``predict.plan``); with one, every query is also
    forecast under the recorded history plus the plan, with the same seed, so the two differ by the plan only
    (``QueryForecast.counterfactual``). Raises InvalidQueryError / ModelDataMismatchError / StoreUnreadableError.
    """
    pid = str(arrays.patient_id)
    try:
        labels_all = np.asarray(arrays.label[...], dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear message
        raise StoreUnreadableError(f"cannot read patient {pid}: {type(exc).__name__}: {exc}") from None
    sessions = arrays.sessions
    days = np.asarray(arrays.days, dtype=np.float64)
    resolved, events = _resolve(queries, plan, calendar, float(days[-1]))
    names = [s.session for s in sessions]
    if native_session is not None and native_session not in names:
        raise InvalidQueryError(f"native_session {native_session!r} is not a session of {pid}; stored: {names}")
    problems = predictor.channel_problems(tuple(arrays.channels), arrays.spacing_mm)
    if problems:
        raise ModelDataMismatchError(f"model {model.name}: " + "; ".join(problems))

    voxel_ml = float(np.prod(arrays.spacing_mm)) / 1000.0
    observed = [
        ObservedScan(s.session, float(d), calendar.date_of(float(d)),
                     float((labels_all[t] > 0).sum()) * voxel_ml if s.has_label else None,
                     float((labels_all[t] == 2).sum()) * voxel_ml if s.has_label else None)
        for t, (s, d) in enumerate(zip(sessions, days, strict=True))
    ]
    series = PatientSeries(_WithLabels(arrays, labels_all))
    try:
        prediction = predictor.predict(series, [q.days for q in resolved], n_samples, seed)
        # The same seed: the sampling noise depends on the seed and the context only, so the two forecasts
        # differ by the plan alone.
        planned = predictor.predict(series.with_plan([e.event for e in events]), [q.days for q in resolved],
                                    n_samples, seed) if events else None
    except ValueError as exc:
        raise InvalidQueryError(str(exc)) from None

    out_session = sessions[names.index(native_session) if native_session is not None else -1]
    shape_xyz, affine, _to_ref, grid_kind = output_geometry(arrays, out_session)
    channels = list(predictor.channels or arrays.channels)
    result = ForecastResult(
        patient=pid, model=model.name, version=model.version, model_kind=model.kind,
        n_samples=prediction.n_samples, seed=seed, queries=[], observed=observed,
        native=NativeSpace(out_session.session, shape_xyz, affine.tolist(), grid_kind), channels=tuple(channels),
        intervals=interval_basis(predictor.calibration, prediction.n_samples), plan=list(events),
    )
    writer = ForecastWriter(arrays, out_session, channels, out_dir, pid) if out_dir is not None else None
    under_plan = planned.queries if planned is not None else [None] * len(resolved)
    for r, p, c in zip(resolved, prediction.queries, under_plan, strict=True):
        q = _query(r, p, float(days[-1]), calendar, writer)
        result.queries.append(q if c is None else replace(q, counterfactual=_query(r, c, float(days[-1]),
                                                                                    calendar, writer, plan=True)))
    if out_dir is not None:
        write_summary(result, out_dir)
    return result


def _resolve(queries: Queries, plan: Sequence[PlannedTreatment], calendar: PatientCalendar,
             last_day: float) -> tuple[list[ResolvedQuery], list[PlannedEvent]]:
    """The queries and the plan in days since baseline; the problems of both in one InvalidQueryError."""
    problems: list[InvalidQueryError] = []
    resolved: list[ResolvedQuery] = []
    events: list[PlannedEvent] = []
    try:
        resolved = queries.resolve(calendar, last_day)
    except InvalidQueryError as exc:
        problems.append(exc)
    try:
        events = resolve_plan(plan, calendar, last_day)
    except InvalidQueryError as exc:
        problems.append(exc)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise InvalidQueryError("; ".join(str(p) for p in problems))
    return resolved, events


def _query(r: ResolvedQuery, p: QueryPrediction, last_day: float, calendar: PatientCalendar,
           writer: ForecastWriter | None, plan: bool = False) -> QueryForecast:
    """One query's result (its files written when ``writer`` is given; ``plan``: the forecast under a plan)."""
    return QueryForecast(
        days=r.days, days_after_last_scan=round(r.days - last_day, 6), date=r.date,
        calendar=calendar.calendar if r.date else None, n_context=p.n_context,
        volume_whole_ml=p.whole, volume_enhancing_ml=p.enhancing,
        files=writer.write(p, plan=plan) if writer is not None else {}, field_of_view=p.field_of_view,
        served_by=p.served_by, interval_calibration=p.calibration,
    )


class _WithLabels:
    """The patient's arrays with the labels already in memory (read once for the observed volumes)."""

    def __init__(self, arrays: Any, labels: np.ndarray) -> None:
        self._arrays, self.label = arrays, labels

    def __getattr__(self, name: str) -> Any:
        return getattr(self._arrays, name)


def forecast_scans(
    settings: Any,
    predictor: Predictor,
    model: ModelInfo,
    raw_id: str,
    scans: Any,
    queries: Queries,
    n_samples: int,
    seed: int = 0,
    out_dir: Path | None = None,
    plan: Sequence[PlannedTreatment] = (),
) -> ForecastResult:
    """Forecast a patient given as files (``scans.ScanInput`` list with real dates): ingested exactly as ingest
    does it (de-identification with ``settings``' pseudonym key, validation, registration, QC) into a temporary
    store, then ``forecast_stored`` in the real calendar (``plan``'s dates too). ``out_dir`` None (or "default")
    writes nothing / to ``settings.forecasts_path/<pseudonym>``. Raises ScanInputError listing every quarantined
    session."""
    from longitudinal.predict.queries import patient_calendar
    from longitudinal.predict.scans import ingested

    spacing = float(np.mean(predictor.spacing_mm)) if predictor.spacing_mm else float(settings.target_spacing_mm)
    channels = list(predictor.channels) if predictor.channels else ["T1c", "FLAIR"]
    with ingested(raw_id, scans, settings, channels, spacing) as (url, pid):
        from storage.store import CohortStore

        arrays = CohortStore.open(url, recover=False).arrays(pid)
        calendar = patient_calendar(arrays.sessions[0].shifted_date, raw_id, settings.pseudonym_secret)
        out = settings.forecasts_path / pid if out_dir == "default" else out_dir
        return forecast_stored(predictor, model, arrays, calendar, queries, n_samples, seed, out, plan=plan)


@dataclass
class Trajectory:
    """A stored patient forecast from all but its last scan over a grid of days (the run figures).

    observed_days / observed_ml: every scan's day and whole-tumour volume (ml); query_days: the grid (days since
    baseline, ending past the last scan); intervals: whole-tumour VolumeInterval per grid day; target_day: the
    last scan's day. The montage at the grid day nearest it, on the forecast's crop (D, H, W), store
    intensities of the first model channel: context_image (last context scan), truth_image (the last scan),
    forecast_image (mean forecast) and forecast_prob (mean P(whole tumour)).
    """

    patient_id: str
    observed_days: list[float]
    observed_ml: list[float]
    query_days: list[float]
    intervals: list[Any]
    target_day: float
    context_image: np.ndarray
    truth_image: np.ndarray
    forecast_image: np.ndarray
    forecast_prob: np.ndarray


def trajectory(predictor: Predictor, series: PatientSeries, n_samples: int, horizon_days: float = 180.0,
               n_grid: int = 8) -> Trajectory | None:
    """The figure data of one patient (``Trajectory``); None when it has fewer than 2 scans."""
    from longitudinal.data.context import read_box

    days = series.days
    if len(days) < 2:
        return None
    last = float(days[-1])
    grid = np.unique(np.concatenate([np.linspace(days[-2] + 1, last + horizon_days, n_grid), [last]]))
    pred = predictor.predict(series.upto(len(days) - 1), grid.tolist(), n_samples=n_samples, seed=0)
    arr, voxel_ml = series.arrays, series.voxel_ml
    q = pred.queries[int(np.argmin(np.abs(grid - last)))]
    ch = list(arr.channels).index(predictor.channels[0]) if predictor.channels else 0
    return Trajectory(
        patient_id=series.patient_id, observed_days=days.tolist(),
        observed_ml=[float((np.asarray(arr.label[t]) > 0).sum() * voxel_ml) for t in range(len(days))],
        query_days=grid.tolist(), intervals=[p.whole for p in pred.queries], target_day=last,
        context_image=read_box(arr.image, (q.last_context, ch), q.crop),
        truth_image=read_box(arr.image, (len(days) - 1, ch), q.crop),
        forecast_image=q.mean_image[0], forecast_prob=q.prob_whole,
    )
