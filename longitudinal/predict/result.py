"""Typed results of a forecast query and their JSON form.

Units: volumes in ml, days since the patient's baseline scan (float), dates ISO ``YYYY-MM-DD``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from longitudinal.models.calibration import LEVELS, STRUCTURES, VolumeCalibration, volume_quantiles
from longitudinal.predict.fov import FieldOfView

if TYPE_CHECKING:  # plan.py imports this module (Calendar)
    from longitudinal.predict.plan import PlannedEvent

# Central intervals: 80% = [q10, q90], 95% = [q2.5, q97.5].
QUANTILE_LEVELS: dict[str, float] = LEVELS

Calendar = Literal["real", "shifted"]


@dataclass(frozen=True)
class VolumeInterval:
    """Summary of S sampled volumes (ml): the median and the central 80% and 95% intervals.

    Always ordered ``lo95 <= lo80 <= median <= hi80 <= hi95`` (see ``from_samples``).
    """

    median: float
    lo80: float
    hi80: float
    lo95: float
    hi95: float

    @classmethod
    def from_samples(cls, samples: np.ndarray, gap_days: float = 0.0,
                     calibration: VolumeCalibration | None = None, reference_ml: float | None = None,
                     max_ml: float | None = None) -> VolumeInterval:
        """Summary of ``samples`` (S,) in ml: their quantiles, or with ``calibration`` (the model's, fitted on
        validation patients) the calibrated interval around their median for a query ``gap_days`` after the
        last context scan (``longitudinal.models.calibration.volume_quantiles``; ``reference_ml``: the linear
        baseline's volume forecast of the query, which a difficulty-scaled calibration needs; ``max_ml``: the
        model's crop volume, which caps every end). Ordered for every S >= 1."""
        return cls(**volume_quantiles(samples, gap_days, calibration, reference_ml, max_ml))

    def ordered(self) -> bool:
        return self.lo95 <= self.lo80 <= self.median <= self.hi80 <= self.hi95

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("median", "lo80", "hi80", "lo95", "hi95")}


def interval_basis(calibrations: Mapping[str, VolumeCalibration], n_samples: int) -> dict[str, Any]:
    """What the volume intervals of a forecast rest on, per structure (``whole``, ``enhancing``): the calibration
    the model carries (its method and how many held-out patients and targets it was fitted on) or, without
    one, the quantiles of the ``n_samples`` sampled volumes, which the reader is told are uncalibrated; plus
    ``"<structure>:<stratum>"`` for each treatment stratum calibrated on its own (a query names the key it
    used in ``QueryForecast.interval_calibration``)."""
    out: dict[str, Any] = {"levels": "central: 80% = [q10, q90], 95% = [q2.5, q97.5]"}
    for structure in STRUCTURES:
        cal = calibrations.get(structure)
        # The per-stratum calibrations next to the pooled one: each query names the one it used.
        for key in sorted(k for k in calibrations if k.startswith(f"{structure}:")):
            out[key] = _calibration_basis(calibrations[key])
        if cal is None:
            out[structure] = {
                "method": f"quantiles of the {n_samples} sampled volumes",
                "calibrated": False,
                "note": "uncalibrated: a model's own samples are usually over-confident (see the evaluation's "
                        "coverage80_raw)" if n_samples > 1 else "one sample: a point forecast, no interval",
            }
        else:
            out[structure] = _calibration_basis(cal)
    return out


def _calibration_basis(cal: VolumeCalibration) -> dict[str, Any]:
    """One calibration as ``interval_basis`` reports it: method, held-out patients and targets, bins (days)."""
    return {"method": cal.method(), "calibrated": True, "calibration_patients": cal.n_patients,
            "calibration_targets": cal.n, "bin_edges_days": list(cal.edges_days), "targets_per_bin": cal.bin_sizes()}


