"""Batched Fisher-Kolmogorov solver in torch: dc/dt = div(D(x) grad c) + rho c (1 - c), many parameter sets at once.

The discretisation is the synthetic cohort's (``longitudinal.synth.solver``), vectorised over a leading batch of
P parameter sets so a personalised fit simulates a whole grid of (D, rho) in one pass, on CUDA when present:

- finite volumes on a masked Cartesian grid: the flux through the face between two voxels is
  D_face (c_j - c_i) / h with D_face the harmonic mean of the two voxel diffusivities, and D_face = 0 when either
  voxel lies outside the domain (the brain). That zero IS the no-flux boundary, so diffusion conserves mass
  exactly and only the reaction term changes the total burden;
- Lie splitting: an explicit Euler diffusion step, then the exact logistic solution over the same step.

Stability: one step for the whole batch, dt <= dt_safety / (2 * Dmax * sum_a 1/h_a^2) (the explicit diffusion
limit: every update is then a convex combination, so c stays in [0, 1]), and dt * rho_max <= max_dt_rho for the
splitting accuracy. Lengths are mm, times days, D mm^2/day, rho 1/day.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class BatchedFisherKolmogorov:
    """P parameter sets on one grid.

    diffusivity: [P, *grid] (or [*grid], shared) voxel D in mm^2/day; domain: [*grid] bool, shared by every set
    (c is 0 outside, no flux crosses its surface); spacing_mm: one number or one per grid axis; rho: [P] (or a float) in
    1/day. Raises ValueError listing every problem.
    """

    def __init__(self, diffusivity: Tensor, domain: Tensor, spacing_mm: float | Sequence[float], rho: Tensor | float,
                 dt_safety: float = 0.9, max_dt_rho: float = 0.1) -> None:
        rho_t = torch.as_tensor(rho, dtype=torch.float32, device=diffusivity.device).reshape(-1)
        d = diffusivity.float()
        grid_ndim = domain.ndim
        if d.ndim == grid_ndim:
            d = d.expand(rho_t.numel(), *d.shape)
        problems = []
        spacing = [float(spacing_mm)] * grid_ndim if isinstance(spacing_mm, int | float) else \
            [float(s) for s in spacing_mm]
        if len(spacing) != grid_ndim or any(s <= 0 for s in spacing):
            problems.append(f"spacing_mm must be > 0, one per grid axis ({grid_ndim}), got {spacing_mm}")
        if tuple(d.shape[1:]) != tuple(domain.shape[-grid_ndim:]):
            problems.append(f"diffusivity grid {tuple(d.shape[1:])} != domain grid {tuple(domain.shape[-grid_ndim:])}")
        if rho_t.numel() not in (1, d.shape[0]):
            problems.append(f"rho holds {rho_t.numel()} values for {d.shape[0]} parameter sets")
        if bool((d < 0).any()):
            problems.append("diffusivity must be >= 0")
        if bool((rho_t < 0).any()):
            problems.append("rho must be >= 0")
        if not 0 < dt_safety <= 1 or not max_dt_rho > 0:
            problems.append(f"need 0 < dt_safety <= 1 and max_dt_rho > 0, got {dt_safety}, {max_dt_rho}")
        if problems:
            raise ValueError("invalid Fisher-Kolmogorov problem: " + "; ".join(problems))
        self.n = int(d.shape[0])
        self.ndim = grid_ndim
        self.rho = rho_t.expand(self.n) if rho_t.numel() == 1 else rho_t
        self.domain = domain.bool().expand(self.n, *d.shape[1:])
        d = torch.where(self.domain, d, torch.zeros((), device=d.device))
        # Face coefficients D_face / h^2 (1/day) per axis; the harmonic mean keeps a low-D voxel a barrier.
        self._coef: list[Tensor] = []
        for axis in range(grid_ndim):
            a, b = d.narrow(axis + 1, 0, d.shape[axis + 1] - 1), d.narrow(axis + 1, 1, d.shape[axis + 1] - 1)
            harm = torch.where((a > 0) & (b > 0), 2 * a * b / (a + b).clamp_min(1e-30), torch.zeros((), device=d.device))
            self._coef.append(harm / spacing[axis] ** 2)
        d_max = float(d.max()) if d.numel() else 0.0
        inv_h2 = sum(1.0 / s**2 for s in spacing)
        self.dt_diffusion = math.inf if d_max == 0 else 1.0 / (2.0 * d_max * inv_h2)
        rho_max = float(self.rho.max()) if self.rho.numel() else 0.0
        self.dt = min(dt_safety * self.dt_diffusion, max_dt_rho / rho_max if rho_max > 0 else math.inf)
        if not math.isfinite(self.dt):
            self.dt = 1.0  # nothing diffuses or grows: any step is exact

    def initial(self, c0: Tensor) -> Tensor:
        """[P, *grid] float32: ``c0`` ([*grid] or [P, *grid]) clipped to [0, 1] and zeroed outside the domain."""
        c = c0.float().clamp(0, 1).expand_as(self.domain).clone()
        return torch.where(self.domain, c, torch.zeros((), device=c.device))

    def step(self, c: Tensor, dt: float, rho_scale: float = 1.0) -> Tensor:
        """``c`` [P, *grid] advanced by ``dt`` days (dt <= self.dt), in place; returns it. ``rho_scale`` in [0, 1]
        multiplies every set's proliferation rate for this step (a cytostatic drug; 1: untreated)."""
        lap = torch.zeros_like(c)
        for axis, coef in enumerate(self._coef):
            n = c.shape[axis + 1]
            flux = (c.narrow(axis + 1, 1, n - 1) - c.narrow(axis + 1, 0, n - 1)) * coef
            lap.narrow(axis + 1, 0, n - 1).add_(flux)
            lap.narrow(axis + 1, 1, n - 1).sub_(flux)
        c.add_(lap, alpha=dt)
        # Exact logistic over dt: c <- c e / (1 + c (e - 1)), e = exp(rho dt) per parameter set.
        e = torch.exp(self.rho * (dt * rho_scale)).view(-1, *([1] * self.ndim))
        c.mul_(e).div_(1 + c / e * (e - 1))
        return c

    def advance(self, c: Tensor, duration: float, rho_scale: float = 1.0) -> Tensor:
        """``c`` advanced in place by ``duration`` days (>= 0) in equal steps no longer than ``self.dt``, the
        proliferation rate scaled by ``rho_scale`` (in [0, 1]; 1: untreated)."""
        if duration < 0:
            raise ValueError(f"duration must be >= 0 days, got {duration}")
        if not 0.0 <= rho_scale <= 1.0:
            raise ValueError(f"rho_scale must be in [0, 1], got {rho_scale}")
        if duration == 0:
            return c
        n = max(1, math.ceil(duration / self.dt - 1e-9))
        for _ in range(n):
            self.step(c, duration / n, rho_scale)
        return c

    def snapshots(self, c0: Tensor, days: Sequence[float]) -> Tensor:
        """[T, P, *grid]: the density at each of ``days`` (>= 0, days after the state ``c0``), in time order."""
        order = sorted(range(len(days)), key=lambda i: float(days[i]))
        if order and float(days[order[0]]) < 0:
            raise ValueError(f"snapshot days must be >= 0, got {min(days)}")
        c, now = self.initial(c0), 0.0
        out: list[Tensor | None] = [None] * len(days)
        for i in order:
            self.advance(c, float(days[i]) - now)
            now = float(days[i])
            out[i] = c.clone()
        return torch.stack(out)  # type: ignore[arg-type]
