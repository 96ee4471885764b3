"""Shared by the calibration benchmarks: fit a whole-tumour volume calibration from evaluation records and score
the 80% / 95% interval coverage of other records, per horizon bin. Not a benchmark itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from longitudinal.evaluation.harness import HORIZON_BINS
from longitudinal.models.calibration import DEFAULT_DIFFICULTY_ML, VolumeCalibration

Cover = tuple[float, bool, bool]  # (gap days, 80% interval covers the truth, 95% covers it)
TOLERANCE = 0.10  # issue 5: within 10 points of nominal in every bin with >= 3 targets


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
