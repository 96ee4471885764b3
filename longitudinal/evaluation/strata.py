"""Evaluation by treatment stratum: targets whose gap holds a treatment event apart from untreated ones.

A target is *treated* when a treatment event lies between its last context scan and the target scan
(``longitudinal.data.context.treatment_in_gap``, recorded in every evaluation record as ``treated_gap``). A
resection or a course of radiotherapy in the gap changes the tumour in a way that no context scan shows, so
pooled figures mix two different forecasting problems; here they are reported, and volume intervals calibrated,
per stratum:

- ``stratum_rows``: the evaluation rows per (model, stratum, horizon bin) for the strata ``all`` (the report's
  own rows), ``untreated`` and ``treated``; coverage80 / coverage95 per stratum and bin come with them;
- ``write_targets_csv``: one row per (patient, target, model): what a reader needs to recompute any figure by
  stratum (days only, never a date);
- ``fit_stratified_calibration``: the pooled volume calibrations plus one per stratum that has at least
  ``MIN_PER_STRATUM`` validation targets (``longitudinal.models.calibration``); ``leave_one_patient_out``: how
  that calibration covers validation patients it was not fitted on;
- ``paired_difference``: the mean difference of one figure between two models on the same targets of a stratum
  and horizon bin, with a bootstrap interval over patients (targets of one patient are not independent);
  ``stratum_mean``: one model's mean (a coverage, say) with the same interval.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from longitudinal.evaluation.calibration import calibration_records, calibrations_from_records
from longitudinal.evaluation.harness import (
    ALL_STRATUM,
    HORIZON_BINS,
    EvalConfig,
    EvaluationReport,
    aggregate,
    bin_label,
    in_stratum,
)
from longitudinal.models.base import ForecastModel
from longitudinal.models.calibration import (
    DEFAULT_DIFFICULTY_ML,
    DEFAULT_FORM,
    MIN_PER_STRATUM,
    STRATA,
    VolumeCalibration,
    calibration_key,
    select_calibration,
    volume_quantiles,
)
from longitudinal.models.checkpoint import Checkpoint
from longitudinal.predict import Predictor

# The strata of a report, in table order: every target first, then by what the gap holds.
REPORT_STRATA: tuple[str, ...] = (ALL_STRATUM, *STRATA)
STRATUM_LABELS: dict[str, str] = {ALL_STRATUM: "all targets", "untreated": "untreated gap",
                                  "treated": "treatment in gap"}

# Columns of the per-target CSV, in order. Volumes in ml, days from the last context scan; coverage is empty
# for a deterministic model (one sample has no interval to cover the truth).
TARGET_COLUMNS: tuple[str, ...] = (
    "patient_id", "target_idx", "last_context_idx", "model", "days_after_last_context", "treated_gap",
    "dice_whole", "volume_true_ml", "volume_error_ml", "interval_median_ml", "interval_lo80_ml",
    "interval_hi80_ml", "interval_lo95_ml", "interval_hi95_ml", "coverage80", "coverage95",
)


# --- rows and tables --------------------------------------------------------------------------------------------
def report_bins(rows: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """The horizon bins (lo, hi) in days (hi = inf: open-ended) that ``rows`` were aggregated on, in order."""
    bins: list[tuple[float, float]] = []
    for r in rows:
        if r["horizon"] == "all":
            continue
        b = (float(r["horizon_lo"]), math.inf if r["horizon_hi"] is None else float(r["horizon_hi"]))
        if b not in bins:
            bins.append(b)
    return bins


def stratum_rows(report: EvaluationReport, strata: Sequence[str] = REPORT_STRATA) -> list[dict[str, Any]]:
    """The report's rows per (stratum, horizon bin, model), on the bins of ``report.rows``: ``all`` (the same
    figures as ``report.rows``), then ``untreated`` and ``treated`` (each row's ``stratum``; skill against LCI
    on the same stratum's targets)."""
    return aggregate(report.records, report.models, report_bins(report.rows), strata)


def stratum_counts(report: EvaluationReport) -> dict[str, int]:
    """Targets per stratum of ``REPORT_STRATA`` (every model of a report scores the same targets)."""
    first = report.models[0] if report.models else None
    recs = [r for r in report.records if r["model"] == first]
    return {s: sum(1 for r in recs if in_stratum(r, s)) for s in REPORT_STRATA}


# --- per-target CSV ---------------------------------------------------------------------------------------------
def target_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``TARGET_COLUMNS`` of every evaluation record: one row per (patient, target, model), where a target
    is a (last context scan, target scan) pair of the patient. Coverage is None for a deterministic model."""
    rows = []
    for r in records:
        row = {k: r.get(k) for k in TARGET_COLUMNS}
        row["days_after_last_context"] = r.get("days_after_last_context", r["horizon_days"])
        rows.append(row)
    return rows


def write_targets_csv(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write ``target_rows(records)`` as CSV to ``path`` atomically (a temporary file in the same folder, then
    renamed, so a reader never sees half a table). Booleans as true/false; missing or NaN figures empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(TARGET_COLUMNS)
            for row in target_rows(records):
                writer.writerow([_cell(row[k]) for k in TARGET_COLUMNS])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    return str(value)


# --- calibration per stratum ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StratumFit:
    """How one treatment stratum was calibrated: n_targets validation targets of n_patients patients; own: it
    got its own calibrations (``"<structure>:<stratum>"``), else its queries use the pooled ones."""

    stratum: str
    n_targets: int
    n_patients: int
    own: bool


@dataclass(frozen=True)
class HeldOutCoverage:
    """Coverage of one (stratum, horizon bin) cell when each validation patient's targets get the intervals of
    a calibration fitted on the other patients: n_targets targets of n_patients patients, the shares covered
    by the 80% and 95% whole-tumour volume intervals. [lo_days, hi_days): the bin, days after the last scan."""

    stratum: str
    lo_days: float
    hi_days: float
    n_targets: int
    n_patients: int
    coverage80: float
    coverage95: float


@dataclass(frozen=True)
class StratifiedCalibration:
    """calibrations: the pooled ``"whole"`` / ``"enhancing"`` calibrations plus ``"<structure>:<stratum>"`` for
    every stratum fitted on its own; strata: one ``StratumFit`` per stratum of ``STRATA``; min_targets: the
    fewest validation targets a stratum of its own needs."""

    calibrations: dict[str, VolumeCalibration]
    strata: tuple[StratumFit, ...]
    min_targets: int = MIN_PER_STRATUM
    held_out: tuple[HeldOutCoverage, ...] = ()

    def log_lines(self) -> list[str]:
        """One line per stratum: its own calibration, or the pooled one for lack of targets; then, when
        ``held_out`` was measured, one line per stratum of its leave-one-patient-out coverage per bin."""
        out = []
        for f in self.strata:
            head = f"volume intervals, {STRATUM_LABELS[f.stratum]} ({f.stratum}):"
            out.append(f"{head} own calibration on {f.n_targets} targets of {f.n_patients} held-out patients"
                       if f.own else
                       f"{head} only {f.n_targets} validation targets (fewer than {self.min_targets}), so its "
                       f"queries use the pooled calibration")
        for stratum in REPORT_STRATA:
            cells = [c for c in self.held_out if c.stratum == stratum]
            if cells:
                out.append(f"leave-one-patient-out 80% / 95% coverage, {STRATUM_LABELS[stratum]}: " + ", ".join(
                    f"{bin_label(c.lo_days, c.hi_days)} d {c.coverage80:.2f} / {c.coverage95:.2f} "
                    f"({_count(c.n_targets, 'target')}, {_count(c.n_patients, 'patient')})" for c in cells))
        return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def calibrations_by_stratum(
    records: Sequence[Mapping[str, Any]],
    bins: Sequence[tuple[float, float]] = HORIZON_BINS,
    offset_years: float = 0.25,
    form: str = DEFAULT_FORM,
    difficulty_ml: float = DEFAULT_DIFFICULTY_ML,
    min_targets: int = MIN_PER_STRATUM,
) -> StratifiedCalibration:
    """The pooled calibrations of a sampled model's evaluation records (``calibrations_from_records``) plus,
    for each stratum with at least ``min_targets`` records (by their ``treated_gap``), the same fit on that
    stratum's records alone, under ``calibration_key(structure, stratum)``."""
    cals = dict(calibrations_from_records(records, bins, offset_years, form, difficulty_ml))
    fits = []
    for stratum in STRATA:
        mine = [r for r in records if in_stratum(r, stratum)]
        own = len(mine) >= max(int(min_targets), 1)
        if own:
            for structure, cal in calibrations_from_records(mine, bins, offset_years, form, difficulty_ml).items():
                cals[calibration_key(structure, stratum)] = cal
        fits.append(StratumFit(stratum, len(mine), len({r["patient_id"] for r in mine}), own))
    return StratifiedCalibration(cals, tuple(fits), int(min_targets))


def fit_stratified_calibration(
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
    min_targets: int = MIN_PER_STRATUM,
) -> StratifiedCalibration:
    """``longitudinal.evaluation.calibration.fit_volume_calibration`` (same arguments, same pooled
    calibrations) plus one calibration per treatment stratum with at least ``min_targets`` of the targets
    (``calibrations_by_stratum``), with ``held_out`` measured on the same records (``leave_one_patient_out``;
    empty with one patient). Raises ValueError when the model is not sampled or the patients give no target."""
    recs = calibration_records(model, store_url, patient_ids, config, max_targets, progress, engine)
    fit = calibrations_by_stratum(recs, config.bins, offset_years, form, difficulty_ml, min_targets)
    if len({r["patient_id"] for r in recs}) < 2:
        return fit
    return replace(fit, held_out=tuple(leave_one_patient_out(recs, config.bins, offset_years, form, difficulty_ml,
                                                             min_targets)))


def leave_one_patient_out(
    records: Sequence[Mapping[str, Any]],
    bins: Sequence[tuple[float, float]] = HORIZON_BINS,
    offset_years: float = 0.25,
    form: str = DEFAULT_FORM,
    difficulty_ml: float = DEFAULT_DIFFICULTY_ML,
    min_targets: int = MIN_PER_STRATUM,
) -> list[HeldOutCoverage]:
    """How the calibration design holds on patients it was not fitted on, from the validation records alone
    (``calibration_records``): for each patient, ``calibrations_by_stratum`` on every other patient's records,
    then the whole-tumour intervals of that patient's targets (each through its stratum's calibration, as a
    query is served; not capped at a crop volume, which the records do not carry). One row per stratum of
    ``REPORT_STRATA`` and bin of ``bins`` (days) that holds a target. Test patients are never needed, so a
    design can be checked without looking at the figures it is reported on. Raises ValueError with fewer than
    two patients."""
    by_patient: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_patient.setdefault(str(r["patient_id"]), []).append(r)
    if len(by_patient) < 2:
        raise ValueError(f"leave-one-patient-out needs >= 2 patients, got {len(by_patient)}")
    hits: list[tuple[Mapping[str, Any], bool, bool]] = []
    for pid, mine in sorted(by_patient.items()):
        rest = [r for r in records if str(r["patient_id"]) != pid]
        cals = calibrations_by_stratum(rest, bins, offset_years, form, difficulty_ml, min_targets).calibrations
        for r in mine:
            cal = select_calibration(cals, "whole", bool(r.get("treated_gap")))
            if cal is None:
                raise ValueError("leave-one-patient-out: no whole-tumour calibration was fitted")
            q = volume_quantiles([r["volume_median_ml"]], r["horizon_days"], cal, r.get("volume_linear_ml"))
            v = float(r["volume_true_ml"])
            hits.append((r, q["lo80"] <= v <= q["hi80"], q["lo95"] <= v <= q["hi95"]))
    out = []
    for stratum in REPORT_STRATA:
        for lo, hi in bins:
            cell = [(c80, c95, str(r["patient_id"])) for r, c80, c95 in hits
                    if in_stratum(r, stratum) and lo <= r["horizon_days"] < hi]
            if cell:
                out.append(HeldOutCoverage(stratum, float(lo), float(hi), len(cell), len({c[2] for c in cell}),
                                           float(np.mean([c[0] for c in cell])), float(np.mean([c[1] for c in cell]))))
    return out


# --- paired differences -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``key`` (model_a minus model_b) over the n_targets targets (of n_patients patients) that both
    models scored in one stratum and horizon bin [lo_days, hi_days) days after the last context scan; lo / hi:
    the ``level`` percentile interval of that mean over ``n_boot`` resamples of the patients (NaN without a
    target). For Dice a positive mean favours model_a; for a volume error a negative one does."""

    model_a: str
    model_b: str
    key: str
    stratum: str
    lo_days: float
    hi_days: float
    n_targets: int
    n_patients: int
    mean: float
    lo: float
    hi: float


def paired_difference(
    records: Sequence[Mapping[str, Any]],
    model_a: str,
    model_b: str,
    key: str,
    stratum: str = ALL_STRATUM,
    lo_days: float = 0.0,
    hi_days: float = math.inf,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """``PairedDifference`` of ``key`` between two models of the same evaluation records. Targets are paired
    by (patient, last context scan, target scan); a target either model lacks, or whose figure is NaN for
    either, is left out. The bootstrap resamples patients with replacement (a cluster bootstrap: a patient's
    targets share its tumour) and takes the mean over the resampled patients' targets."""
    def by_target(model: str) -> dict[tuple[Any, ...], Mapping[str, Any]]:
        return {(r["patient_id"], r.get("last_context_idx"), r.get("target_idx")): r for r in records
                if r["model"] == model and in_stratum(r, stratum) and lo_days <= r["horizon_days"] < hi_days}

    a, b = by_target(model_a), by_target(model_b)
    per_patient: dict[str, list[float]] = {}
    for tid in sorted(set(a) & set(b), key=str):
        va, vb = a[tid].get(key), b[tid].get(key)
        if va is None or vb is None or math.isnan(va) or math.isnan(vb):
            continue
        per_patient.setdefault(str(tid[0]), []).append(float(va) - float(vb))
    n_targets, n_patients, mean, lo, hi = _cluster_mean(per_patient, n_boot, level, seed)
    return PairedDifference(model_a, model_b, key, stratum, lo_days, hi_days, n_targets, n_patients, mean, lo, hi)


def stratum_mean(
    records: Sequence[Mapping[str, Any]],
    model: str,
    key: str,
    stratum: str = ALL_STRATUM,
    lo_days: float = 0.0,
    hi_days: float = math.inf,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """The mean of ``key`` for one model over its targets of a stratum and horizon bin [lo_days, hi_days), with
    the same bootstrap interval over patients as ``paired_difference`` (``model_b`` is empty). For coverage80 /
    coverage95 it says how far a cell's coverage can move with the patients alone: a cell of few patients
    may miss its nominal level by chance."""
    per_patient: dict[str, list[float]] = {}
    for r in records:
        v = r.get(key)
        if (r["model"] == model and in_stratum(r, stratum) and lo_days <= r["horizon_days"] < hi_days
                and v is not None and not math.isnan(v)):
            per_patient.setdefault(str(r["patient_id"]), []).append(float(v))
    n_targets, n_patients, mean, lo, hi = _cluster_mean(per_patient, n_boot, level, seed)
    return PairedDifference(model, "", key, stratum, lo_days, hi_days, n_targets, n_patients, mean, lo, hi)


def _cluster_mean(per_patient: Mapping[str, Sequence[float]], n_boot: int, level: float, seed: int
                  ) -> tuple[int, int, float, float, float]:
    """(targets, patients, mean over every target, the ``level`` percentile interval of that mean over
    ``n_boot`` resamples of the patients with replacement); NaNs without a target."""
    n_targets = sum(len(v) for v in per_patient.values())
    if not n_targets:
        nan = float("nan")
        return 0, 0, nan, nan, nan
    sums = np.array([sum(v) for v in per_patient.values()])
    counts = np.array([len(v) for v in per_patient.values()], dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(sums), size=(int(n_boot), len(sums)))
    boot = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [tail, 1.0 - tail])
    return n_targets, len(sums), float(sums.sum() / counts.sum()), float(lo), float(hi)
