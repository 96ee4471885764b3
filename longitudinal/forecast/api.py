"""``forecast_patient``: "patient X on date D" -> forecast images, tumour probability maps, volume intervals.

Steps (each failure is a ``ForecastError`` with every problem in one message, see ``predict/errors.py``):

1. Open the store (read-only: no recovery is run by a query) and find the patient: its pseudonym, or -- when
   the site's pseudonym key is present -- its raw id, which is turned into the pseudonym and also lets calendar
   dates be read as real dates (``predict/queries.py``). Scans given as files are ingested first
   (``predict/scans.py``).
2. Load the model (``NAME@ALIAS``, ``NAME/VERSION``, ``models:/...``, ``runs:/...`` or a checkpoint path), cached
   per process so repeated calls skip the load.
3. ``longitudinal.predict.patient.forecast_stored``: the queries resolved to days since baseline, the one
   ``Predictor`` applied (context, crop, normalisation, samples, volumes, calibrated intervals), and the files
   written by the one writer (``predict/output.py``): per query the mean forecast image per channel and the mean
   P(whole tumour) / P(enhancing) maps in the NATIVE grid of the latest scan (or of ``native_session``),
   ``<patient>_forecast.json`` and ``<patient>_volumes.png``. With a treatment plan (``predict/plan.py``) every
   query is also forecast under the recorded history plus the plan, same seed: a counterfactual forecast.

Intensities of the forecast images are those of the store (per channel normalised to [0, 1], ingest's
``normalise``), not the scanner's units.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longitudinal.predict.errors import (
    InvalidQueryError,
    ModelNotFoundError,
    StoreUnreadableError,
    UnknownPatientError,
)
from longitudinal.predict.patient import ModelInfo, forecast_scans, forecast_stored
from longitudinal.predict.plan import PlannedTreatment, parse_plan
from longitudinal.predict.queries import Queries, patient_calendar
from longitudinal.predict.result import ForecastResult
from longitudinal.settings import Settings

DEFAULT_ALIAS = "champion"


# --- the model --------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A resolved, loaded forecaster.

    ref: the reference as given; name: what outputs call it (``NAME@ALIAS`` or the checkpoint file name);
    version: registry version (None for a file); kind: model kind; predictor: the ``longitudinal.predict``
    Predictor (model, channels, crop size, context size, normalisation, spacing).
    """

    ref: str
    name: str
    version: str | None
    kind: str | None
    predictor: Any

    @property
    def channels(self) -> list[str]:
        return list(self.predictor.channels or ())

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(self.predictor.spacing_mm or (0.0, 0.0, 0.0))  # type: ignore[return-value]

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.version, self.kind)


_MODELS: dict[tuple[str, int, str], Any] = {}


