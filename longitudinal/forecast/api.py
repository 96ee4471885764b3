"""``forecast_patient``: "patient X on date D" -> forecast images, tumour probability maps, volume intervals.

Steps (each failure is a ``ForecastError`` with every problem in one message, see ``errors.py``):

1. Open the store (read-only: no recovery is run by a query) and find the patient: its pseudonym, or -- when
   the site's pseudonym key is present -- its raw id, which is turned into the pseudonym and also lets calendar
   dates be read as real dates (``queries.py``). Scans given as files are ingested first (``scans.py``).
2. Resolve the queries to days since baseline. A query after the latest scan uses the latest scans as context;
   a retrospective query (between baseline and latest scan) uses only the scans before it, as evaluation does.
3. Load the model (``NAME@ALIAS``, ``NAME/VERSION``, ``models:/...``, ``runs:/...`` or a checkpoint path), cached
   per process so repeated calls skip the load. Check its channels and spacing against the store.
4. Per context set: the tumour-centred crop of the context scans (centre from the context labels only, as the
   data layer cuts it), the model's samples at the query times, per-sample whole/enhancing volumes (ml).
5. Outputs (``out_dir``, default ``Settings.forecasts_path/<patient>``): per query the mean forecast image per
   channel and the mean P(whole tumour) / P(enhancing) maps, pasted into the full reference grid (outside the
   crop: the last context scan's image and probability 0) and resampled into the NATIVE grid of the latest scan
   (or of ``native_session``) through its stored registration (``native.py``); ``<patient>_forecast.json``;
   ``<patient>_volumes.png``.

Intensities of the forecast images are those of the store (per channel normalised to [0, 1], ingest's
``normalise``), not the scanner's units.
"""

from __future__ import annotations

import difflib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from longitudinal.forecast.errors import (
    ForecastError,
    InvalidQueryError,
    ModelDataMismatchError,
    ModelNotFoundError,
    StoreUnreadableError,
    UnknownPatientError,
)
from longitudinal.forecast.queries import ResolvedQuery, patient_calendar, resolve_queries
from longitudinal.forecast.result import (
    ForecastResult,
    NativeSpace,
    ObservedScan,
    QueryForecast,
    VolumeInterval,
    interval_basis,
)
from longitudinal.settings import Settings

DEFAULT_ALIAS = "champion"
_SAME_DAY_DAYS = 1e-6  # query days are rounded to 6 decimals


