"""Fit a model's volume-interval calibration on validation patients (see ``longitudinal.models.calibration``).

The model forecasts every later scan of the validation patients from their earlier scans (the evaluation
protocol, at most ``max_targets`` targets evenly spaced over the deterministic target list); the absolute
errors of its median sampled volume, normalised by the gap (and, in the default scaled form, by how far that
median is from the linear baseline's forecast), become the conformal scores it carries, grouped by the
evaluation's horizon bins (small bins merged; see ``VolumeCalibration.fit``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from longitudinal.evaluation.harness import HORIZON_BINS, EvalConfig, evaluate_models
from longitudinal.models.base import ForecastModel
from longitudinal.models.calibration import DEFAULT_DIFFICULTY_ML, DEFAULT_FORM, VolumeCalibration
from longitudinal.models.checkpoint import Checkpoint
from longitudinal.predict import Predictor


def fit_volume_calibration(
    model: ForecastModel | Predictor | Checkpoint,
    store_url: str,
    patient_ids: Sequence[str],
    config: EvalConfig,
    max_targets: int | None = None,
    offset_years: float = 0.25,
    progress: Callable[[str], None] | None = None,
    form: str = DEFAULT_FORM,
    difficulty_ml: float = DEFAULT_DIFFICULTY_ML,
    engine: Any = None,
) -> dict[str, VolumeCalibration]:
    """{"whole", "enhancing"} calibrations of a sampled ``model`` from ``patient_ids`` of ``store_url``, in
    ``form`` (``longitudinal.models.calibration``; ``difficulty_ml``: the scaled form's c, ml).

    ``model``: a Predictor, a checkpoint (applied with its own settings) or a bare model (applied with
    ``config``'s). Its current calibration is ignored: the scores come from its raw samples' medians.
    ``engine``: forecast the patients on a Dask cluster (``evaluate_models``; None: the engine the caller
    entered, else this process), the same scores either way.
    Raises ValueError when the model is not sampled or the patients give no target."""
    recs = calibration_records(model, store_url, patient_ids, config, max_targets, progress, engine)
    return calibrations_from_records(recs, config.bins, offset_years, form, difficulty_ml)


def calibration_records(
    model: ForecastModel | Predictor | Checkpoint,
    store_url: str,
    patient_ids: Sequence[str],
    config: EvalConfig,
    max_targets: int | None = None,
    progress: Callable[[str], None] | None = None,
    engine: Any = None,
) -> list[dict[str, Any]]:
    """The evaluation records a calibration is fitted from: ``model``'s forecasts of the targets of
    ``patient_ids`` (arguments as in ``fit_volume_calibration``; a checkpoint's own calibration is dropped).
    Raises ValueError when the model is not sampled or the patients give no target."""
    if isinstance(model, Checkpoint):
        model = Predictor.from_checkpoint(replace(model, calibration={}), config.device)
    if not model.stochastic:
        raise ValueError(f"{model.kind}: only sampled models get a volume calibration")
    report = evaluate_models({"model": model}, store_url, list(patient_ids), config, progress,
                             max_targets=max_targets, baselines=False, engine=engine)
    recs = [r for r in report.records if r["model"] == "model"]
    if not recs:
        raise ValueError(f"no calibration target: patients {list(patient_ids)} have no scan after their first")
    return recs


def calibrations_from_records(
    records: Sequence[Mapping[str, Any]],
    bins: Sequence[tuple[float, float]] = HORIZON_BINS,
    offset_years: float = 0.25,
    form: str = DEFAULT_FORM,
    difficulty_ml: float = DEFAULT_DIFFICULTY_ML,
) -> dict[str, VolumeCalibration]:
    """{"whole", "enhancing"} calibrations from a sampled model's per-target evaluation records (keys
    volume_true_ml, volume_median_ml, volume_enh_true_ml, volume_enh_median_ml, horizon_days, patient_id;
    the scaled form also reads the linear baseline's volume_linear_ml and volume_enh_linear_ml), with Mondrian
    scores on the interior edges of ``bins`` (days)."""
    gaps = np.array([r["horizon_days"] for r in records])
    n_pat = len({r["patient_id"] for r in records})
    # Per-horizon (Mondrian) scores on the evaluation's own bins, so coverage holds bin by bin.
    edges = sorted({lo for lo, _hi in bins if lo > 0})
    return {
        structure: VolumeCalibration.fit(structure, [r[f"volume{key}_true_ml"] for r in records],
                                         [r[f"volume{key}_median_ml"] for r in records], gaps, offset_years,
                                         n_pat, edges, form=form, difficulty_ml=difficulty_ml,
                                         reference_ml=[r[f"volume{key}_linear_ml"] for r in records]
                                         if form == "scaled" else None)
        for structure, key in (("whole", ""), ("enhancing", "_enh"))
    }