def load_model(settings: Settings, model_ref: str | None = None, device: str | None = None) -> LoadedModel:
    """Resolve ``model_ref`` (default ``<registered_model_name>@champion``) and load it (cached per checkpoint
    file and device). Raises ModelNotFoundError with the reason and what to do."""
    from longitudinal.models.checkpoint import Checkpoint
    from longitudinal.predict import Predictor

    ref = model_ref or f"{settings.registered_model_name}@{DEFAULT_ALIAS}"
    from longitudinal.models.base import closed_form_kinds

    if ref in closed_form_kinds():  # lci, linear, fk: applied with the default crop, nothing to load
        key = (ref, 0, device or "cpu")
        if key not in _MODELS:
            _MODELS[key] = Predictor.baseline(ref, (32, 32, 32), device=device or "cpu")
        return LoadedModel(ref=ref, name=ref, version=None, kind=ref, predictor=_MODELS[key])
    try:
        resolved = _resolve(ref, settings)
    except ValueError as exc:
        raise ModelNotFoundError(
            f"model {ref!r} not found: {exc}. " + (_no_champion_hint(settings, ref) or (
                "Register one (`longitudinal train`), or pass --model NAME@ALIAS | NAME/VERSION | a checkpoint "
                "file; `longitudinal models list` shows the versions"))
        ) from None
    except Exception as exc:  # noqa: BLE001 - registry unreachable or broken: still a clear message
        raise ModelNotFoundError(
            f"cannot resolve model {ref!r} at {settings.tracking_uri}: {type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    dev = device or "cpu"
    path = Path(resolved.checkpoint)
    key = (str(path), path.stat().st_mtime_ns, dev)
    if key not in _MODELS:
        try:
            _MODELS[key] = Predictor.from_checkpoint(Checkpoint.load(path), dev)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ModelNotFoundError(f"model {ref!r} ({path}) cannot be loaded: {exc}") from None
    predictor = _MODELS[key]
    meta = resolved.metadata
    name = ref if resolved.uri else path.name
    return LoadedModel(ref=ref, name=name, version=meta.get("version"), kind=meta.get("kind") or predictor.kind,
                       predictor=predictor)


def _no_champion_hint(settings: Settings, ref: str) -> str:
    """When the default ``NAME@champion`` is missing but versions of NAME exist: say so and which to use."""
    name = settings.registered_model_name
    if ref != f"{name}@{DEFAULT_ALIAS}":
        return ""
    try:
        from longitudinal.tracking.registry import list_versions

        versions = [v.version for v in list_versions(settings, name)]
    except Exception:  # noqa: BLE001 - only a hint; the error itself says what failed
        return ""
    if not versions:
        return ""
    return (f"The registry holds {name} version(s) {', '.join(sorted(versions, key=int))}, but the promotion gate "
            f"made none of them champion (`longitudinal models list` shows why): forecast with one of them, e.g. "
            f"--model {name}/{max(versions, key=int)}, or train a better model (`longitudinal train --steps 600`)")


def _resolve(ref: str, settings: Settings) -> Any:
    """``resolve_model_ref``, except that a checkpoint file is taken as is: the registry module imports mlflow,
    which costs seconds of a cold start that a local file does not need."""
    local = Path(ref).expanduser()
    if local.is_file():
        from types import SimpleNamespace

        return SimpleNamespace(checkpoint=local.resolve(), uri=None, metadata={"source": "local"})
    from longitudinal.tracking.registry import resolve_model_ref

    return resolve_model_ref(ref, settings)


# --- the store and the patient ----------------------------------------------------------------------------
def open_store(url: str) -> Any:
    """Open a cohort store for reading (no recovery). Raises StoreUnreadableError."""
    from storage.store import CohortStore

    try:
        return CohortStore.open(url, recover=False)
    except FileNotFoundError:
        raise StoreUnreadableError(f"no cohort store at {url} (ingest one with `longitudinal ingest`)") from None
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear message
        raise StoreUnreadableError(f"cannot read cohort store at {url}: {type(exc).__name__}: {exc}") from None


def _has_key(settings: Settings) -> bool:
    # Only an existing key can turn a raw id into a stored pseudonym; never create one from a query.
    return bool(settings.pseudonym_key) or settings.pseudonym_key_path.is_file()


def resolve_patient(settings: Settings, store: Any, patient: str, allow_raw_id: bool = True) -> tuple[str, str | None]:
    """(pseudonym in the store, raw id or None). A raw id is accepted when ``allow_raw_id`` and the site's key
    maps it onto a stored pseudonym. Raises UnknownPatientError with the closest stored ids."""
    try:
        ids = store.patient_ids()
    except Exception as exc:  # noqa: BLE001
        raise StoreUnreadableError(f"cannot list patients of {store.url}: {type(exc).__name__}: {exc}") from None
    if patient in ids:
        return patient, None
    if allow_raw_id and _has_key(settings):
        from longitudinal.ingest.deid import pseudonym

        # BIDS sources key patients by the subject label without its "sub-" prefix; accept both spellings.
        for raw in (patient, patient[4:]) if patient.startswith("sub-") else (patient,):
            pid = pseudonym(raw, settings.pseudonym_secret)
            if pid in ids:
                return pid, raw
    close = difflib.get_close_matches(patient, ids, n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else f"; the store holds {len(ids)} patients"
    raise UnknownPatientError(f"unknown patient {patient!r} in {store.url}{hint}", close)


# --- the query ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForecastRequest:
    """One forecast query.

    patient: the store's pseudonym (or a raw id, see ``resolve_patient``; with ``scans`` the patient's own id,
        pseudonymised by ingest). queries: the query times (``Queries``: ``in_days`` after the latest scan,
        calendar dates ``at``, ``days_since_baseline``). store_url: default ``settings.store_url``.
    model_ref: a reference (default ``<registered_model_name>@champion``) or a ``LoadedModel`` from
        ``load_model`` (what a warm caller passes). n_samples: samples per query (>= 1). seed: sampling seed.
    out_dir: default ``settings.forecasts_path/<patient>``; write: False computes without writing files.
    scans / scans_csv: the patient's scans as files (``predict/scans.py``) instead of a store.
    allow_raw_id: False accepts pseudonyms only (what the flow passes: no identifying data in its parameters).
    native_session: the stored session (e.g. ``ses-20240419``) whose native grid the output images are written
        on; default the latest scan. With a retrospective query at that session's own day the maps compare voxel
        by voxel with that session's own label as acquired.
    plan: planned treatments for a counterfactual forecast ("what if we treat on date D?"):
        ``PlannedTreatment(kind, start, end)`` with start / end ``YYYY-MM-DD`` in the same calendar as ``at`` or
        ``+N`` days after the latest scan (``predict/plan.py``; ``KIND@START[:END]`` strings are read the same
        way). Every query is then forecast under the recorded history and under the history plus the plan.
    """

    patient: str
    queries: Queries
    store_url: str | None = None
    model_ref: str | LoadedModel | None = None
    n_samples: int = 32
    seed: int = 0
    out_dir: str | Path | None = None
    write: bool = True
    device: str | None = None
    allow_raw_id: bool = True
    native_session: str | None = None
    scans: Sequence[Any] = field(default_factory=tuple)
    scans_csv: str | Path | None = None
    plan: Sequence[PlannedTreatment] = ()


def forecast_patient(settings: Settings, request: ForecastRequest) -> ForecastResult:
    """Forecast one patient at the request's query times (module docstring for the steps and outputs).

    Raises a ForecastError subclass (``predict/errors.py``) for every expected failure.
    """
    t0 = time.perf_counter()
    if int(request.n_samples) < 1:
        raise InvalidQueryError(f"--samples must be >= 1, got {request.n_samples}")
    if not request.queries:
        raise InvalidQueryError("no query: give at least one --at YYYY-MM-DD or --in DAYS")
    plan = parse_plan(request.plan)
    if request.scans or request.scans_csv is not None:
        from longitudinal.predict.scans import parse_scans

        inputs = parse_scans(request.scans, request.scans_csv)
        model = _model(settings, request)
        # Ingest asks for exactly the model's channels, so a missing one quarantines its session (ScanInputError).
        out = (Path(request.out_dir) if request.out_dir is not None else "default") if request.write else None
        result = forecast_scans(settings, model.predictor, model.info, request.patient, inputs, request.queries,
                                int(request.n_samples), int(request.seed), out, plan)  # type: ignore[arg-type]
    else:
        store = open_store(request.store_url or settings.store_url)
        pid, raw_id = resolve_patient(settings, store, request.patient, request.allow_raw_id)
        result = _forecast(settings, store, pid, raw_id, _model(settings, request), request, plan)
    result.seconds = time.perf_counter() - t0
    return result


def _model(settings: Settings, request: ForecastRequest) -> LoadedModel:
    ref = request.model_ref
    return ref if isinstance(ref, LoadedModel) else load_model(settings, ref, request.device)


def _forecast(settings: Settings, store: Any, pid: str, raw_id: str | None, model: LoadedModel,
              request: ForecastRequest, plan: Sequence[PlannedTreatment]) -> ForecastResult:
    try:
        arrays = store.arrays(pid)
    except Exception as exc:  # noqa: BLE001
        raise StoreUnreadableError(f"cannot read patient {pid} from {store.url}: {type(exc).__name__}: {exc}") from None
    calendar = patient_calendar(arrays.sessions[0].shifted_date, raw_id,
                                settings.pseudonym_secret if raw_id else None)
    out = None
    if request.write:
        out = Path(request.out_dir) if request.out_dir is not None else settings.forecasts_path / pid
    return forecast_stored(model.predictor, model.info, arrays, calendar, request.queries, int(request.n_samples),
                           int(request.seed), out, request.native_session, plan)
