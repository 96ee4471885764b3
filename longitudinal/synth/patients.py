"""Draw the patients of the synthetic cohort: growth parameters, tumour seed, visit schedule and the tumour
density at every visit, grown with the Fisher-Kolmogorov solver on a box around the seed.

Units: volumes in ml, diffusivity D (white matter, ``d_white``) in mm^2/day, proliferation rate rho in 1/day,
times in days since the baseline scan (``Visit.days``). Untreated patients grow freely; treated ones follow a
treatment course (``treatment.py``) after their baseline scan. Each patient draws from its own random stream
seeded by (cohort seed, patient index), so patient k is the same whatever the cohort size; drawing is
rejection sampling that keeps every visit within the preset's volume bounds and the tumour inside its box.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from longitudinal.synth.anatomy import Anatomy, diffusivity_map
from longitudinal.synth.config import SynthPreset
from longitudinal.synth.render import Thresholds
from longitudinal.synth.solver import FisherKolmogorov
from longitudinal.synth.treatment import EventTruth, TreatmentPlan, draw_plan, run_course, visit_offsets

_MAX_ATTEMPTS = 200


# ------------------------------------------------------------------------------------------------ records
@dataclass
class Visit:
    """One scan of a drawn patient: its tumour on the solver box and its true volumes (ml).

    session: "01", "02", ...; days: days since the baseline scan; density_box: the density c (0..1, float32)
    on the patient's solver box; whole_ml / core_ml: volume above the FLAIR / enhancing threshold; burden_ml:
    the integral of c; cavity_box: the resection cavity (bool) on the box, None before surgery.
    """

    session: str
    acq_time: datetime
    days: float
    density_box: np.ndarray  # c on the solver box, float32
    whole_ml: float
    core_ml: float
    burden_ml: float
    cavity_box: np.ndarray | None = None  # resection cavity on the solver box (bool), None before surgery


@dataclass
class SynthPatient:
    """A drawn patient: growth parameters, where its tumour started, and its visits.

    subject: "001", ...; d_white: white-matter diffusivity (mm^2/day; grey matter gets a tenth); rho:
    proliferation rate (1/day); seed_voxel / seed_mm: where the tumour started (voxel index, RAS mm);
    silent_days: growth before the baseline scan (days); baseline_volume_target_ml: the visible volume the
    baseline was drawn to reach (ml); box: the solver box in the anatomy's grid; attempts: rejection draws
    used; plan / events: the treatment plan and what each event did (None / empty: untreated).
    """

    subject: str
    d_white: float
    rho: float
    seed_voxel: tuple[int, int, int]
    seed_mm: list[float]
    thresholds: Thresholds
    silent_days: float
    baseline_volume_target_ml: float
    box: tuple[slice, slice, slice]
    visits: list[Visit]
    attempts: int
    plan: TreatmentPlan | None = None  # None: untreated
    events: list[EventTruth] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ drawing
def is_treated(seed: int, index: int, treated_fraction: float) -> bool:
    """Whether patient ``index`` of a cohort drawn with ``seed`` is treated (its own random stream), with
    probability ``treated_fraction`` (0..1)."""
    return bool(np.random.default_rng([seed, index, 2]).random() < treated_fraction)


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _solver_box(anatomy: Anatomy, seed: tuple[int, int, int], half_width_mm: float) -> tuple[slice, ...]:
    half = int(math.ceil(half_width_mm / anatomy.spacing_mm))
    return tuple(
        slice(max(0, s - half), min(n, s + half + 1)) for s, n in zip(seed, anatomy.shape, strict=True)
    )


def _edge_max(c: np.ndarray) -> float:
    """Largest density on the six faces of the solver box (c must be ~0 there: the box holds the tumour)."""
    return float(max(c[0].max(), c[-1].max(), c[:, 0].max(), c[:, -1].max(), c[:, :, 0].max(), c[:, :, -1].max()))


def draw_patient(
    index: int, seed: int, preset: SynthPreset, anatomy: Anatomy, treated: bool = False
) -> SynthPatient:
    """Draw patient ``index`` (0-based; subject ``index + 1``) of the cohort drawn with ``seed`` and grow its
    tumour; rejection keeps every visit within the preset's volume bounds. ``treated``: the patient is treated
    (``draw_treated_patient``) after its baseline scan. Raises RuntimeError when no draw fits."""
    if treated:
        return draw_treated_patient(index, seed, preset, anatomy)
    rng = np.random.default_rng([seed, index])
    subject = f"{index + 1:03d}"
    voxel_ml = anatomy.voxel_ml
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        n_visits = int(rng.integers(preset.visits[0], preset.visits[1] + 1))
        n_gaps = n_visits - 1
        (g_min, g_max), (a_min, a_max) = preset.gap_days, preset.radial_growth_mm
        # The front advances 2 sqrt(D rho) mm/day (Fisher-KPP speed); over the observation window it must move
        # a_min..a_max mm so that the tumour visibly grows but stays below max_volume_ml. Half the patients get
        # their follow-up schedule first and then parameters that fit it (slow tumours, long horizons); the
        # other half get parameters first and then a schedule that fits them (fast tumours, close visits).
        schedule_first = bool(rng.random() < 0.5)
        gaps = rng.integers(g_min, g_max + 1, size=n_gaps) if schedule_first else None
        window = (float(gaps.sum()),) * 2 if gaps is not None else (g_min * n_gaps, g_max * n_gaps)
        drawn = _draw_growth(rng, preset, window)
        if drawn is None:
            continue
        d_white, rho = drawn
        speed = 2.0 * math.sqrt(d_white * rho)
        if gaps is None:
            lo = max(math.ceil(a_min / speed / n_gaps), g_min)
            hi = min(math.floor(a_max / speed / n_gaps), g_max)
            if lo > hi:
                continue
            gaps = rng.integers(lo, hi + 1, size=n_gaps)
        start = _start_tumour(rng, preset, anatomy, d_white, rho)
        if start is None:
            continue
        baseline = datetime(2012, 1, 1) + timedelta(days=int(rng.integers(0, 12 * 365)))
        offsets = np.concatenate([[0], np.cumsum(gaps)])
        acq_times = [
            baseline + timedelta(days=int(d), minutes=int(rng.integers(8 * 60, 18 * 60))) for d in offsets
        ]
        visits = _visits_below(_grown(start, acq_times), start.thresholds, voxel_ml, preset.max_volume_ml)
        if len(visits) < min(3, preset.visits[0]):
            continue
        if _edge_max(visits[-1].density_box) > start.thresholds.flair / 2.0:
            continue  # the tumour reached the edge of the solver box: the box would have clipped it
        return _patient(subject, d_white, rho, start, anatomy, visits, attempt)
    raise RuntimeError(f"could not draw patient {subject} within {_MAX_ATTEMPTS} attempts (preset {preset.name})")


def draw_treated_patient(index: int, seed: int, preset: SynthPreset, anatomy: Anatomy) -> SynthPatient:
    """Draw treated patient ``index`` of the cohort drawn with ``seed`` (``treatment.py``): baseline scan,
    resection, radiotherapy with temozolomide, a post-operative scan and follow-ups every two to three months;
    the same growth law before and after. Raises RuntimeError when no draw fits."""
    rng = np.random.default_rng([seed, index, 3])
    subject = f"{index + 1:03d}"
    voxel_ml = anatomy.voxel_ml
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        n_visits = int(rng.integers(preset.visits[0], preset.visits[1] + 1))
        plan = draw_plan(rng, preset)
        offsets = visit_offsets(rng, plan, n_visits, preset)
        # Growth fast enough to regrow visibly over the follow-up, yet below max_volume_ml without treatment.
        window = (float(offsets[-1]), float(offsets[-1]))
        drawn = _draw_growth(rng, preset, window, preset.treated_rho)
        if drawn is None:
            continue
        d_white, rho = drawn
        start = _start_tumour(rng, preset, anatomy, d_white, rho)
        if start is None:
            continue
        baseline = datetime(2012, 1, 1) + timedelta(days=int(rng.integers(0, 12 * 365)))
        # Every visit shares the baseline's time of day give or take a few hours; events fall on whole days
        # after the baseline scan, so their dates are the baseline date plus those days.
        acq_times = [baseline + timedelta(days=int(d), minutes=int(rng.integers(8 * 60, 18 * 60))) for d in offsets]
        visit_days = [(t - acq_times[0]).total_seconds() / 86400.0 for t in acq_times]
        box_domain = anatomy.parenchyma[start.box]
        diffusivity = diffusivity_map(anatomy, d_white)[start.box]

        def make_solver(domain: np.ndarray, d: np.ndarray = diffusivity, r: float = rho) -> FisherKolmogorov:
            return FisherKolmogorov(d, domain, anatomy.spacing_mm, r, dt_safety=preset.dt_safety,
                                    max_dt_rho=preset.max_dt_rho)

        course = run_course(start.c, box_domain, make_solver, plan, visit_days, start.thresholds,
                            anatomy.spacing_mm)
        rows = ((acq, days, c, cavity) for acq, days, (c, cavity) in zip(acq_times, visit_days, course.visits,
                                                                         strict=True))
        visits = _visits_below(rows, start.thresholds, voxel_ml, preset.max_volume_ml)
        if len(visits) < min(3, preset.visits[0]):
            continue
        if visits[-1].whole_ml < preset.baseline_volume_ml[0]:
            continue  # the tumour must be seen to regrow within the follow-up
        if max(_edge_max(v.density_box) for v in visits) > start.thresholds.flair / 2.0:
            continue  # the tumour reached the edge of the solver box: the box would have clipped it
        patient = _patient(subject, d_white, rho, start, anatomy, visits, attempt)
        patient.plan, patient.events = plan, course.events
        return patient
    raise RuntimeError(f"could not draw treated patient {subject} within {_MAX_ATTEMPTS} attempts "
                       f"(preset {preset.name})")


def _draw_growth(
    rng: np.random.Generator, preset: SynthPreset, window: tuple[float, float],
    rho_range: tuple[float, float] | None = None,
) -> tuple[float, float] | None:
    """(D_w, rho) drawn log-uniform (rho from ``rho_range``, default ``preset.rho``) whose front advance
    2 sqrt(D_w rho) * window stays within ``preset.radial_growth_mm`` (window: shortest and longest observation
    span in days); None if none fits."""
    a_min, a_max = preset.radial_growth_mm
    for _ in range(2000):
        d_white = _log_uniform(rng, preset.d_white)
        rho = _log_uniform(rng, rho_range or preset.rho)
        speed = 2.0 * math.sqrt(d_white * rho)
        if a_min / window[1] <= speed <= a_max / window[0]:
            return d_white, rho
    return None


@dataclass
class _Start:
    """A tumour at its baseline scan: density ``c`` on the solver ``box`` and what grew it."""

    thresholds: Thresholds
    v0: float
    seed_voxel: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    solver: FisherKolmogorov
    c: np.ndarray
    silent_days: float


def _start_tumour(
    rng: np.random.Generator, preset: SynthPreset, anatomy: Anatomy, d_white: float, rho: float
) -> _Start | None:
    """Thresholds, baseline volume and seed drawn; the tumour grown silently from a dense 4 mm cluster until
    its visible volume reaches the baseline volume. None when the silent period is outside the preset's."""
    thresholds = Thresholds(
        flair=float(rng.uniform(*preset.flair_threshold)),
        enhancing=float(rng.uniform(*preset.enhancing_threshold)),
        necrosis=float(rng.uniform(*preset.necrosis_threshold)),
    )
    v0 = _log_uniform(rng, preset.baseline_volume_ml)
    seeds = np.argwhere((anatomy.wm >= 0.9) & anatomy.parenchyma)
    seed_voxel = tuple(int(v) for v in seeds[rng.integers(len(seeds))])
    box = _solver_box(anatomy, seed_voxel, preset.solver_half_width_mm)
    solver = FisherKolmogorov(
        diffusivity_map(anatomy, d_white)[box],
        anatomy.parenchyma[box],
        anatomy.spacing_mm,
        rho,
        dt_safety=preset.dt_safety,
        max_dt_rho=preset.max_dt_rho,
    )
    # The silent period starts from a dense cluster of radius 4 mm (0.27 ml), below the smallest visible
    # volume; a dense start gives a mature profile (c -> 1 behind the front) as real tumours show.
    grids = np.meshgrid(*[np.arange(b.start, b.stop) for b in box], indexing="ij")
    r2 = sum((g - s) ** 2 for g, s in zip(grids, seed_voxel, strict=True)) * anatomy.spacing_mm**2
    c = solver.initial((r2 <= max(4.0, anatomy.spacing_mm) ** 2).astype(np.float32))
    voxel_ml = anatomy.voxel_ml

    def visible(state: np.ndarray, thr: float = thresholds.flair, target: float = v0) -> bool:
        return np.count_nonzero(state >= thr) * voxel_ml >= target

    silent = solver.advance_until(c, visible, preset.max_silent_days)
    if silent is None or silent < preset.min_silent_days:
        return None
    return _Start(thresholds, v0, seed_voxel, box, solver, c, float(silent))  # type: ignore[arg-type]


