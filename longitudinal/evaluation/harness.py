"""The evaluation protocol of DESIGN.md: forecast every later scan of every patient from its earlier scans and
score each model beside ``lci`` and ``linear`` on exactly the same targets, per horizon bin. By default every
(earlier cut, later scan) pair is a target, so long horizons are scored even when visits are months apart.

Point forecast of a sampled model: the class probabilities averaged over samples, then argmax (its masks give
Dice, HD95 and the point volume) and the mean image (MSE, SSIM). Its per-sample whole-tumour volumes give the
80% / 95% interval coverage and the volume CRPS; its per-sample masks give the generalized energy distance.

Rows (`EvaluationReport.rows`, JSON list): model, horizon (bin label), horizon_lo, horizon_hi (days; null =
open-ended), n, dice_whole, dice_enhancing, hd95_mm, hd95_undefined, volume_error_ml, volume_error_enh_ml,
mse, ssim, and for sampled models coverage80, coverage95, crps_ml, ged; plus skill columns
``skill_<metric>`` = 1 - err(model) / err(lci) with err = 1 - Dice for Dice and the metric itself otherwise
(mean over the bin; NaN when LCI's error is 0). Bins are [lo, hi) in days from the last context scan; the
extra bin ``all`` pools every target.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from longitudinal.data.dataset import DataConfig, EvalBatch, EvalDataset, collate_eval, enumerate_targets
from longitudinal.evaluation import metrics as M
from longitudinal.models.base import ForecastModel, build_model
from longitudinal.models.baselines import linear_volume_counts
from longitudinal.models.calibration import VolumeCalibration
from longitudinal.runtime import tune_cpu_allocator

HORIZON_BINS: tuple[tuple[float, float], ...] = ((0, 90), (90, 180), (180, 365), (365, math.inf))
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


@dataclass(frozen=True)
class EvalConfig:
    """crop_size / max_context / normalize must match what the model was trained with (training writes them
    into the checkpoint). n_samples: draws for sampled models (deterministic models use 1). device: "auto"
    picks CUDA when present."""

    crop_size: tuple[int, int, int] = (32, 32, 32)
    max_context: int = 3
    normalize: str = "none"
    n_samples: int = 8
    batch_size: int = 4
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    pairs: str = "all"
    bins: tuple[tuple[float, float], ...] = HORIZON_BINS


@dataclass
class EvaluationReport:
    """records: one dict per (model, target); rows: per (model, horizon bin); models in report order."""

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


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evenly_spaced(items: Sequence[Any], n: int) -> list[Any]:
    """At most ``n`` of ``items``, evenly spaced over the (deterministic) list, first and last included."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def bin_label(lo: float, hi: float) -> str:
    return f">{lo:g}" if math.isinf(hi) else f"{lo:g}-{hi:g}"


