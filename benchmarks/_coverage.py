"""Shared by benchmarks/calibration_study.py: fit a whole-tumour volume calibration from evaluation records and
score the 80% / 95% interval coverage of other records, per horizon bin. Not a benchmark itself."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from longitudinal.evaluation.harness import HORIZON_BINS
from longitudinal.models.calibration import DEFAULT_DIFFICULTY_ML, VolumeCalibration

Cover = tuple[float, bool, bool]  # (gap days, 80% interval covers the truth, 95% covers it)
TOLERANCE = 0.10  # the target: within 10 points of nominal in every bin with >= 3 targets


def label(lo: float, hi: float) -> str:
    """A horizon bin's column title (days)."""
    return f">{lo:g}" if np.isinf(hi) else f"{lo:g}-{hi:g}"


def fit_whole(records: Sequence[Mapping[str, Any]], form: str = "symmetric",
              difficulty_ml: float = DEFAULT_DIFFICULTY_ML) -> VolumeCalibration:
    """The whole-tumour calibration that training would fit from these (validation) records, in ``form``
    (``"scaled"`` reads each record's ``volume_linear_ml``), on the evaluation's horizon bins."""
    return VolumeCalibration.fit(
        "whole", [r["volume_true_ml"] for r in records], [r["volume_median_ml"] for r in records],
        [r["horizon_days"] for r in records], n_patients=len({r["patient_id"] for r in records}),
        edges_days=sorted({lo for lo, _hi in HORIZON_BINS if lo > 0}), form=form, difficulty_ml=difficulty_ml,
        reference_ml=[r["volume_linear_ml"] for r in records] if form == "scaled" else None)


def cover(cal: VolumeCalibration, records: Sequence[Mapping[str, Any]]) -> list[Cover]:
    """(gap days, 80% covered, 95% covered) of each record's true whole-tumour volume."""
    out = []
    for r in records:
        q = cal.quantiles(r["volume_median_ml"], r["horizon_days"], r.get("volume_linear_ml"))
        v = r["volume_true_ml"]
        out.append((r["horizon_days"], q["lo80"] <= v <= q["hi80"], q["lo95"] <= v <= q["hi95"]))
    return out


def per_bin(covers: Sequence[Cover], bins: Sequence[tuple[float, float]] = HORIZON_BINS
            ) -> tuple[list[tuple[float, float, int] | None], float]:
    """Per bin (cov80, cov95, n targets), None for an empty bin, and the worst |coverage - nominal| over the
    bins holding >= 3 targets."""
    cells: list[tuple[float, float, int] | None] = []
    worst = 0.0
    for lo, hi in bins:
        sel = [c for c in covers if lo <= c[0] < hi]
        if not sel:
            cells.append(None)
            continue
        c80, c95 = float(np.mean([c[1] for c in sel])), float(np.mean([c[2] for c in sel]))
        cells.append((c80, c95, len(sel)))
        if len(sel) >= 3:
            worst = max(worst, abs(c80 - 0.80), abs(c95 - 0.95))
    return cells, worst


def cell_text(cell: tuple[float, float, int] | None) -> str:
    """'cov80 / cov95 (n)' or '-'."""
    return "-" if cell is None else f"{cell[0]:.2f} / {cell[1]:.2f} ({cell[2]})"


def width80(cal: VolumeCalibration, records: Sequence[Mapping[str, Any]]) -> float:
    """Mean width (ml) of the calibrated 80% whole-tumour volume intervals of ``records``."""
    qs = [cal.quantiles(r["volume_median_ml"], r["horizon_days"], r.get("volume_linear_ml")) for r in records]
    return float(np.mean([q["hi80"] - q["lo80"] for q in qs]))


def record_key(r: Mapping[str, Any]) -> tuple:
    """A target's identity in evaluation records: (patient, target scan, last context scan)."""
    return r["patient_id"], r["target_idx"], r["last_context_idx"]


def linear_forecasts(path: Path, store: str, patient_ids: Sequence[str], config: Any) -> dict[tuple, float]:
    """{record_key: the linear baseline's whole-tumour volume forecast (ml)} of every target of ``patient_ids``,
    read from ``path`` or forecast with the harness (``config``: its EvalConfig, one sample) and cached there.
    Records cached before the harness kept ``volume_linear_ml`` get it from here."""
    from longitudinal.evaluation.harness import evaluate_models

    if not path.exists():
        print(f"forecasting the linear baseline on {len(patient_ids)} patients of {store}")
        rep = evaluate_models({}, store, list(patient_ids), dataclasses.replace(config, n_samples=1))
        path.write_text(json.dumps([{k: r[k] for k in ("patient_id", "target_idx", "last_context_idx",
                                                        "volume_pred_ml")}
                                    for r in rep.records if r["model"] == "linear"], default=float))
    return {record_key(r): r["volume_pred_ml"] for r in json.loads(path.read_text())}


