"""Validation during training and the end-of-training volume calibration, both through the evaluation harness
(and so through the one Predictor)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from longitudinal.data.dataset import enumerate_targets
from longitudinal.data.splits import Split
from longitudinal.models.base import ForecastModel
from longitudinal.models.calibration import MIN_PER_STRATUM, VolumeCalibration
from longitudinal.models.checkpoint import Checkpoint
from longitudinal.training.config import TrainConfig

if TYPE_CHECKING:
    from longitudinal.evaluation.harness import EvalConfig
    from longitudinal.evaluation.strata import StratifiedCalibration


@dataclass
class ValidationSet:
    """Validation targets (at most ``val_targets``, evenly spaced) with their patients read into memory once."""

    series: dict[str, Any]
    items: list[Any]

    def __bool__(self) -> bool:
        return bool(self.items)


def validation_set(cfg: TrainConfig, store_url: str, split: Split) -> ValidationSet:
    """The deterministic validation targets, their patients' arrays kept in memory for every evaluation."""
    if not split.val or cfg.val_targets == 0:
        return ValidationSet({}, [])
    from dataclasses import replace

    from longitudinal.data.context import PatientSeries
    from longitudinal.evaluation.harness import evenly_spaced
    from storage.store import CohortStore

    items = evenly_spaced(enumerate_targets(store_url, split.val, cfg.max_context, pairs="all"), cfg.val_targets)
    store = CohortStore.open(store_url)
    series = {}
    for pid in sorted({it.patient_id for it in items}):
        arr = store.arrays(pid)
        series[pid] = PatientSeries(replace(arr, image=np.asarray(arr.image[:]), label=np.asarray(arr.label[:])))
    return ValidationSet(series, items)


def validate(models: dict[str, ForecastModel], val: ValidationSet, cfg: TrainConfig, device: torch.device
             ) -> dict[str, dict[str, float]]:
    """Pooled validation metrics per model name: dice_whole, dice_enhancing, volume_error_ml, hd95_mm, mse
    (the evaluation harness on the validation targets, through the one Predictor)."""
    from longitudinal.evaluation.harness import EvalConfig, aggregate, evaluate_items, predictors_for

    ecfg = EvalConfig(crop_size=tuple(cfg.crop_size), max_context=cfg.max_context,  # type: ignore[arg-type]
                      normalize=cfg.normalize, fov=cfg.fov, fov_margin_mm=cfg.fov_margin_mm,
                      n_samples=cfg.val_samples, seed=cfg.seed, device=str(device))
    report = evaluate_items(predictors_for(models, ecfg, baselines=False), val.series, val.items, ecfg)
    rows = [r for r in aggregate(report.records, list(models)) if r["horizon"] == "all"]
    keys = ("dice_whole", "dice_enhancing", "volume_error_ml", "hd95_mm", "mse")
    return {r["model"]: {k: float(r[k]) for k in keys if k in r} for r in rows}


def calibrate_checkpoint(path: Path, store_url: str, patient_ids: list[str], config: TrainConfig,
                         device: torch.device, say: Callable[[str], None] = lambda _m: None,
                         ) -> dict[str, VolumeCalibration]:
    """Fit the volume-interval calibration of the model checkpoint at ``path`` on ``patient_ids`` (the
    validation split) and write it into the checkpoint's ``meta["volume_calibration"]`` (atomically): the pooled
    ``"whole"`` / ``"enhancing"`` calibrations, plus ``"<structure>:<stratum>"`` for each treatment stratum with
    at least ``MIN_PER_STRATUM`` validation targets (``longitudinal.evaluation.strata``; ``say`` names every
    stratum left to the pooled one). A checkpoint already calibrated at its step with the same settings is left
    as it is."""
    from longitudinal.evaluation.strata import fit_stratified_calibration

    ckpt = Checkpoint.load(path)
    # "form" names the score layout, so checkpoints calibrated by an older form are fitted again.
    form = (f"per-horizon-scaled-c{config.calib_difficulty_ml:g}" if config.calib_form == "scaled"
            else "per-horizon-symmetric-v2")
    key = {"step": ckpt.provenance.get("step"), "samples": config.calib_samples, "targets": config.calib_targets,
           "patients": sorted(patient_ids), "form": form,
           # Checkpoints calibrated before the per-stratum fit (pooled keys only) are fitted again.
           "strata": f"treated-gap-min{MIN_PER_STRATUM}",
           # The intervals are fitted on the served forecasts: a new serving choice needs a new calibration.
           "serving": _served_sources(ckpt.provenance.get("serving"))}
    if ckpt.calibration and ckpt.provenance.get("volume_calibration_fit") == key:
        return dict(ckpt.calibration)
    t = time.perf_counter()
    memo = json.dumps([weights_digest(ckpt), key, store_url, config.seed, config.calib_difficulty_ml])
    reused = memo in _FITTED
    if reused:
        fitted = _FITTED[memo]
    else:
        say(f"calibrating the volume intervals of {path.name} on the validation patients")
        fitted = fit_stratified_calibration(ckpt, store_url, patient_ids, calibration_eval_config(config, device),
                                            max_targets=config.calib_targets, form=config.calib_form,
                                            difficulty_ml=config.calib_difficulty_ml)
        _FITTED[memo] = fitted
    cals = fitted.calibrations
    ckpt.with_calibration(cals, volume_calibration_fit=key).save(path)
    w = cals["whole"]
    say(f"calibrated volume intervals of {path.name} on {w.summary()}, "
        f"horizon bins split at {list(w.edges_days)} d holding {w.bin_sizes()} "
        + ("(same weights as a checkpoint calibrated before: its calibration reused)" if reused
           else f"({time.perf_counter() - t:.0f} s)"))
    for line in fitted.log_lines():
        say(line)
    return dict(cals)


# Calibrations fitted in this process by (weights, fit settings): the best and the final checkpoint of a run hold
# the same weights when the best validation score was the last one, and a second fit would cost minutes.
_FITTED: dict[str, StratifiedCalibration] = {}


def weights_digest(ckpt: Checkpoint) -> str:
    """sha256 of the checkpoint's kind and weights: the same model whatever its file or calibration."""
    h = hashlib.sha256(ckpt.kind.encode())
    for name in sorted(ckpt.state_dict):
        h.update(name.encode())
        h.update(ckpt.state_dict[name].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def calibration_eval_config(config: TrainConfig, device: torch.device | str) -> EvalConfig:
    """How the end-of-training calibration forecasts the validation targets (``calib_samples`` samples, seed + 1;
    at most ``calib_targets`` targets, passed to the harness separately)."""
    from longitudinal.evaluation.harness import EvalConfig

    return EvalConfig(crop_size=tuple(config.crop_size), max_context=config.max_context,  # type: ignore[arg-type]
                      normalize=config.normalize, fov=config.fov, fov_margin_mm=config.fov_margin_mm,
                      n_samples=config.calib_samples, seed=config.seed + 1,
                      device=str(device))


def _served_sources(meta: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """The serving choice a calibration was fitted under: pooled (``"all"``) and per-stratum sources per bin."""
    meta = meta or {}
    return {"all": list(meta.get("sources") or []),
            **{str(k): list(v) for k, v in (meta.get("by_stratum") or {}).items()}}