@dataclass(frozen=True)
class QueryForecast:
    """One query time.

    days: days since the baseline scan; days_after_last_scan: days after the latest scan (negative for a
    retrospective query, which then uses only the scans before it). date: ISO date of the query in
    ``calendar`` ("real" when the site's key maps the patient's dates back, "shifted" for the store's
    de-identified dates), None when the patient has no dates. n_context: scans the model saw.
    files: output kind -> path (``forecast_<channel>``, ``prob_whole``, ``prob_enhancing``), native space.
    field_of_view: whether the tumour and its forecast fit the model's field of view (``predict.fov``); when
    not, the forecast cannot be trusted and ``warnings()`` says why.
    counterfactual: with a treatment plan (``predict.plan``), the forecast of the same query time under the
    recorded history plus the plan, same seed (its files carry ``_plan`` in their names); the fields above are
    the forecast under the recorded history. None without a plan. served_by: "model", or the simple baseline
    ("lci", "linear") that the model's serving policy hands this horizon and treatment stratum to, because the
    model did worse there on its validation patients (``predict.serving``). interval_calibration: the key in
    ``intervals`` of the calibration behind the whole-tumour interval: "whole" (pooled), "whole:treated" /
    "whole:untreated" (the query's treatment stratum: whether a treatment event lies between the last scan and
    the query), or None (quantiles of the raw samples).
    """

    days: float
    days_after_last_scan: float
    date: str | None
    calendar: Calendar | None
    n_context: int
    volume_whole_ml: VolumeInterval
    volume_enhancing_ml: VolumeInterval
    files: dict[str, str] = field(default_factory=dict)
    field_of_view: FieldOfView | None = None
    counterfactual: QueryForecast | None = None
    served_by: str = "model"
    interval_calibration: str | None = None

    @property
    def trusted(self) -> bool:
        return self.field_of_view is None or self.field_of_view.ok

    def warnings(self) -> list[str]:
        """Why this query's forecast cannot be trusted (empty when nothing is known against it)."""
        return [] if self.field_of_view is None else self.field_of_view.warnings()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``counterfactual`` is the same form (without its own ``counterfactual``) or None."""
        d = asdict(replace(self, counterfactual=None))
        d["volume_whole_ml"] = self.volume_whole_ml.to_dict()
        d["volume_enhancing_ml"] = self.volume_enhancing_ml.to_dict()
        d["field_of_view"] = None if self.field_of_view is None else self.field_of_view.to_dict()
        if self.counterfactual is None:
            d["counterfactual"] = None
        else:
            d["counterfactual"] = {k: v for k, v in self.counterfactual.to_dict().items() if k != "counterfactual"}
        return d


@dataclass(frozen=True)
class ObservedScan:
    """One stored scan: days since baseline, its date (same calendar as the queries) and its label volumes
    (ml; None when the session has no label)."""

    session: str
    days: float
    date: str | None
    volume_whole_ml: float | None
    volume_enhancing_ml: float | None


@dataclass(frozen=True)
class NativeSpace:
    """The grid every output image is written on: the patient's latest scan as acquired.

    shape: (x, y, z) voxels; affine: 4x4 voxel -> RAS mm (the NIfTI affine of that scan). grid: "native", or
    "reference" when the store kept no usable native geometry for that scan (then the store's grid is used)."""

    session: str
    shape: tuple[int, int, int]
    affine: list[list[float]]
    grid: str = "native"


@dataclass
class ForecastResult:
    """Everything a query produced. ``to_json()`` is what ``<patient>_forecast.json`` holds.

    plan: the planned treatments of a counterfactual forecast (``predict.plan``; empty: none), in days since
    baseline with their dates; each query then holds its forecast under the plan in ``counterfactual``."""

    patient: str
    model: str
    version: str | None
    model_kind: str | None
    n_samples: int
    seed: int
    queries: list[QueryForecast]
    observed: list[ObservedScan]
    native: NativeSpace
    channels: tuple[str, ...]
    intervals: dict[str, Any] = field(default_factory=dict)  # interval_basis(): what the volume intervals rest on
    plan: list[PlannedEvent] = field(default_factory=list)
    out_dir: Path | None = None
    summary_path: Path | None = None
    plot_path: Path | None = None
    seconds: float = 0.0

    @property
    def counterfactual(self) -> bool:
        """Whether the queries also hold a forecast under a treatment plan."""
        return bool(self.plan)

    def warnings(self) -> list[str]:
        """One line per query that cannot be trusted: ``day D (+G d): not trustworthy: reason; reason``; a
        forecast under the plan says ``day D (+G d) under the plan: ...``."""
        out = []
        for q in self.queries:
            for f, under in ((q, ""), (q.counterfactual, " under the plan")):
                if f is not None and f.warnings():
                    out.append(f"day {f.days:.0f} ({f.days_after_last_scan:+.0f} d){under}: not trustworthy: "
                               + "; ".join(f.warnings()))
        return out

    def plan_description(self) -> str:
        """The plan in days since baseline only ("" without one): e.g. ``surgery day 130; chemotherapy days
        130-172``."""
        return "; ".join(e.describe_days() for e in self.plan)

    def to_json(self) -> dict[str, Any]:
        return {
            "patient": self.patient,
            "model": self.model,
            "version": self.version,
            "model_kind": self.model_kind,
            "n_samples": self.n_samples,
            "seed": self.seed,
            "channels": list(self.channels),
            "counterfactual": self.counterfactual,
            "plan": [e.to_dict() for e in self.plan],
            "queries": [q.to_dict() for q in self.queries],
            "observed": [asdict(o) for o in self.observed],
            "native_space": {"session": self.native.session, "shape": list(self.native.shape),
                             "affine": self.native.affine, "grid": self.native.grid},
            "intervals": self.intervals,
            "warnings": self.warnings(),
            "plot": None if self.plot_path is None else str(self.plot_path),
        }