def set_stem(name: str) -> str:
    """A record set's cache-file stem (F' -> Fp)."""
    return name.replace("'", "p")


def mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def leave_one_patient_out(recs: Sequence[Mapping[str, Any]], form: str) -> list[Cover]:
    """Coverage of each patient's targets by a calibration fitted on the other patients."""
    out: list[Cover] = []
    for pid in sorted({r["patient_id"] for r in recs}):
        rest = [r for r in recs if r["patient_id"] != pid]
        if rest:
            out += cover(fit_whole(rest, form), [r for r in recs if r["patient_id"] == pid])
    return out


def cross_validated(pool: Sequence[Mapping[str, Any]], form: str, c: float) -> tuple[list[Cover], float]:
    """Coverage of each pool target under patient-grouped 5-fold calibration, and the mean 80% width."""
    ids = sorted({r["patient_id"] for r in pool})
    fold = {p: i % 5 for i, p in enumerate(np.random.default_rng(0).permutation(ids))}
    out: list[Cover] = []
    widths = []
    for f in range(5):
        held = [r for r in pool if fold[r["patient_id"]] == f]
        cal = fit_whole([r for r in pool if fold[r["patient_id"]] != f], form, c)
        out += cover(cal, held)
        widths.append(width80(cal, held) * len(held))
    return out, float(sum(widths) / len(pool))


def error_summary(recs: Sequence[Mapping[str, Any]], lo: float, hi: float) -> str:
    """One bin's mean signed error (true - median sampled volume, ml) and the 50th / 80th / 95th percentiles of
    its conformal scores (|error| per year of scale, ``longitudinal.models.calibration``)."""
    from longitudinal.models.calibration import horizon_scale

    sel = [r for r in recs if lo <= r["horizon_days"] < hi]
    if not sel:
        return f"{label(lo, hi)}: -"
    err = np.array([r["volume_true_ml"] - r["volume_median_ml"] for r in sel])
    score = np.abs(err) / horizon_scale(np.array([r["horizon_days"] for r in sel]), 0.25)
    q = np.percentile(score, [50, 80, 95])
    return f"{label(lo, hi)}: bias {err.mean():+.1f} ml, scores p50/p80/p95 {q[0]:.1f}/{q[1]:.1f}/{q[2]:.1f}"


def subsample_row(pool: Sequence[Mapping[str, Any]], tests: Sequence[Mapping[str, Any]], m: int, draws: int,
                  rng: np.random.Generator, n_bins: int) -> list[str]:
    """Row of the subsampling table: per-bin percentiles of coverage over ``draws`` calibrations on ``m``
    patients of ``pool``, and the share of draws within tolerance everywhere."""
    by_patient: dict[str, list[Mapping[str, Any]]] = {}
    for r in pool:
        by_patient.setdefault(r["patient_id"], []).append(r)
    ids = sorted(by_patient)
    if m > len(ids):
        return [str(m), *["-"] * n_bins, f"(only {len(ids)} patients)"]
    c80 = np.full((draws, n_bins), np.nan)
    c95 = np.full((draws, n_bins), np.nan)
    ok = 0
    for d in range(draws):
        chosen = rng.choice(len(ids), size=m, replace=False)
        cal = fit_whole([r for i in chosen for r in by_patient[ids[i]]])
        cells, worst = per_bin(cover(cal, tests))
        for b, cell in enumerate(cells):
            if cell is not None:
                c80[d, b], c95[d, b] = cell[0], cell[1]
        ok += worst <= TOLERANCE + 1e-12
    out = [str(m)]
    for b in range(n_bins):
        p80 = np.nanpercentile(c80[:, b], [5, 50, 95])
        p95 = np.nanpercentile(c95[:, b], [5, 50, 95])
        out.append(f"{p80[0]:.2f}-{p80[2]:.2f} ({p80[1]:.2f}) / {p95[0]:.2f}-{p95[2]:.2f} ({p95[1]:.2f})")
    out.append(f"{ok / draws:.0%}")
    return out


def every(n: int, what: str, console: Any) -> Callable[[str], None]:
    """A harness progress callback that prints one line in ``n``."""
    calls = [0]

    def say(msg: str) -> None:
        calls[0] += 1
        if calls[0] % n == 0:
            console.print(f"  {what}: {msg}")

    return say
