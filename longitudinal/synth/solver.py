"""Fisher-Kolmogorov growth, dc/dt = div(D grad c) + rho c (1 - c), on a masked Cartesian grid.

Finite volumes: the flux through the face between two neighbouring voxels is D_face (c_j - c_i) / h, with
D_face the harmonic mean of the two voxel diffusivities, and D_face = 0 when either voxel lies outside the
domain. That zero face diffusivity IS the no-flux boundary condition, and it makes the total diffusive mass
change exactly zero, so the total burden sum(c) dV changes only through the reaction term (which is >= 0).

Time stepping is Lie splitting: an explicit Euler diffusion step, then the exact solution of the logistic
ODE over the same step.

Stability (stated, and enforced in ``FisherKolmogorov.dt``):
  * explicit diffusion: dt <= 1 / (2 * Dmax * sum_a 1/h_a^2), i.e. dt <= h^2 / (2 * ndim * Dmax) on an
    isotropic grid. Under it every update is a convex combination of a voxel and its neighbours, so c stays
    in [0, 1] and no oscillation can grow (discrete maximum principle);
  * reaction: the exact logistic map sends [0, 1] into [0, 1] for any dt, so it imposes no stability limit;
    dt * rho <= ``max_dt_rho`` (0.1 by default) keeps the splitting error small (first order in dt * rho).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def _face_slices(ndim: int, axis: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    lo = [slice(None)] * ndim
    hi = [slice(None)] * ndim
    lo[axis] = slice(None, -1)
    hi[axis] = slice(1, None)
    return tuple(lo), tuple(hi)


class FisherKolmogorov:
    """Solver on a fixed grid for one (D field, rho) pair.

    diffusivity: voxel D (mm^2/day), any ndim, float; values outside ``domain`` are ignored.
    domain: bool, same shape; c is 0 outside and no flux crosses its surface.
    spacing_mm: voxel size, one number (isotropic) or one per axis (mm).
    rho: proliferation rate (1/day).
    dt_safety: fraction of the explicit diffusion limit used as the step (< 1).
    max_dt_rho: upper bound on dt * rho.
    """

    def __init__(
        self,
        diffusivity: np.ndarray,
        domain: np.ndarray,
        spacing_mm: float | Sequence[float],
        rho: float,
        dt_safety: float = 0.9,
        max_dt_rho: float = 0.1,
    ) -> None:
        diffusivity = np.asarray(diffusivity, dtype=np.float64)
        domain = np.asarray(domain, dtype=bool)
        problems: list[str] = []
        if diffusivity.shape != domain.shape:
            problems.append(f"diffusivity shape {diffusivity.shape} != domain shape {domain.shape}")
        spacing = (
            [float(spacing_mm)] * diffusivity.ndim
            if np.isscalar(spacing_mm)
            else [float(s) for s in spacing_mm]  # type: ignore[union-attr]
        )
        if len(spacing) != diffusivity.ndim or any(s <= 0 for s in spacing):
            problems.append(f"spacing_mm must be > 0, one per axis ({diffusivity.ndim}), got {spacing_mm}")
        if np.any(diffusivity[domain] < 0) if diffusivity.shape == domain.shape else False:
            problems.append("diffusivity must be >= 0 inside the domain")
        if not rho > 0:
            problems.append(f"rho must be > 0, got {rho}")
        if not 0 < dt_safety <= 1:
            problems.append(f"dt_safety must be in (0, 1], got {dt_safety}")
        if not max_dt_rho > 0:
            problems.append(f"max_dt_rho must be > 0, got {max_dt_rho}")
        if problems:
            raise ValueError("invalid Fisher-Kolmogorov problem:\n  " + "\n  ".join(problems))

        self.shape = diffusivity.shape
        self.domain = domain
        self.rho = float(rho)
        self.spacing = spacing
        d = np.where(domain, diffusivity, 0.0)
        # Face coefficients D_face / h^2 (1/day), float32 for speed; harmonic mean keeps a low-D voxel a barrier.
        self._coef: list[np.ndarray] = []
        for axis in range(d.ndim):
            lo, hi = _face_slices(d.ndim, axis)
            a, b = d[lo], d[hi]
            with np.errstate(invalid="ignore", divide="ignore"):
                harm = np.where((a > 0) & (b > 0), 2.0 * a * b / (a + b), 0.0)
            self._coef.append((harm / spacing[axis] ** 2).astype(np.float32))
        d_max = float(d.max()) if d.size else 0.0
        inv_h2 = sum(1.0 / s**2 for s in spacing)
        # Explicit diffusion stability: dt <= 1 / (2 * Dmax * sum 1/h^2) = h^2 / (2 * ndim * Dmax) if isotropic.
        self.dt_diffusion = math.inf if d_max == 0 else 1.0 / (2.0 * d_max * inv_h2)
        self.dt = min(dt_safety * self.dt_diffusion, max_dt_rho / self.rho)
        self._bufs = [np.empty(c.shape, dtype=np.float32) for c in self._coef]
        self._lap = np.empty(self.shape, dtype=np.float32)

    def initial(self, c0: np.ndarray) -> np.ndarray:
        """A float32 copy of ``c0`` clipped to [0, 1] and zeroed outside the domain."""
        c0 = np.asarray(c0)
        if c0.shape != self.shape:
            raise ValueError(f"c0 shape {c0.shape} != grid shape {self.shape}")
        return np.where(self.domain, np.clip(c0, 0.0, 1.0), 0.0).astype(np.float32)

    def step(self, c: np.ndarray, dt: float, rho_scale: float = 1.0) -> None:
        """Advance ``c`` (float32, grid shape) in place by ``dt`` days (dt <= self.dt for stability).

        rho_scale: multiplies the proliferation rate for this step (in [0, 1]: e.g. a cytostatic drug)."""
        lap = self._lap
        lap.fill(0.0)
        for axis, (coef, buf) in enumerate(zip(self._coef, self._bufs, strict=True)):
            lo, hi = _face_slices(c.ndim, axis)
            np.subtract(c[hi], c[lo], out=buf)
            buf *= coef
            lap[lo] += buf
            lap[hi] -= buf
        lap *= dt
        c += lap
        # Exact logistic over dt: c <- c e / (1 + c (e - 1)).
        e = math.exp(self.rho * rho_scale * dt)
        np.multiply(c, e - 1.0, out=lap)
        lap += 1.0
        c *= e
        c /= lap

    def advance(self, c: np.ndarray, duration: float, rho_scale: float = 1.0) -> np.ndarray:
        """Advance ``c`` in place by ``duration`` days (>= 0) in equal steps no longer than ``self.dt``, with the
        proliferation rate scaled by ``rho_scale`` (in [0, 1]; 1: untreated)."""
        if not 0.0 <= rho_scale <= 1.0:
            raise ValueError(f"rho_scale must be in [0, 1], got {rho_scale}")
        if duration < 0:
            raise ValueError(f"duration must be >= 0 days, got {duration}")
        if duration == 0:
            return c
        n = max(1, math.ceil(duration / self.dt - 1e-9))
        h = duration / n
        for _ in range(n):
            self.step(c, h, rho_scale)
        return c

    def advance_until(
        self, c: np.ndarray, stop: Callable[[np.ndarray], bool], max_days: float
    ) -> float | None:
        """Step ``c`` in place until ``stop(c)`` holds; return the elapsed days, or None past ``max_days``."""
        t = 0.0
        while t <= max_days:
            if stop(c):
                return t
            self.step(c, self.dt)
            t += self.dt
        return None
