"""The evaluation protocol: forecast every later scan of every patient from its earlier scans and
score each model beside ``lci`` and ``linear`` on exactly the same targets, per horizon bin. By default every
(earlier cut, later scan) pair is a target, so long horizons are scored even when visits are months apart.

Point forecast of a sampled model: the class probabilities averaged over samples, then argmax (its masks give
Dice, HD95 and the point volume) and the mean image (MSE, SSIM). Its per-sample whole-tumour volumes give the
80% / 95% interval coverage and the volume CRPS; its per-sample masks give the generalized energy distance.

Records (`EvaluationReport.records`): one dict per (model, target) with patient_id, target_idx,
last_context_idx, horizon_days = days_after_last_context (days from the last context scan to the target),
treated_gap (a treatment event lies in that gap: ``longitudinal.data.context.treatment_in_gap``) and the metrics.

Rows (`EvaluationReport.rows`, JSON list): model, stratum (``all`` here; ``aggregate(..., strata=...)`` and
``longitudinal.evaluation.strata`` add ``untreated`` / ``treated``), horizon (bin label), horizon_lo, horizon_hi
(days; null = open-ended), n, dice_whole, dice_enhancing, hd95_mm, hd95_undefined, volume_error_ml, volume_error_enh_ml,
mse, ssim, and for sampled models coverage80, coverage95, crps_ml, ged; plus skill columns
``skill_<metric>`` = 1 - err(model) / err(lci) with err = 1 - Dice for Dice and the metric itself otherwise
(mean over the bin; NaN when LCI's error is 0). Bins are [lo, hi) in days from the last context scan; the
extra bin ``all`` pools every target.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longitudinal.data.context import PatientSeries, read_box, treatment_in_gap
from longitudinal.data.dataset import EvalItem, enumerate_targets
from longitudinal.evaluation import metrics as M
from longitudinal.models.base import ForecastModel, build_model, closed_form_kinds
from longitudinal.models.calibration import STRATA, STRUCTURES, VolumeCalibration, select_calibration
from longitudinal.models.checkpoint import Checkpoint, DataSettings
from longitudinal.predict import Predictor, QueryPrediction

HORIZON_BINS: tuple[tuple[float, float], ...] = ((0, 90), (90, 180), (180, 365), (365, math.inf))
ALL_STRATUM = "all"  # every target, whatever its gap holds
BASELINES = ("lci", "linear")
# metric -> how it becomes an error for skill (None: not a skill column).
_SKILL: dict[str, Callable[[float], float]] = {
    "dice_whole": lambda v: 1 - v,
    "dice_enhancing": lambda v: 1 - v,
    "hd95_mm": lambda v: v,
    "volume_error_ml": lambda v: v,
    "mse": lambda v: v,
    "crps_ml": lambda v: v,
}
_MEAN_KEYS = ("dice_whole", "dice_enhancing", "hd95_mm", "volume_error_ml", "volume_error_enh_ml", "mse",
              "ssim", "coverage80", "coverage95", "crps_ml", "ged", "coverage80_raw", "coverage95_raw",
              "crps_raw_ml")


# The progress callback of every evaluation in a block (``evaluation_progress``), for callers that cannot pass
# ``progress`` down to each evaluation they start (the demo around ``run_training``).
_PROGRESS: ContextVar[Callable[[str], None] | None] = ContextVar("evaluation_progress", default=None)


@contextmanager
def evaluation_progress(callback: Callable[[str], None] | None) -> Iterator[None]:
    """Within the block, evaluations started without a ``progress`` callback report to ``callback``."""
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


@dataclass(frozen=True)
class EvalConfig:
    """crop_size / max_context / normalize / fov / fov_margin_mm: how bare models (not Predictors, which carry
    their checkpoint's settings) are applied (``DataSettings``). n_samples: draws for sampled models (deterministic models use 1). seed: the sampling
    seed (see ``longitudinal.predict.predictor``). device: "auto" picks CUDA when present."""

    crop_size: tuple[int, int, int] = (32, 32, 32)
    max_context: int = 3
    normalize: str = "none"
    fov: str = "adaptive"
    fov_margin_mm: float = 16.0
    n_samples: int = 8
    seed: int = 0
    device: str = "auto"
    pairs: str = "all"
    bins: tuple[tuple[float, float], ...] = HORIZON_BINS


@dataclass
class EvaluationReport:
    """records: one dict per (model, target); rows: per (model, horizon bin) of the ``all`` stratum (per
    treatment stratum: ``longitudinal.evaluation.strata.stratum_rows``); models in report order."""

    rows: list[dict[str, Any]]
    records: list[dict[str, Any]]
    models: list[str]
    n_targets: int
    patients: list[str] = field(default_factory=list)

    def to_json(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(self.rows), indent=2))
        return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def evenly_spaced(items: Sequence[Any], n: int) -> list[Any]:
    """At most ``n`` of ``items``, evenly spaced over the (deterministic) list, first and last included."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def bin_label(lo: float, hi: float) -> str:
    return f">{lo:g}" if math.isinf(hi) else f"{lo:g}-{hi:g}"


def score_target(pred: QueryPrediction, target_image: torch.Tensor, target_label: torch.Tensor,
                 brain: torch.Tensor, spacing_mm: Sequence[float], stochastic: bool,
                 calibration: Mapping[str, VolumeCalibration] | None = None) -> dict[str, float]:
    """Metrics for one target from one model's prediction of it (kept samples, see ``Predictor.predict``).

    target_image [C, D, H, W] (normalised like the model's inputs), target_label [D, H, W] (int), brain
    [D, H, W] bool, all on the prediction's crop grid; spacing_mm: that grid's voxel size (the store's times the
    crop's stride). Returns the per-target metric dict (volumes in ml, HD95 in mm).

    Interval metrics of a sampled model: ``coverage80`` / ``coverage95`` use the prediction's intervals (the
    model's calibration when it has one, else its raw samples' quantiles) and ``crps_ml`` the calibrated
    distribution (or the raw samples); ``*_raw`` always use the raw samples. The linear baseline's volume
    forecast is kept (``volume_linear_ml``, ``volume_enh_linear_ml``) so calibrations can be fitted from records.
    """
    assert pred.images is not None and pred.probs is not None, "predict(..., keep_samples=True)"
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    probs, images = pred.probs, pred.images
    lab = probs.mean(0).argmax(0)
    whole, enh = lab > 0, lab == 2
    t_whole, t_enh = target_label > 0, target_label == 2
    v_true = M.volume_ml(t_whole, voxel_ml)
    v_pred = M.volume_ml(whole, voxel_ml)
    mean_img = images.mean(0)
    rec = {
        "dice_whole": M.dice(whole, t_whole),
        "dice_enhancing": M.dice(enh, t_enh),
        "hd95_mm": M.hd95_mm(whole, t_whole, spacing_mm),
        "volume_true_ml": v_true,
        "volume_pred_ml": v_pred,
        "volume_error_ml": abs(v_pred - v_true),
        "volume_error_enh_ml": abs(M.volume_ml(enh, voxel_ml) - M.volume_ml(t_enh, voxel_ml)),
        "mse": M.masked_mse(mean_img, target_image, brain),
        "ssim": M.masked_ssim(mean_img, target_image, brain),
        # The volume intervals exactly as a forecast of this query serves them (ml).
        **{f"interval_{k}_ml": getattr(pred.whole, k) for k in ("median", "lo80", "hi80", "lo95", "hi95")},
        **{f"interval_enh_{k}_ml": getattr(pred.enhancing, k) for k in ("median", "lo80", "hi80", "lo95", "hi95")},
    }
    if stochastic:
        vols = torch.from_numpy(pred.volumes_ml[:, 0])
        rec["volume_enh_median_ml"] = float(np.median(pred.volumes_ml[:, 1]))
        rec["volume_median_ml"] = float(np.median(pred.volumes_ml[:, 0]))
        rec["volume_enh_true_ml"] = M.volume_ml(t_enh, voxel_ml)
        rec["coverage80_raw"] = float(M.interval_covers(vols, v_true, 0.8))
        rec["coverage95_raw"] = float(M.interval_covers(vols, v_true, 0.95))
        rec["crps_raw_ml"] = M.crps_samples(vols, v_true)
        rec["volume_linear_ml"] = float(pred.linear_ml[0])
        rec["volume_enh_linear_ml"] = float(pred.linear_ml[1])
        rec["coverage80"] = float(pred.whole.lo80 <= v_true <= pred.whole.hi80)
        rec["coverage95"] = float(pred.whole.lo95 <= v_true <= pred.whole.hi95)
        cal = (calibration or {}).get("whole")
        rec["crps_ml"] = rec["crps_raw_ml"] if cal is None else M.crps_samples(
            torch.from_numpy(cal.samples(rec["volume_median_ml"], pred.gap_days, rec["volume_linear_ml"])), v_true)
        rec["ged"] = M.generalized_energy_distance(probs.argmax(1) > 0, t_whole)
    return rec


def in_stratum(record: Mapping[str, Any], stratum: str) -> bool:
    """Whether a record belongs to ``stratum``: ``all``, or ``treated`` / ``untreated`` by its ``treated_gap``
    (a record without the flag belongs to ``all`` only)."""
    if stratum == ALL_STRATUM:
        return True
    if stratum not in STRATA:
        raise ValueError(f"stratum must be {ALL_STRATUM!r} or one of {STRATA}, got {stratum!r}")
    flag = record.get("treated_gap")
    return flag is not None and bool(flag) == (stratum == "treated")


def aggregate(records: Sequence[Mapping[str, Any]], models: Sequence[str],
              bins: Sequence[tuple[float, float]] = HORIZON_BINS,
              strata: Sequence[str] = (ALL_STRATUM,)) -> list[dict[str, Any]]:
    """Per (model, stratum, bin) means of the per-target records, plus skill against ``lci`` on the same targets
    (same stratum and bin). ``strata``: ``all`` (the default, the only rows of ``EvaluationReport.rows``) and
    any of ``untreated`` / ``treated``, in the order given."""
    rows: list[dict[str, Any]] = []
    # Columns per model come from all its records, so an empty bin or stratum still has every column (as NaN).
    model_keys = {m: {k for r in records if r["model"] == m for k in _MEAN_KEYS if k in r} for m in models}
    all_bins = [(bin_label(lo, hi), lo, hi) for lo, hi in bins] + [("all", 0.0, math.inf)]
    for stratum in strata:
        mine = [r for r in records if in_stratum(r, stratum)]
        rows.extend(_aggregate_stratum(mine, models, all_bins, model_keys, stratum))
    return rows


def _aggregate_stratum(records: Sequence[Mapping[str, Any]], models: Sequence[str],
                       all_bins: Sequence[tuple[str, float, float]], model_keys: Mapping[str, set[str]],
                       stratum: str) -> list[dict[str, Any]]:
    """The rows of ``aggregate`` for the records of one stratum."""
    rows: list[dict[str, Any]] = []
    for label, lo, hi in all_bins:
        in_bin = [r for r in records if lo <= r["horizon_days"] < hi]
        means: dict[str, dict[str, float]] = {}
        for model in models:
            rs = [r for r in in_bin if r["model"] == model]
            row: dict[str, Any] = {"model": model, "stratum": stratum, "horizon": label, "horizon_lo": float(lo),
                                   "horizon_hi": None if math.isinf(hi) else float(hi), "n": len(rs)}
            for key in _MEAN_KEYS:
                if key in model_keys[model]:
                    vals = [r[key] for r in rs if key in r and not math.isnan(r[key])]
                    row[key] = float(np.mean(vals)) if vals else float("nan")
            row["hd95_undefined"] = sum(1 for r in rs if math.isnan(r.get("hd95_mm", 0.0)))
            means[model] = row
            rows.append(row)
        ref = means.get("lci")
        for model in models:
            row = means[model]
            for key, to_err in _SKILL.items():
                if key not in row or ref is None or key not in ref:
                    continue
                err_m, err_ref = to_err(row[key]), to_err(ref[key])
                row[f"skill_{key}"] = (1 - err_m / err_ref) if (err_ref > 0 and not math.isnan(err_m)) \
                    else float("nan")
    return rows


def evaluate_models(
    models: Mapping[str, ForecastModel | Predictor],
    store_url: str,
    patient_ids: Sequence[str] | None = None,
    config: EvalConfig | None = None,
    progress: Callable[[str], None] | None = None,
    max_targets: int | None = None,
    baselines: bool = True,
    engine: Any = None,
) -> EvaluationReport:
    """Score ``models`` (name -> Predictor, or a bare model applied with ``config``'s crop, context size and
    normalisation) and the ``lci`` / ``linear`` baselines on every later scan of ``patient_ids`` (default: every
    patient of the store). Baselines are added when absent, so LCI is in every table and skill is always defined
    against it; ``baselines=False`` (calibration fitting only) leaves them out. ``max_targets`` keeps that many
    targets evenly spaced over the deterministic target list.

    ``engine``: a ``longitudinal.evaluation.distributed.DaskEngine`` to forecast the patients on, one task per
    patient (the same records in the same order as here; ``progress`` then reports finished patients). None:
    the engine entered by the caller (``with DaskEngine(...):``), else this process."""
    cfg = config or EvalConfig()
    progress = progress or _PROGRESS.get()
    predictors = predictors_for(models, cfg, baselines)
    k = max(p.data.max_context for p in predictors.values())
    items = enumerate_targets(store_url, patient_ids, k, cfg.pairs)  # type: ignore[arg-type]
    if max_targets is not None:
        items = evenly_spaced(items, max_targets)
    from longitudinal.evaluation.distributed import current_engine, evaluate_items_on_dask

    engine = engine if engine is not None else current_engine()
    if engine is not None:
        return evaluate_items_on_dask(engine, predictors, store_url, items, cfg, progress)
    from storage.store import CohortStore

    store = CohortStore.open(store_url)
    series = {pid: PatientSeries(store.arrays(pid)) for pid in sorted({it.patient_id for it in items})}
    return evaluate_items(predictors, series, items, cfg, progress)


def predictors_for(models: Mapping[str, ForecastModel | Predictor], cfg: EvalConfig, baselines: bool = True
                   ) -> dict[str, Predictor]:
    """Name -> Predictor: the given ones, bare models wrapped with ``cfg``'s settings, and (``baselines``) the
    ``lci`` and ``linear`` baselines first, with the settings of the first model given."""
    data = DataSettings(max_context=cfg.max_context, normalize=cfg.normalize, fov=cfg.fov,
                        fov_margin_mm=cfg.fov_margin_mm)
    wrapped = {name: m if isinstance(m, Predictor) else Predictor(m, cfg.crop_size, data, device=cfg.device)
               for name, m in models.items()}
    first = next(iter(wrapped.values()), None)
    out: dict[str, Predictor] = {}
    for kind in BASELINES if baselines else ():
        out[kind] = wrapped[kind] if kind in wrapped else (
            first.like(build_model(kind)) if first is not None else Predictor.baseline(kind, cfg.crop_size, data,
                                                                                        cfg.device))
    out.update({k: v for k, v in wrapped.items() if k not in out})
    return out


def evaluate_items(predictors: Mapping[str, Predictor], series: Mapping[str, PatientSeries],
                   items: Sequence[EvalItem], cfg: EvalConfig, progress: Callable[[str], None] | None = None
                   ) -> EvaluationReport:
    """Score every predictor on ``items`` (targets of the patients in ``series``). Targets that share a patient
    and a cut are forecast in one ``predict`` call, as a user's query with several dates is."""
    records: list[dict[str, Any]] = []
    done = 0
    for (pid, cut), its in group_targets(items).items():
        records.extend(score_group(predictors, series[pid], cut, its, cfg))
        done += len(its)
        if progress:
            progress(f"evaluated {done}/{len(items)} targets")
    names = list(predictors)
    return EvaluationReport(rows=aggregate(records, names, cfg.bins), records=records, models=names,
                            n_targets=len(items), patients=sorted({it.patient_id for it in items}))


def group_targets(items: Sequence[EvalItem]) -> dict[tuple[str, int], list[EvalItem]]:
    """Targets by (patient, cut = index of the first scan after the context), in order of first appearance:
    the order of the evaluation's records."""
    groups: dict[tuple[str, int], list[EvalItem]] = {}
    for it in items:
        groups.setdefault((it.patient_id, it.context_idx[-1] + 1), []).append(it)
    return groups


def score_group(predictors: Mapping[str, Predictor], series: PatientSeries, cut: int, items: Sequence[EvalItem],
                cfg: EvalConfig) -> list[dict[str, Any]]:
    """The records of one group of ``group_targets``: every predictor in order, each target in order."""
    records: list[dict[str, Any]] = []
    for name, pred in predictors.items():
        records.extend(_score_group(name, pred, series, cut, items, cfg))
    return records


def _score_group(name: str, predictor: Predictor, series: PatientSeries, cut: int, items: Sequence[EvalItem],
                 cfg: EvalConfig) -> list[dict[str, Any]]:
    """Forecast the targets ``items`` of one patient from its scans before ``cut`` and score each."""
    days = series.days
    prediction = predictor.predict(series.upto(cut), [float(days[it.target_idx]) for it in items],
                                   n_samples=cfg.n_samples, seed=cfg.seed, keep_samples=True)
    arr = series.arrays
    out = []
    for it, q in zip(items, prediction.queries, strict=True):
        ch = _channel_index(predictor, arr.channels)
        raw = torch.from_numpy(read_box(arr.image, (it.target_idx, slice(None)), q.crop).astype(np.float32)[ch])
        label = torch.from_numpy(read_box(arr.label, (it.target_idx,), q.crop, labels=True).astype(np.int64))
        brain = raw.abs().sum(0) > 0
        target = raw / torch.from_numpy(q.scale).view(-1, 1, 1, 1)
        # The stratum rule the Predictor applies to pick its calibration, so CRPS scores the served intervals.
        treated = treatment_in_gap(series.events, float(days[q.last_context]), q.days)
        cals = {s: c for s in STRUCTURES if (c := select_calibration(predictor.calibration, s, treated)) is not None}
        rec = score_target(q, target, label, brain, q.crop.spacing_mm(series.spacing_mm), predictor.stochastic,
                           cals)
        out.append({"model": name, "patient_id": it.patient_id, "target_idx": it.target_idx,
                    "last_context_idx": q.last_context, "n_context": q.n_context,
                    "horizon_days": q.gap_days, "days_after_last_context": q.gap_days, "treated_gap": treated,
                    **rec})
    return out


def _channel_index(predictor: Predictor, store_channels: Sequence[str]) -> list[int]:
    chans = list(store_channels)
    return [chans.index(c) for c in predictor.channels] if predictor.channels is not None else list(range(len(chans)))


def load_predictor(ref: str, device: str = "auto") -> tuple[str, Predictor]:
    """A predictor from a reference: a baseline kind name (``lci``, ``linear``) or a checkpoint path written by
    training. Returns (display name, predictor)."""
    from longitudinal.models.base import MODEL_KINDS

    if not Path(ref).exists():
        import longitudinal.models  # noqa: F401  (populates MODEL_KINDS)

        if ref in MODEL_KINDS:
            model = build_model(ref)
            if model.trainable:
                raise ValueError(f"model kind {ref!r} needs trained weights: pass a checkpoint path")
            return ref, Predictor(model, EvalConfig().crop_size, device=device)
        raise ValueError(f"model reference {ref!r} is neither a checkpoint file nor a kind that needs no weights "
                         f"({closed_form_kinds()})")
    ckpt = Checkpoint.load(Path(ref))
    return ckpt.kind, Predictor.from_checkpoint(ckpt, device)


def evaluate_ref(ref: str, store_url: str, patient_ids: Sequence[str] | None = None,
                 config: EvalConfig | None = None, progress: Callable[[str], None] | None = None,
                 n_samples: int = 8, engine: Any = None) -> EvaluationReport:
    """`evaluate_models` for one model reference (see `load_predictor`): its crop size, context size and
    normalisation come from the checkpoint; ``config`` sets the rest (``n_samples`` applies when it is None);
    ``engine`` as in `evaluate_models`."""
    name, predictor = load_predictor(ref, (config or EvalConfig()).device)
    return evaluate_models({name: predictor}, store_url, patient_ids, config or EvalConfig(n_samples=n_samples),
                           progress, engine=engine)
