"""What the registered MLflow model does with a consumer's DataFrame: the same forecast as ``longitudinal forecast
--scan``, through ``longitudinal.predict.patient.forecast_scans``.

Input: one row per prior scan: ``patient_id``; ``date`` (``YYYY-MM-DD``, the real acquisition date) or ``days``
(days since that patient's first row; the scans are then dated from an arbitrary origin, so ``at`` queries need
``date``); one column per model channel (``T1c``, ``FLAIR``) holding a path or fsspec URI of the RAW native scan;
optional ``label``. Each patient's scans go through real ingest (de-identification with the site's pseudonym key
from the environment, validation, registration, QC) and the one Predictor.

Params (the same names as the CLI's options and ``longitudinal.forecast.Queries``): ``in_days`` (days after the
latest scan), ``at`` (dates), ``days_since_baseline``, ``n_samples``, ``seed``, ``out_dir`` (where the maps, JSON
and plot are written, as the CLI writes them; empty: nothing written), ``plan`` (a list of planned treatments
``KIND@START[:END]``, START/END real dates as ``at`` or ``+DAYS`` after the latest scan, as the CLI's ``--plan``):
a counterfactual forecast under the recorded history plus the plan.

Output: one row per (patient, query), columns ``output_columns()``; volumes in ml; ``warning`` says why a
forecast cannot be trusted (the tumour does not fit the model's field of view), empty when nothing is known
against it. ``volume_*`` columns: the forecast under the recorded treatment history; ``plan_volume_*``: the same
query under the history plus ``plan``, with the same seed (NaN without a plan).
"""

from __future__ import annotations

import datetime as dt
import math
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from longitudinal.models.calibration import LEVELS
from longitudinal.models.checkpoint import Checkpoint
from longitudinal.predict import Predictor
from longitudinal.predict.patient import ModelInfo, forecast_scans
from longitudinal.predict.plan import PLAN_SYNTAX, PlannedTreatment, parse_plan, plan_problems
from longitudinal.predict.queries import Queries, parse_date
from longitudinal.predict.result import QueryForecast
from longitudinal.predict.scans import LABEL, ScanInput
from longitudinal.settings import Settings

QUANTILES = {k: LEVELS[k] for k in ("median", "lo80", "hi80", "lo95", "hi95")}
VOLUME_KINDS = ("whole", "enhancing")
QUERY_PARAMS = ("in_days", "at", "days_since_baseline")
OUTPUT_COLUMNS = (
    ["patient_id", "pseudonym", "days_since_baseline", "days_after_last_scan", "date", "n_context", "n_samples"]
    + [f"volume_{k}_ml_{q}" for k in VOLUME_KINDS for q in QUANTILES]
    + ["summary_path", "warning"]
    + [f"plan_volume_{k}_ml_{q}" for k in VOLUME_KINDS for q in QUANTILES]
)
# Scans given by days only are dated from this origin (any date inside ingest's plausible window works).
DAYS_ORIGIN = dt.datetime(2000, 1, 1)


def output_columns() -> list[str]:
    """Columns of ``ServedForecaster.predict``'s DataFrame, in order."""
    return list(OUTPUT_COLUMNS)


def queries_from_params(params: Mapping[str, Any]) -> Queries:
    """The typed queries of the pyfunc's params; ValueError for the old ``query_days`` (which meant days since
    the first row) and for no query at all."""
    if "query_days" in params:
        raise ValueError("param 'query_days' is gone: use 'in_days' (days after the latest scan) or "
                         "'days_since_baseline'")
    q = Queries.of([float(v) for v in params.get("in_days") or []], [str(v) for v in params.get("at") or []],
                   [float(v) for v in params.get("days_since_baseline") or []])
    if not q:
        raise ValueError(f"no query: give one of the params {list(QUERY_PARAMS)}")
    return q


def plan_from_params(params: Mapping[str, Any]) -> tuple[PlannedTreatment, ...]:
    """The planned treatments of the pyfunc's ``plan`` param (absent or empty: none). ValueError for anything but
    a list of ``KIND@START[:END]`` strings, naming every malformed item."""
    value = params.get("plan")
    if value is None:
        return ()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"param 'plan' must be a list of strings {PLAN_SYNTAX}, got {value!r}")
    plan = parse_plan(list(value))
    problems = plan_problems(plan)  # before any scan is ingested
    if problems:
        raise ValueError("invalid plan: " + "; ".join(problems))
    return plan