def score_target(
    images: torch.Tensor, probs: torch.Tensor, target_image: torch.Tensor, target_label: torch.Tensor,
    brain: torch.Tensor, spacing_mm: Sequence[float], voxel_volume_ml: float, stochastic: bool,
    horizon_days: float = 0.0, calibration: Mapping[str, VolumeCalibration] | None = None,
    reference_ml: tuple[float, float] | None = None,
) -> dict[str, float]:
    """Metrics for one target from one model's samples.

    images [S, C, D, H, W], probs [S, 3, D, H, W]; target_image [C, D, H, W], target_label [D, H, W] (int),
    brain [D, H, W] bool; horizon_days: gap from the last context scan to the target. Returns the per-target
    metric dict (volumes in ml, HD95 in mm).

    Interval metrics of a sampled model: ``coverage80`` / ``coverage95`` / ``crps_ml`` use the model's
    calibrated volume distribution when it has a ``calibration["whole"]`` (see
    ``longitudinal.models.calibration``), else its raw samples; ``*_raw`` always use the raw samples.
    reference_ml: the ``linear`` baseline's (whole, enhancing) volume forecast of the target (ml), which a
    difficulty-scaled calibration needs; kept in the record (``volume_linear_ml``, ``volume_enh_linear_ml``)
    so calibrations can be fitted from records."""
    mean_probs = probs.float().mean(0)
    lab = mean_probs.argmax(0)
    whole, enh = lab > 0, lab == 2
    t_whole, t_enh = target_label > 0, target_label == 2
    v_true = M.volume_ml(t_whole, voxel_volume_ml)
    v_pred = M.volume_ml(whole, voxel_volume_ml)
    mean_img = images.float().mean(0)
    rec = {
        "dice_whole": M.dice(whole, t_whole),
        "dice_enhancing": M.dice(enh, t_enh),
        "hd95_mm": M.hd95_mm(whole, t_whole, spacing_mm),
        "volume_true_ml": v_true,
        "volume_pred_ml": v_pred,
        "volume_error_ml": abs(v_pred - v_true),
        "volume_error_enh_ml": abs(M.volume_ml(enh, voxel_volume_ml) - M.volume_ml(t_enh, voxel_volume_ml)),
        "mse": M.masked_mse(mean_img, target_image, brain),
        "ssim": M.masked_ssim(mean_img, target_image, brain),
    }
    if stochastic:
        sample_lab = probs.float().argmax(1)  # [S, D, H, W]
        sample_whole = sample_lab > 0
        vols = sample_whole.flatten(1).sum(1).double() * voxel_volume_ml
        enh_vols = (sample_lab == 2).flatten(1).sum(1).double() * voxel_volume_ml
        rec["volume_median_ml"] = float(vols.quantile(0.5))
        rec["volume_enh_median_ml"] = float(enh_vols.quantile(0.5))
        rec["volume_enh_true_ml"] = M.volume_ml(t_enh, voxel_volume_ml)
        rec["coverage80_raw"] = float(M.interval_covers(vols, v_true, 0.8))
        rec["coverage95_raw"] = float(M.interval_covers(vols, v_true, 0.95))
        rec["crps_raw_ml"] = M.crps_samples(vols, v_true)
        ref = None
        if reference_ml is not None:
            ref = rec["volume_linear_ml"] = float(reference_ml[0])
            rec["volume_enh_linear_ml"] = float(reference_ml[1])
        cal = (calibration or {}).get("whole")
        if cal is None:
            rec["coverage80"], rec["coverage95"] = rec["coverage80_raw"], rec["coverage95_raw"]
            rec["crps_ml"] = rec["crps_raw_ml"]
        else:
            q = cal.quantiles(rec["volume_median_ml"], horizon_days, ref)
            rec["coverage80"] = float(q["lo80"] <= v_true <= q["hi80"])
            rec["coverage95"] = float(q["lo95"] <= v_true <= q["hi95"])
            rec["crps_ml"] = M.crps_samples(
                torch.from_numpy(cal.samples(rec["volume_median_ml"], horizon_days, ref)), v_true)
        rec["ged"] = M.generalized_energy_distance(sample_whole, t_whole)
    return rec