# --- the model --------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A resolved, loaded forecaster.

    ref: the reference as given; name: what outputs call it (``NAME@ALIAS`` or the checkpoint file name);
    version: registry version (None for a file); kind: model kind; forecaster: the
    ``longitudinal.tracking.inference.Forecaster`` holding the torch model, channels, crop size, context size and
    intensity normalisation; spacing_mm: (z, y, x) voxel spacing the model was trained at.
    """

    ref: str
    name: str
    version: str | None
    kind: str | None
    forecaster: Any
    spacing_mm: tuple[float, float, float]

    @property
    def channels(self) -> list[str]:
        return list(self.forecaster.channels)


_MODELS: dict[tuple[str, int, str], Any] = {}


def load_model(settings: Settings, model_ref: str | None = None, device: str | None = None) -> LoadedModel:
    """Resolve ``model_ref`` (default ``<registered_model_name>@champion``) and load it (cached per checkpoint
    file and device). Raises ModelNotFoundError with the reason and what to do."""
    ref = model_ref or f"{settings.registered_model_name}@{DEFAULT_ALIAS}"
    from longitudinal.tracking.inference import Forecaster

    try:
        resolved = _resolve(ref, settings)
    except ValueError as exc:
        raise ModelNotFoundError(
            f"model {ref!r} not found: {exc}. Register one (`longitudinal train --track`), or pass --model "
            "NAME@ALIAS | NAME/VERSION | a checkpoint file; `longitudinal models list` shows the versions"
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
            _MODELS[key] = Forecaster(path, device=dev)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ModelNotFoundError(f"model {ref!r} ({path}) cannot be loaded: {exc}") from None
    forecaster = _MODELS[key]
    meta = resolved.metadata
    sp = forecaster.meta.get("spacing_mm") or [forecaster.spacing_mm] * 3
    name = ref if resolved.uri else path.name
    return LoadedModel(ref=ref, name=name, version=meta.get("version"),
                       kind=meta.get("kind") or forecaster.meta.get("kind"), forecaster=forecaster,
                       spacing_mm=tuple(float(s) for s in sp))  # type: ignore[arg-type]


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
def forecast_patient(
    settings: Settings,
    patient_id: str,
    store_url: str | None = None,
    query_days: Sequence[float] = (),
    model_ref: str | LoadedModel | None = None,
    n_samples: int = 32,
    out_dir: str | Path | None = None,
    *,
    dates: Sequence[str] = (),
    days_since_baseline: Sequence[float] = (),
    scans: Sequence[Any] = (),
    scans_csv: str | Path | None = None,
    seed: int = 0,
    write: bool = True,
    device: str | None = None,
    allow_raw_id: bool = True,
    native_session: str | None = None,
) -> ForecastResult:
    """Forecast one patient at the query times (module docstring for the steps and outputs).

    patient_id: the store's pseudonym (or a raw id, see ``resolve_patient``; with ``scans`` the patient's own
        id, pseudonymised by ingest). store_url: default ``settings.store_url``.
    query_days: days AFTER THE LATEST SCAN (the CLI's ``--in``). dates: calendar dates ``YYYY-MM-DD`` (``--at``;
        calendar in ``queries.py``). days_since_baseline: days since the baseline scan. At least one query.
    model_ref: a reference (default ``<registered_model_name>@champion``) or a ``LoadedModel`` from
        ``load_model`` (what a warm caller passes). n_samples: samples per query (>= 1). seed: sampling seed.
    scans / scans_csv: the patient's scans as files (``scans.py``) instead of a store.
    write: False computes the result without writing files. allow_raw_id: False accepts pseudonyms only
        (what the flow passes: no identifying data in its parameters).
    native_session: the stored session (name, e.g. ``ses-20240419``) whose native grid the output images are
        written on; default the latest scan. With a retrospective query at that session's own day
        (``days_since_baseline=[its days]``, context = the scans before it) the maps compare voxel by voxel with
        that session's own label as acquired (benchmarks/next_visit.py). Unknown names: InvalidQueryError.
    Raises a ForecastError subclass (``errors.py``) for every expected failure.
    """
    t0 = time.perf_counter()
    if int(n_samples) < 1:
        raise InvalidQueryError(f"--samples must be >= 1, got {n_samples}")
    if not (list(query_days) or list(dates) or list(days_since_baseline)):
        raise InvalidQueryError("no query: give at least one --at YYYY-MM-DD or --in DAYS")
    query = {"query_days": list(query_days), "dates": list(dates), "days_since_baseline": list(days_since_baseline)}
    common = {"n_samples": int(n_samples), "out_dir": out_dir, "seed": int(seed), "write": write,
              "native_session": native_session}
    if scans or scans_csv is not None:
        from longitudinal.forecast.scans import ingested, parse_scans

        inputs = parse_scans(scans, scans_csv)
        model = model_ref if isinstance(model_ref, LoadedModel) else load_model(settings, model_ref, device)
        # Ingest asks for exactly the model's channels, so a missing one quarantines its session (ScanInputError).
        with ingested(patient_id, inputs, settings, model.channels, float(np.mean(model.spacing_mm))) as (url, pid):
            result = _forecast(settings, open_store(url), pid, patient_id, model, query, **common)
    else:
        store = open_store(store_url or settings.store_url)
        pid, raw_id = resolve_patient(settings, store, patient_id, allow_raw_id)
        result = _forecast(settings, store, pid, raw_id, model_ref, query, device=device, **common)
    result.seconds = time.perf_counter() - t0
    return result


def _channel_problems(model: LoadedModel, channels: tuple[str, ...], spacing: Sequence[float] | None = None
                      ) -> list[str]:
    problems = []
    missing = [c for c in model.channels if c not in channels]
    if missing:
        problems.append(f"channel mismatch: model {model.name} needs channels {model.channels}, the data has "
                        f"{list(channels)} (missing {missing})")
    if spacing is not None and not np.allclose(np.asarray(spacing, float), np.asarray(model.spacing_mm), atol=1e-3):
        problems.append(f"spacing mismatch: model {model.name} was trained at {list(model.spacing_mm)} mm, the "
                        f"store grid is {list(spacing)} mm")
    return problems


def _forecast(settings: Settings, store: Any, pid: str, raw_id: str | None, model_ref: str | LoadedModel | None,
              query: dict[str, list], n_samples: int, out_dir: str | Path | None, seed: int, write: bool,
              device: str | None = None, native_session: str | None = None) -> ForecastResult:
    try:
        arr = store.arrays(pid)
        labels_all = np.asarray(arr.label[...], dtype=np.uint8)
    except ForecastError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StoreUnreadableError(f"cannot read patient {pid} from {store.url}: {type(exc).__name__}: {exc}") from None
    sessions = arr.sessions
    days = np.asarray(arr.days, dtype=np.float64)
    cal = patient_calendar(sessions[0].shifted_date, raw_id, settings.pseudonym_secret if raw_id else None)
    queries = resolve_queries(cal, float(days[-1]), query["query_days"], query["dates"], query["days_since_baseline"])
    names = [s.session for s in sessions]
    if native_session is not None and native_session not in names:
        raise InvalidQueryError(f"native_session {native_session!r} is not a session of {pid}; stored: {names}")
    model = model_ref if isinstance(model_ref, LoadedModel) else load_model(settings, model_ref, device)
    problems = _channel_problems(model, tuple(arr.channels), arr.spacing_mm)
    if problems:
        raise ModelDataMismatchError("; ".join(problems))

    voxel_ml = float(np.prod(arr.spacing_mm)) / 1000.0
    observed = [
        ObservedScan(s.session, float(d), cal.date_of(float(d)),
                     float((labels_all[t] > 0).sum()) * voxel_ml if s.has_label else None,
                     float((labels_all[t] == 2).sum()) * voxel_ml if s.has_label else None)
        for t, (s, d) in enumerate(zip(sessions, days, strict=True))
    ]
    preds = _predict(model, arr, labels_all, days, queries, n_samples, seed)

    latest = sessions[names.index(native_session) if native_session is not None else -1]
    shape_xyz, affine, to_ref, grid_kind = _output_geometry(arr, latest)
    native = NativeSpace(latest.session, shape_xyz, affine.tolist(), grid_kind)
    cals = model.forecaster.model.volume_calibration or {}
    result = ForecastResult(
        patient=pid, model=model.name, version=model.version, model_kind=model.kind, n_samples=n_samples, seed=seed,
        queries=[], observed=observed, native=native, channels=tuple(model.channels),
        intervals=interval_basis(cals, n_samples),
    )
    out = Path(out_dir) if out_dir is not None else settings.forecasts_path / pid
    writer = _Writer(arr, shape_xyz, affine, to_ref, model.channels, out, pid) if write else None
    for q, p in zip(queries, preds, strict=True):
        files = writer.write(q, p) if writer is not None else {}
        result.queries.append(QueryForecast(
            days=q.days, days_after_last_scan=round(q.days - float(days[-1]), 6), date=q.date,
            calendar=cal.calendar if q.date else None, n_context=p["n_context"],
            volume_whole_ml=VolumeInterval.from_samples(p["volumes"][:, 0], p["gap_days"], cals.get("whole"),
                                                        float(p["reference_ml"][0]), p["max_ml"]),
            volume_enhancing_ml=VolumeInterval.from_samples(p["volumes"][:, 1], p["gap_days"],
                                                            cals.get("enhancing"), float(p["reference_ml"][1]),
                                                            p["max_ml"]),
            files=files,
        ))
    if writer is not None:
        from longitudinal.forecast.plot import plot_volumes

        result.out_dir = out
        result.plot_path = plot_volumes(result, out / f"{pid}_volumes.png")
        result.summary_path = out / f"{pid}_forecast.json"
        _write_json_atomic(result.summary_path, result.to_json())
    return result


def _predict(model: LoadedModel, arr: Any, labels_all: np.ndarray, days: np.ndarray, queries: list[ResolvedQuery],
             n_samples: int, seed: int) -> list[dict[str, Any]]:
    """Per query: volumes (S, 2) ml, the linear baseline's (2,) and the crop's volume (ml), mean image
    (C, D, H, W), mean P(whole) and P(enhancing) (D, H, W) on the crop, the crop start (z, y, x) and the number
    of context scans. One model call per distinct context set."""
    import torch

    from longitudinal.data.crops import context_crop_centre, crop_start, read_crop, tumour_bbox
    from longitudinal.models.baselines import linear_volumes_ml

    fc_ = model.forecaster
    grid = tuple(int(n) for n in labels_all.shape[-3:])
    size = tuple(int(s) for s in (fc_.crop_size or [int(np.ceil(n / 16) * 16) for n in grid]))
    k_max = int(fc_.max_context or 3)
    ch_idx = [list(arr.channels).index(c) for c in model.channels]
    groups: dict[tuple[int, ...], list[int]] = {}
    for qi, q in enumerate(queries):
        # Query days are rounded to 1e-6 (queries.resolve_queries), which can lift a query at a scan's own day
        # just past it: a scan counts as "before" only when it is earlier by more than that rounding.
        before = [t for t in range(len(days)) if days[t] < q.days - _SAME_DAY_DAYS]
        groups.setdefault(tuple(before[-k_max:]), []).append(qi)
    out: list[dict[str, Any]] = [{} for _ in queries]
    voxel_ml = float(np.prod(arr.spacing_mm)) / 1000.0
    dev = fc_.device
    for ctx, qis in groups.items():
        idx = list(ctx)
        start = crop_start(context_crop_centre([tumour_bbox(labels_all[t]) for t in idx], grid), size)
        images = read_crop(arr.image, (idx, slice(None)), start, size).astype(np.float32)[:, ch_idx]
        labels = read_crop(labels_all, (idx,), start, size).astype(np.int64)
        scale = np.ones(images.shape[1], np.float32)
        if fc_.normalize == "context_mean":  # as longitudinal.data.dataset.build_sample
            nz = np.abs(images) > 0
            den = (images * nz).sum((0, 2, 3, 4)) / np.maximum(nz.sum((0, 2, 3, 4)), 1)
            scale = np.where(den > 0, den, 1.0).astype(np.float32)
            images = images / scale[None, :, None, None, None]
        qt = [queries[i].days for i in qis]
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        with torch.inference_mode():  # no autograd bookkeeping at all (no_grad still tracks versions)
            fc = fc_.model.sample(
                torch.from_numpy(images)[None].to(dev), torch.from_numpy(labels)[None].to(dev),
                torch.tensor(days[idx], dtype=torch.float32)[None].to(dev),
                torch.ones(1, len(idx), dtype=torch.bool, device=dev),
                torch.tensor(qt, dtype=torch.float32)[None].to(dev), n_samples=n_samples, generator=gen,
            )
            vols = sample_volumes_ml(fc.probs[0], voxel_ml)  # (Q, S, 2)
            # the linear baseline's volumes from the same context: a difficulty-scaled calibration needs them
            ref = linear_volumes_ml(torch.from_numpy(labels)[None], torch.tensor(days[idx], dtype=torch.float32)[None],
                                    torch.ones(1, len(idx), dtype=torch.bool),
                                    torch.tensor(qt, dtype=torch.float32)[None], voxel_ml)[0].numpy()  # (Q, 2)
            mean_img = fc.images[0].float().mean(1).cpu().numpy() * scale[None, :, None, None, None]
            p_whole = fc.whole_prob[0].float().mean(1).cpu().numpy()
            p_enh = fc.enhancing_prob[0].float().mean(1).cpu().numpy()
        for j, qi in enumerate(qis):
            out[qi] = {"volumes": vols[j], "gap_days": float(qt[j] - days[idx[-1]]), "reference_ml": ref[j],
                       "max_ml": float(np.prod(size)) * voxel_ml,
                       "image": mean_img[j],
                       "prob_whole": p_whole[j], "prob_enhancing": p_enh[j], "start": start, "n_context": len(idx),
                       "last_context": idx[-1]}
    return out


def sample_volumes_ml(probs: Any, voxel_ml: float) -> np.ndarray:
    """(whole, enhancing) volume in ml of every sample's hard mask: probs [Q, S, 3, D, H, W] -> (Q, S, 2) float64.

    Same masks as ``Forecast.masks`` (argmax over the classes, ties to the lower class), from two comparisons
    instead of an argmax over a non-contiguous axis, which is several times slower on CPU at S = 32.
    """
    p0, p1, p2 = probs[:, :, 0], probs[:, :, 1], probs[:, :, 2]
    whole = (p1.maximum(p2) > p0).flatten(2).sum(-1)
    enh = ((p2 > p0) & (p2 > p1)).flatten(2).sum(-1)
    counts = np.stack([whole.cpu().numpy(), enh.cpu().numpy()], axis=-1).astype(np.float64)
    return counts * float(voxel_ml)


def _output_geometry(arr: Any, latest: Any) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray, str]:
    """(shape (x, y, z), affine, transform to reference, "native") of the latest session; the reference grid
    (identity transform, "reference") only when the store lacks a usable native geometry for it."""
    try:
        shape = tuple(int(v) for v in latest.native_shape)
        affine = np.asarray(latest.native_affine, dtype=np.float64)
        to_ref = np.asarray(latest.transform_to_reference, dtype=np.float64)
        ok = (len(shape) == 3 and min(shape) > 0 and affine.shape == (4, 4) and to_ref.shape == (4, 4)
              and np.all(np.isfinite(affine)) and np.all(np.isfinite(to_ref)) and abs(np.linalg.det(affine)) > 0)
    except (TypeError, ValueError):
        ok = False
    if ok:
        return shape, affine, to_ref, "native"  # type: ignore[return-value]
    grid = tuple(int(v) for v in reversed(arr.label.shape[-3:]))
    return grid, np.asarray(arr.affine, dtype=np.float64), np.eye(4), "reference"  # type: ignore[return-value]


class _Writer:
    """Writes one query's maps into one session's native grid (module docstring, step 5)."""

    def __init__(self, arr: Any, shape_xyz: tuple[int, int, int], affine: np.ndarray, to_ref: np.ndarray,
                 channels: list[str], out: Path, pid: str) -> None:
        from longitudinal.forecast.native import NativeResampler

        grid = tuple(int(n) for n in arr.label.shape[-3:])
        self.resampler = NativeResampler(arr.affine, grid, affine, shape_xyz, to_ref)
        self.arr = arr
        self._context_images: dict[int, np.ndarray] = {}
        self.ch_store = [list(arr.channels).index(c) for c in channels]
        self.channels = channels
        self.grid = grid
        self.out = out
        self.pid = pid

    def write(self, q: ResolvedQuery, p: dict[str, Any]) -> dict[str, str]:
        from longitudinal.forecast.native import paste

        self.out.mkdir(parents=True, exist_ok=True)
        stem = f"{self.pid}_day{q.days:g}"
        files: dict[str, str] = {}
        # Outside the crop the forecast image is the last CONTEXT scan: a retrospective query must not show the
        # later scans it was not given (for a query after the latest scan this is the latest scan).
        last = int(p["last_context"])
        if last not in self._context_images:
            self._context_images[last] = np.asarray(self.arr.image[last], dtype=np.float32)  # (C, Z, Y, X)
        for ci, (ch, cs) in enumerate(zip(self.channels, self.ch_store, strict=True)):
            full = self._context_images[last][cs].copy()
            paste(full, p["image"][ci], p["start"])
            files[f"forecast_{ch}"] = str(self._save(full, f"{stem}_forecast_{ch}.nii.gz"))
        for kind in ("prob_whole", "prob_enhancing"):
            full = np.zeros(self.grid, np.float32)
            paste(full, p[kind].astype(np.float32), p["start"])
            files[kind] = str(self._save(full, f"{stem}_{kind}.nii.gz"))
        return files

    def _save(self, volume_zyx: np.ndarray, name: str) -> Path:
        data = self.resampler.to_native(volume_zyx)
        return self.resampler.save(data, self.out / name)


def _write_json_atomic(path: Path, body: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, indent=2))
    os.replace(tmp, path)
