"""Known treatment events inside the ``fk`` simulation: resection, fractionated radiotherapy, chemotherapy.

Days are days since the patient's baseline, as in ``Conditions.treatments``. The effects follow the synthetic
cohort's treatment model (``longitudinal.synth.treatment``), with its parameters fixed at documented values
(``TreatmentEffects``) since a patient's own are unknown:

- timing: an event starting on day s acts inside a simulated window [a, b) when a <= s < b. A scan taken on an
  event's day is taken before it (the diagnostic scan precedes surgery, as in the synthetic cohort), so an event
  on or after the last snapshot day changes nothing, bit for bit: the simulation stops at its last snapshot;
- surgery (day s): the enhancing core (c >= u_e; without one the denser half of the visible tumour,
  c >= (u_w + u_e) / 2, then the visible tumour, c >= u_w), dilated by ``resection_margin_mm``, is removed:
  c = 0 there and the voxels leave the growth domain (their diffusivity becomes 0, so no flux enters the cavity
  and the logistic term keeps 0 at 0). Every parameter set has its own density, hence its own cavity;
- radiotherapy [s, e]: ``rt_fractions`` fractions of ``rt_dose_gy / rt_fractions`` Gy evenly spaced from day s
  to day e, both included (without an end: over ``RT_DEFAULT_SPAN_DAYS``, the span of 30 weekday fractions).
  Each fraction multiplies c inside the field by the linear-quadratic surviving fraction
  exp(-(alpha d + beta d^2)); the field is the visible tumour (c >= u_w) and any cavity at the first fraction
  inside the window, dilated by ``rt_margin_mm``. Fractions before the window are already in its first scan;
- chemotherapy [s, e]: rho is multiplied by (1 - ``chemo_effect``) from day s to the end of day e (day e + 1);
  a course begun before the window acts from the window's start.

Dilations (resection margin, radiotherapy field) alternate 6- and 26-neighbour steps of the mean voxel size, an
octagonal approximation of a Euclidean ball (the crop is isotropic). Pure torch; the device follows the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from longitudinal.models.fk_solver import BatchedFisherKolmogorov

# 30 weekday fractions (Monday to Friday) from a Monday end on day 39: a course recorded without an end date.
RT_DEFAULT_SPAN_DAYS = 39.0
Event = tuple[float, float, str]  # (start day, end day, kind); end = start without an end


@dataclass(frozen=True)
class TreatmentEffects:
    """How known events act. resection_margin_mm (mm) around the resected core; rt_dose_gy: total dose (Gy) in
    rt_fractions fractions; rt_alpha (1/Gy) and rt_alpha_beta_gy (Gy; beta = alpha / (alpha/beta)) of the
    linear-quadratic model; rt_margin_mm (mm) of the irradiated field around the visible tumour; chemo_effect:
    fractional drop of rho on drug. Defaults: the standard 60 Gy in 30 fractions (the synthetic cohort's), and
    the middle of the synthetic cohort's ranges (margin 4-8 mm, alpha 0.02-0.08 /Gy log-uniform with
    alpha/beta 10 Gy, field margin 20 mm, chemo effect 0.3-0.8): fixed priors, never fitted to the patients
    reported on."""

    resection_margin_mm: float = 6.0
    rt_dose_gy: float = 60.0
    rt_fractions: int = 30
    rt_alpha: float = 0.04
    rt_alpha_beta_gy: float = 10.0
    rt_margin_mm: float = 20.0
    chemo_effect: float = 0.55

    @property
    def surviving_fraction(self) -> float:
        """Linear-quadratic surviving fraction of one fraction: exp(-(alpha d + beta d^2)), d Gy per fraction."""
        d = self.rt_dose_gy / self.rt_fractions
        beta = self.rt_alpha / self.rt_alpha_beta_gy
        return math.exp(-(self.rt_alpha * d + beta * d * d))

    def problems(self) -> list[str]:
        out = []
        if self.resection_margin_mm < 0 or self.rt_margin_mm < 0:
            out.append("resection_margin_mm and rt_margin_mm must be >= 0")
        if self.rt_dose_gy < 0 or self.rt_fractions < 1 or self.rt_alpha < 0 or self.rt_alpha_beta_gy <= 0:
            out.append("need rt_dose_gy >= 0, rt_fractions >= 1, rt_alpha >= 0 and rt_alpha_beta_gy > 0")
        if not 0 <= self.chemo_effect <= 1:
            out.append(f"chemo_effect must be in [0, 1], got {self.chemo_effect}")
        return out

    def fraction_days(self, start: float, end: float) -> list[float]:
        """Days of the fractions of a course from ``start`` to ``end`` (module docstring)."""
        span = end - start if end > start else RT_DEFAULT_SPAN_DAYS
        n = self.rt_fractions
        return [start + span * k / (n - 1) for k in range(n)] if n > 1 else [start]


def dilate(mask: Tensor, radius_mm: float, spacing_mm: Sequence[float], first_step: int = 0) -> Tensor:
    """``mask`` [P, D, H, W] bool grown by ``radius_mm`` (module docstring: octagonal steps of the mean voxel
    size); the same shape, bool. ``first_step``: the parity of the first step (even: a 6-neighbour one), for
    callers growing a mask one step at a time."""
    steps = int(round(radius_mm / (sum(float(s) for s in spacing_mm) / len(spacing_mm))))
    m = mask[:, None].float()
    for k in range(first_step, first_step + steps):
        if k % 2 == 0:  # 6-neighbour step: the union of one-voxel moves along each axis
            m = torch.maximum(torch.maximum(torch.nn.functional.max_pool3d(m, (3, 1, 1), 1, (1, 0, 0)),
                                            torch.nn.functional.max_pool3d(m, (1, 3, 1), 1, (0, 1, 0))),
                              torch.nn.functional.max_pool3d(m, (1, 1, 3), 1, (0, 0, 1)))
        else:  # 26-neighbour step
            m = torch.nn.functional.max_pool3d(m, 3, 1, 1)
    return m[:, 0] > 0


def _resected(c: Tensor, alive: Tensor, u_w: float, u_e: float, margin_mm: float, spacing_mm: Sequence[float]
              ) -> Tensor:
    """[P, *grid] bool cavity of a surgery on the density ``c`` [P, *grid] (module docstring); ``alive``: the
    voxels still in the growth domain."""
    core = c >= u_e
    for level in ((u_w + u_e) / 2, u_w):
        # A set without an enhancing core loses the densest part of its visible tumour instead.
        empty = ~core.flatten(1).any(1)
        core = torch.where(empty.view(-1, *([1] * (c.ndim - 1))), c >= level, core)
    return dilate(core, margin_mm, spacing_mm) & alive


def simulate(
    make_solver: Callable[[Tensor], BatchedFisherKolmogorov],
    diffusivity: Tensor,
    c0: Tensor,
    start: float,
    days: Sequence[float],
    events: Sequence[Event],
    effects: TreatmentEffects,
    thresholds: tuple[float, float],
    spacing_mm: Sequence[float],
) -> Tensor:
    """[T, P, *grid] densities at ``days`` (absolute days since baseline, each >= ``start``) of a course from
    ``c0`` ([P, *grid] or [*grid], the state on day ``start``) under the known ``events`` (module docstring).

    diffusivity: [P, *grid] voxel D (mm^2/day; 0 outside the domain); make_solver(diffusivity) builds the solver
    for it (rebuilt after a surgery, whose cavity leaves the domain); thresholds: (u_w, u_e), the densities at
    the visible edges of the whole tumour and of the enhancing core; spacing_mm: the (z, y, x) voxel size.
    """
    if any(float(t) < start for t in days):
        raise ValueError(f"snapshot days must be >= the start day {start}, got {list(days)}")
    u_w, u_e = thresholds
    actions: list[tuple[float, int, int, str]] = [(float(t), 0, i, "snapshot") for i, t in enumerate(days)]
    for j, (first, last, kind) in enumerate(sorted(events)):
        if kind == "surgery" and first >= start:
            actions.append((float(first), 1, j, "surgery"))
        elif kind == "chemotherapy" and last + 1 > start:
            actions += [(max(float(first), start), 1, j, "chemo_on"), (float(last) + 1, 1, j, "chemo_off")]
        elif kind == "radiotherapy":
            actions += [(t, 2, j, "fraction") for t in effects.fraction_days(float(first), float(last))
                        if t >= start]
    actions.sort()
    solver = make_solver(diffusivity)
    c = solver.initial(c0)
    alive = diffusivity > 0
    cavity = torch.zeros_like(alive)
    field: dict[int, Tensor] = {}
    on_drug: set[int] = set()
    out: list[Tensor | None] = [None] * len(days)
    left, now = len(days), float(start)
    for t, _, j, what in actions:
        if left == 0:
            break  # nothing after the last snapshot may act
        solver.advance(c, t - now, 1.0 - effects.chemo_effect if on_drug else 1.0)
        now = t
        if what == "snapshot":
            out[j] = c.clone()
            left -= 1
        elif what == "surgery":
            cut = _resected(c, alive, u_w, u_e, effects.resection_margin_mm, spacing_mm)
            cavity, alive = cavity | cut, alive & ~cut
            c.masked_fill_(cut, 0.0)
            solver = make_solver(torch.where(alive, diffusivity, torch.zeros((), device=diffusivity.device)))
        elif what == "fraction":
            if j not in field:  # the field is planned at the course's first fraction inside the window
                field[j] = dilate((c >= u_w) | cavity, effects.rt_margin_mm, spacing_mm)
            c.mul_(torch.where(field[j], effects.surviving_fraction, 1.0))
        elif what == "chemo_on":
            on_drug.add(j)
        else:
            on_drug.discard(j)
    return torch.stack(out)  # type: ignore[arg-type]
