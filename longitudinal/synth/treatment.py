"""Treatment of a synthetic glioma: resection, fractionated radiotherapy, temozolomide, then regrowth.

A treated patient's course, in days since the baseline scan (which comes first, as a diagnostic scan does):

1. Surgery on ``surgery_day``: the enhancing core (c >= the enhancing threshold; without one, the denser half
   of the visible tumour, c >= (flair + enhancing) / 2) and a margin of ``resection_margin_mm`` around it are removed. There c = 0 and the tissue
   becomes a fluid-filled cavity: it leaves the growth domain (no tumour cell lives in it, no flux enters it)
   and the images show it (``render.render_clean``: dark on T1c, nulled on FLAIR).
2. Radiotherapy from ``rt_start_day``: ``rt_fractions`` fractions of ``rt_dose_gy`` Gy on weekdays (about six
   weeks). Each fraction multiplies c inside the field (the visible tumour and the cavity at the first
   fraction, dilated by ``rt_margin_mm``) by the linear-quadratic surviving fraction
   ``exp(-(alpha d + beta d^2))``; between fractions the tumour grows.
3. Chemotherapy (temozolomide): while on drug the proliferation rate is ``rho (1 - chemo_effect)``. A course
   runs concomitant with radiotherapy and, for most patients, adjuvant courses follow.

Between and after the events the tumour grows by the same Fisher-Kolmogorov law (``solver.py``). Events fall on
whole days after the baseline scan, so their calendar dates are the baseline date plus those days.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from longitudinal.synth.config import SynthPreset
from longitudinal.synth.render import Thresholds
from longitudinal.synth.solver import FisherKolmogorov


@dataclass(frozen=True)
class TreatmentPlan:
    """One patient's treatment; days are whole days since the baseline scan.

    surgery_day; resection_margin_mm (mm). rt_start_day, rt_fractions, rt_dose_gy (Gy per fraction), alpha
    (1/Gy), beta (1/Gy^2), rt_margin_mm (mm). chemo_courses: (first day, last day) of each course on drug,
    both included; chemo_effect: fractional drop of rho on drug.
    """

    surgery_day: int
    resection_margin_mm: float
    rt_start_day: int
    rt_fractions: int
    rt_dose_gy: float
    alpha: float
    beta: float
    rt_margin_mm: float
    chemo_courses: tuple[tuple[int, int], ...]
    chemo_effect: float

    def fraction_days(self) -> list[int]:
        """Days of the radiotherapy fractions: five a week, Monday to Friday from the first one."""
        return [self.rt_start_day + 7 * (k // 5) + k % 5 for k in range(self.rt_fractions)]

    @property
    def rt_end_day(self) -> int:
        """Day of the last fraction."""
        return self.fraction_days()[-1]

    @property
    def surviving_fraction(self) -> float:
        """Linear-quadratic surviving fraction of one fraction: exp(-(alpha d + beta d^2))."""
        d = self.rt_dose_gy
        return math.exp(-(self.alpha * d + self.beta * d * d))

    def events(self) -> list[tuple[str, int, int | None]]:
        """(kind, first day, last day or None) of every event, in time order."""
        out: list[tuple[str, int, int | None]] = [("surgery", self.surgery_day, None),
                                                  ("radiotherapy", self.rt_start_day, self.rt_end_day)]
        out += [("chemotherapy", a, b) for a, b in self.chemo_courses]
        return sorted(out, key=lambda e: (e[1], e[0]))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chemo_courses"] = [list(c) for c in self.chemo_courses]
        d["surviving_fraction_per_fraction"] = self.surviving_fraction
        d["fraction_days"] = self.fraction_days()
        return d


def draw_plan(rng: np.random.Generator, preset: SynthPreset) -> TreatmentPlan:
    """A standard course: resection, radiotherapy with concomitant temozolomide, usually adjuvant courses."""

    def day(lo_hi: tuple[int, int]) -> int:
        return int(rng.integers(lo_hi[0], lo_hi[1] + 1))

    surgery = day(preset.surgery_day)
    rt_start = surgery + day(preset.rt_delay_days)
    alpha = float(math.exp(rng.uniform(math.log(preset.rt_alpha[0]), math.log(preset.rt_alpha[1]))))
    plan = TreatmentPlan(
        surgery_day=surgery,
        resection_margin_mm=float(rng.uniform(*preset.resection_margin_mm)),
        rt_start_day=rt_start,
        rt_fractions=preset.rt_fractions,
        rt_dose_gy=preset.rt_dose_gy,
        alpha=alpha,
        beta=alpha / preset.rt_alpha_beta_gy,
        rt_margin_mm=preset.rt_margin_mm,
        chemo_courses=(),
        chemo_effect=float(rng.uniform(*preset.chemo_effect)),
    )
    courses = [(rt_start, plan.rt_end_day)]
    if rng.random() < preset.adjuvant_probability:
        first = plan.rt_end_day + 28
        courses.append((first, first + 28 * preset.adjuvant_cycles - 1))
    return TreatmentPlan(**{**asdict(plan), "chemo_courses": tuple(courses)})


def visit_offsets(rng: np.random.Generator, plan: TreatmentPlan, n_visits: int, preset: SynthPreset) -> list[int]:
    """Whole days of a treated patient's scans: baseline, post-operative, then follow-ups every 2-3 months
    after radiotherapy."""
    days = [0, plan.surgery_day + int(rng.integers(preset.postop_scan_days[0], preset.postop_scan_days[1] + 1))]
    follow = plan.rt_end_day + int(rng.integers(preset.followup_delay_days[0], preset.followup_delay_days[1] + 1))
    while len(days) < n_visits:
        days.append(follow)
        follow += int(rng.integers(preset.followup_gap_days[0], preset.followup_gap_days[1] + 1))
    return days[:n_visits]


@dataclass
class EventTruth:
    """One event as simulated: density (solver box) right before and right after it (a course: before its
    first day, after its last one), and its parameters."""

    kind: str
    start_day: int
    end_day: int | None
    before: np.ndarray
    after: np.ndarray
    params: dict = field(default_factory=dict)


@dataclass
class Course:
    """A simulated treated course: per visit the density and the cavity mask (solver box), and the events."""

    visits: list[tuple[np.ndarray, np.ndarray]]
    events: list[EventTruth]


def _dilate(mask: np.ndarray, radius_mm: float, spacing_mm: float) -> np.ndarray:
    """Voxels within ``radius_mm`` of ``mask`` (Euclidean, voxel centres)."""
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=spacing_mm) <= radius_mm


def run_course(
    c: np.ndarray,
    domain: np.ndarray,
    make_solver: Callable[[np.ndarray], FisherKolmogorov],
    plan: TreatmentPlan,
    visit_days: list[float],
    thresholds: Thresholds,
    spacing_mm: float,
) -> Course:
    """Grow ``c`` (float32, solver box, the state at the baseline scan) through ``plan`` and record it at every
    visit day (days since the baseline scan). ``make_solver(domain)`` builds the solver for a growth domain
    (the parenchyma minus the cavity after surgery). ``c`` is advanced in place."""
    actions: list[tuple[float, int, str, int]] = [(float(t), 0, "visit", k) for k, t in enumerate(visit_days)]
    actions.append((float(plan.surgery_day), 1, "surgery", 0))
    fractions = plan.fraction_days()
    actions += [(float(d), 2, "fraction", i) for i, d in enumerate(fractions)]
    for j, (first, last) in enumerate(plan.chemo_courses):
        actions += [(float(first), 1, "chemo_on", j), (float(last + 1), 1, "chemo_off", j)]
    actions.sort(key=lambda a: (a[0], a[1], a[3]))

    solver = make_solver(domain)
    cavity = np.zeros(c.shape, dtype=bool)
    on_drug: set[int] = set()
    field_mask: np.ndarray | None = None
    visits: list[tuple[np.ndarray, np.ndarray]] = [None] * len(visit_days)  # type: ignore[list-item]
    events: dict[tuple[str, int], EventTruth] = {}
    t_now = 0.0
    for t, _, what, arg in actions:
        solver.advance(c, t - t_now, 1.0 - plan.chemo_effect if on_drug else 1.0)
        t_now = t
        if what == "visit":
            visits[arg] = (c.copy(), cavity.copy())
        elif what == "surgery":
            before = c.copy()
            core = c >= thresholds.enhancing
            if not core.any():  # no enhancing core yet: the densest part of the visible tumour
                core = c >= 0.5 * (thresholds.flair + thresholds.enhancing)
            if not core.any():
                core = c >= thresholds.flair
            cavity = _dilate(core, plan.resection_margin_mm, spacing_mm) & domain
            c[cavity] = 0.0
            solver = make_solver(domain & ~cavity)
            events[("surgery", 0)] = EventTruth("surgery", plan.surgery_day, None, before, c.copy(),
                                                {"resection_margin_mm": plan.resection_margin_mm,
                                                 "cavity_voxels": int(cavity.sum())})
        elif what == "fraction":
            if arg == 0:
                field_mask = _dilate((c >= thresholds.flair) | cavity, plan.rt_margin_mm, spacing_mm)
                events[("radiotherapy", 0)] = EventTruth(
                    "radiotherapy", plan.rt_start_day, plan.rt_end_day, c.copy(), c,
                    {"fractions": plan.rt_fractions, "dose_gy": plan.rt_dose_gy, "alpha_per_gy": plan.alpha,
                     "beta_per_gy2": plan.beta, "surviving_fraction": plan.surviving_fraction,
                     "field_margin_mm": plan.rt_margin_mm})
            c[field_mask] *= np.float32(plan.surviving_fraction)
            if arg == len(fractions) - 1:
                events[("radiotherapy", 0)].after = c.copy()
        elif what == "chemo_on":
            on_drug.add(arg)
            first, last = plan.chemo_courses[arg]
            events[("chemotherapy", arg)] = EventTruth("chemotherapy", first, last, c.copy(), c,
                                                       {"rho_factor_on_drug": 1.0 - plan.chemo_effect})
        else:  # chemo_off
            on_drug.discard(arg)
            events[("chemotherapy", arg)].after = c.copy()
    ordered = sorted(events.values(), key=lambda e: (e.start_day, e.kind))
    return Course(visits=visits, events=ordered)