def aggregate(records: Sequence[Mapping[str, Any]], models: Sequence[str],
              bins: Sequence[tuple[float, float]] = HORIZON_BINS) -> list[dict[str, Any]]:
    """Per (model, bin) means of the per-target records, plus skill against ``lci`` on the same targets."""
    rows: list[dict[str, Any]] = []
    # Columns per model come from all its records, so an empty bin still has every column (as NaN).
    model_keys = {m: {k for r in records if r["model"] == m for k in _MEAN_KEYS if k in r} for m in models}
    all_bins = [(bin_label(lo, hi), lo, hi) for lo, hi in bins] + [("all", 0.0, math.inf)]
    for label, lo, hi in all_bins:
        in_bin = [r for r in records if lo <= r["horizon_days"] < hi]
        means: dict[str, dict[str, float]] = {}
        for model in models:
            rs = [r for r in in_bin if r["model"] == model]
            row: dict[str, Any] = {"model": model, "horizon": label, "horizon_lo": float(lo),
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


@torch.no_grad()
def evaluate_models(
    models: Mapping[str, ForecastModel],
    store_url: str,
    patient_ids: Sequence[str] | None = None,
    config: EvalConfig | None = None,
    progress: Callable[[str], None] | None = None,
    max_targets: int | None = None,
    baselines: bool = True,
) -> EvaluationReport:
    """Score ``models`` (name -> model) and the ``lci`` / ``linear`` baselines on every later scan of
    ``patient_ids`` (default: every patient of the store). Baselines are added when absent, so LCI is in every
    table and skill is always defined against it; ``baselines=False`` (calibration fitting only) leaves them
    out. ``max_targets`` keeps that many targets evenly spaced over the deterministic target list."""
    cfg = config or EvalConfig()
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    all_models: dict[str, ForecastModel] = {}
    for kind in BASELINES if baselines else ():
        all_models[kind] = models[kind] if kind in models else build_model(kind)
    all_models.update({k: v for k, v in models.items() if k not in all_models})
    for m in all_models.values():
        m.to(device).eval()
    items = enumerate_targets(store_url, patient_ids, cfg.max_context, cfg.pairs)  # type: ignore[arg-type]
    if max_targets is not None:
        items = evenly_spaced(items, max_targets)
    dcfg = DataConfig(crop_size=tuple(cfg.crop_size), max_context=cfg.max_context, n_queries=1, crop_jitter=0,
                      normalize=cfg.normalize, augment=None)  # type: ignore[arg-type]
    loader = DataLoader(EvalDataset(store_url, items, dcfg), batch_size=cfg.batch_size, shuffle=False,
                        num_workers=cfg.num_workers, collate_fn=collate_eval)
    records: list[dict[str, Any]] = []
    done = 0
    for eb in loader:
        records.extend(_score_batch(all_models, eb, cfg, device, done))
        done += len(eb.samples)
        if progress:
            progress(f"evaluated {done}/{len(items)} targets")
    names = list(all_models)
    return EvaluationReport(rows=aggregate(records, names, cfg.bins), records=records, models=names,
                            n_targets=len(items), patients=sorted({it.patient_id for it in items}))


def _score_batch(models: Mapping[str, ForecastModel], eb: EvalBatch, cfg: EvalConfig, device: torch.device,
                 offset: int) -> list[dict[str, Any]]:
    b = eb.batch.to(device)
    # The linear baseline's volume counts of every target: a difficulty-scaled calibration scales by them.
    lin_counts = linear_volume_counts(b.context_labels, b.context_times, b.context_mask, b.query_times).cpu()
    out = []
    for name, model in models.items():
        s = cfg.n_samples if model.stochastic else 1
        # One generator per (batch, model) seeded from the position: results do not depend on model order.
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + offset)
        fc = model.sample(b.context_images, b.context_labels, b.context_times, b.context_mask, b.query_times,
                          n_samples=s, generator=gen)
        images, probs = fc.images.float().cpu(), fc.probs.float().cpu()
        for i, smp in enumerate(eb.samples):
            horizon = float(smp.query_times[0] - smp.context_times[len(smp.context_idx) - 1])
            rec = score_target(images[i, 0], probs[i, 0], smp.target_images[0], smp.target_labels[0],
                               smp.brain_mask[0], smp.spacing_mm, smp.voxel_volume_ml, model.stochastic,
                               horizon, getattr(model, "volume_calibration", None),
                               tuple(float(c) * smp.voxel_volume_ml for c in lin_counts[i, 0]))
            last = max(smp.context_idx)
            out.append({"model": name, "patient_id": smp.patient_id, "target_idx": smp.target_idx[0],
                        "last_context_idx": last, "n_context": len(smp.context_idx),
                        "horizon_days": horizon, **rec})
    return out


def load_model_ref(ref: str, device: str = "cpu") -> tuple[str, ForecastModel, dict[str, Any]]:
    """A model from a reference: a baseline kind name (``lci``, ``linear``) or a checkpoint path written by
    training. Returns (display name, model in eval mode, checkpoint metadata incl. crop_size / max_context)."""
    from longitudinal.models.base import MODEL_KINDS
    from longitudinal.training.checkpoint import load_model_checkpoint

    if not Path(ref).exists():
        import longitudinal.models  # noqa: F401  (populates MODEL_KINDS)

        if ref in MODEL_KINDS:
            model = build_model(ref)
            if model.trainable:
                raise ValueError(f"model kind {ref!r} needs trained weights: pass a checkpoint path")
            return ref, model.eval(), {}
        raise ValueError(f"model reference {ref!r} is neither a checkpoint file nor a baseline kind "
                         f"(baselines: {list(BASELINES)})")
    model, meta = load_model_checkpoint(Path(ref), device=device)
    return meta.get("kind", model.kind), model.eval(), meta


def evaluate_ref(ref: str, store_url: str, patient_ids: Sequence[str] | None = None,
                 config: EvalConfig | None = None, progress: Callable[[str], None] | None = None,
                 n_samples: int = 8) -> EvaluationReport:
    """`evaluate_models` for one model reference (see `load_model_ref`); crop size, K and normalisation come
    from the checkpoint unless ``config`` is given (``n_samples`` applies only then)."""
    name, model, meta = load_model_ref(ref)
    if config is None:
        data = meta.get("data", {})
        config = EvalConfig(crop_size=tuple(meta.get("crop_size") or (32, 32, 32)),  # type: ignore[arg-type]
                            max_context=int(data.get("max_context", 3)),
                            normalize=str(data.get("normalize", "none")), n_samples=n_samples)
    return evaluate_models({name: model}, store_url, patient_ids, config, progress)