def _grown(start: _Start, acq_times: list[datetime]) -> Iterator[tuple[datetime, float, np.ndarray, None]]:
    """(acquisition time, days since the first, density, no cavity) per visit of an untreated tumour, the solver
    advanced lazily to each visit (in place: consume each row before the next)."""
    t_now = 0.0
    for acq in acq_times:
        days = (acq - acq_times[0]).total_seconds() / 86400.0
        start.solver.advance(start.c, days - t_now)
        t_now = days
        yield acq, days, start.c, None


def _visits_below(rows: Iterable[tuple[datetime, float, np.ndarray, np.ndarray | None]], thresholds: Thresholds,
                  voxel_ml: float, max_ml: float) -> list[Visit]:
    """The visits of ``rows`` (acquisition time, days, density, cavity) in order, up to the first whose
    whole-tumour volume exceeds ``max_ml`` (ml), which is left out with every later one."""
    visits: list[Visit] = []
    for k, (acq, days, c, cavity) in enumerate(rows):
        visit = _visit(k, acq, days, c, cavity, thresholds, voxel_ml)
        if visit.whole_ml > max_ml:
            break
        visits.append(visit)
    return visits


def _visit(k: int, acq: datetime, days: float, c: np.ndarray, cavity: np.ndarray | None, thresholds: Thresholds,
           voxel_ml: float) -> Visit:
    return Visit(
        session=f"{k + 1:02d}",
        acq_time=acq,
        days=days,
        density_box=c.copy(),
        whole_ml=float(np.count_nonzero(c >= thresholds.flair) * voxel_ml),
        core_ml=float(np.count_nonzero(c >= thresholds.enhancing) * voxel_ml),
        burden_ml=float(c.sum(dtype=np.float64) * voxel_ml),
        cavity_box=None if cavity is None or not cavity.any() else cavity.copy(),
    )


def _patient(subject: str, d_white: float, rho: float, start: _Start, anatomy: Anatomy, visits: list[Visit],
             attempts: int) -> SynthPatient:
    seed_mm = (anatomy.affine @ np.array([*start.seed_voxel, 1.0]))[:3].tolist()
    return SynthPatient(
        subject=subject,
        d_white=d_white,
        rho=rho,
        seed_voxel=start.seed_voxel,
        seed_mm=[float(v) for v in seed_mm],
        thresholds=start.thresholds,
        silent_days=start.silent_days,
        baseline_volume_target_ml=start.v0,
        box=start.box,
        visits=visits,
        attempts=attempts,
    )