def check_frame(frame: pd.DataFrame, channels: Sequence[str]) -> list[str]:
    """Every problem with a prediction input (empty when valid)."""
    problems = []
    if "date" not in frame.columns and "days" not in frame.columns:
        problems.append("need a 'date' (YYYY-MM-DD) or a 'days' column")
    missing = [c for c in ("patient_id", *channels) if c not in frame.columns]
    if missing:
        problems.append(f"missing columns {missing}; need patient_id, date or days, {', '.join(channels)} "
                        "(+ optional label)")
    if len(frame) == 0:
        problems.append("no rows")
    if "days" in frame.columns and "date" not in frame.columns:
        days = pd.to_numeric(frame["days"], errors="coerce")
        if days.isna().any() or not all(math.isfinite(float(v)) for v in days):
            problems.append("days must be finite numbers")
    return problems


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _local(uri: str, stack: ExitStack) -> Path:
    """A local path for ``uri`` (fsspec URLs are copied to a temporary file removed with ``stack``)."""
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    import fsspec

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="served-scan-")))
    dest = tmp / Path(uri).name
    with fsspec.open(uri, "rb") as src, dest.open("wb") as dst:
        dst.write(src.read())
    return dest


def scans_of(rows: pd.DataFrame, channels: Sequence[str], stack: ExitStack) -> list[ScanInput]:
    """One patient's rows -> ScanInputs with dates (``date`` as given, else ``DAYS_ORIGIN + days``)."""
    out = []
    for _, r in rows.iterrows():
        if "date" in rows.columns and not _blank(r["date"]):
            date = str(r["date"])
        else:
            date = (DAYS_ORIGIN + dt.timedelta(days=float(r["days"]))).isoformat(timespec="seconds")
        for ch in channels:
            out.append(ScanInput(date, ch, _local(str(r[ch]), stack)))
        if "label" in rows.columns and not _blank(r["label"]):
            out.append(ScanInput(date, LABEL, _local(str(r["label"]), stack)))
    return out


class ServedForecaster:
    """A checkpoint served to registry consumers. ``device`` defaults to CUDA when present."""

    def __init__(self, checkpoint: Path | str, device: str | None = None, kind_name: str | None = None) -> None:
        ckpt = Checkpoint.load(Path(checkpoint))
        self.predictor = Predictor.from_checkpoint(ckpt, device or "auto")
        self.info = ModelInfo(kind_name or ckpt.kind, None, ckpt.kind)
        self.channels = list(ckpt.channels)

    def predict(self, frame: pd.DataFrame, params: Mapping[str, Any] | None = None,
                settings: Settings | None = None) -> pd.DataFrame:
        """One row per (patient_id, query) (module docstring). Raises ValueError listing every input problem and
        ``longitudinal.predict.errors.ForecastError`` for scans that cannot be ingested or bad queries."""
        params = dict(params or {})
        problems = check_frame(frame, self.channels)
        n_samples = int(params.get("n_samples") or 8)
        if n_samples < 1:
            problems.append(f"n_samples must be >= 1, got {n_samples}")
        try:
            queries = queries_from_params(params)
        except ValueError as exc:
            problems.append(str(exc))
        try:
            plan = plan_from_params(params)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("invalid forecast input: " + "; ".join(problems))
        if (queries.at or any(parse_date(d) for p in plan for d in (p.start, p.end) if d)) \
                and "date" not in frame.columns:
            raise ValueError("invalid forecast input: 'at' and 'plan' dates need a 'date' column (the scans' real "
                             "dates); plan with +DAYS after the latest scan instead")
        settings = settings or Settings()
        out_dir = Path(params["out_dir"]) if params.get("out_dir") else None
        rows = []
        for raw_id, group in frame.groupby("patient_id", sort=True):
            with ExitStack() as stack:
                scans = scans_of(group, self.channels, stack)
                result = forecast_scans(settings, self.predictor, self.info, str(raw_id), scans, queries,
                                        n_samples, int(params.get("seed") or 0),
                                        out_dir / str(_pseudonym(settings, str(raw_id))) if out_dir else None,
                                        plan)
            for q in result.queries:
                row: dict[str, Any] = {
                    "patient_id": raw_id, "pseudonym": result.patient, "days_since_baseline": q.days,
                    "days_after_last_scan": q.days_after_last_scan, "date": q.date, "n_context": q.n_context,
                    "n_samples": result.n_samples,
                    "summary_path": str(result.summary_path) if result.summary_path else None,
                    # why the forecast cannot be trusted (the tumour does not fit the model's field of view)
                    "warning": "; ".join(_warnings(q)) or None,
                }
                for prefix, f in (("", q), ("plan_", q.counterfactual)):
                    for kind in VOLUME_KINDS:
                        iv = getattr(f, f"volume_{kind}_ml") if f is not None else None
                        for name in QUANTILES:
                            row[f"{prefix}volume_{kind}_ml_{name}"] = getattr(iv, name) if iv else math.nan
                rows.append(row)
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def _warnings(q: QueryForecast) -> list[str]:
    """Why a query's forecasts cannot be trusted, the one under the plan marked so."""
    cf = q.counterfactual
    return q.warnings() + ([f"under the plan: {w}" for w in cf.warnings()] if cf is not None else [])


def _pseudonym(settings: Settings, raw_id: str) -> str:
    from longitudinal.ingest.deid import pseudonym

    return pseudonym(raw_id, settings.pseudonym_secret)
