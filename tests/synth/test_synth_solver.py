"""The Fisher-Kolmogorov solver against problems with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from longitudinal.synth.solver import FisherKolmogorov


def _front(c: np.ndarray, x: np.ndarray, level: float = 0.5) -> float:
    """Position where a decreasing profile crosses ``level`` (linear interpolation, mm)."""
    i = int(np.argmax(c < level))
    return float(x[i - 1] + (c[i - 1] - level) / (c[i - 1] - c[i]) * (x[i] - x[i - 1]))


@pytest.mark.parametrize(
    ("d", "rho", "h"),
    [
        (0.1, 0.05, 0.5),  # v = 0.141 mm/day
        (1.0, 0.01, 1.0),  # v = 0.2 mm/day, diffusion-limited step
        (0.05, 0.2, 0.25),  # v = 0.2 mm/day, reaction-limited step
    ],
)
def test_travelling_wave_speed_is_two_sqrt_d_rho(d: float, rho: float, h: float) -> None:
    # Known answer: a step initial condition develops a front moving at 2 sqrt(D rho) (Fisher-KPP).
    v = 2.0 * math.sqrt(d * rho)
    t_settle, t_measure = 60.0 / rho, 60.0 / rho
    length = v * (t_settle + t_measure) * 1.3 + 20.0 * math.sqrt(d / rho)
    n = int(length / h)
    x = np.arange(n) * h
    solver = FisherKolmogorov(np.full(n, d), np.ones(n, bool), h, rho)
    c = solver.initial((x < 5.0).astype(float))
    solver.advance(c, t_settle)
    f1 = _front(c, x)
    solver.advance(c, t_measure)
    f2 = _front(c, x)
    speed = (f2 - f1) / t_measure
    assert speed == pytest.approx(v, rel=0.10)
    assert c.min() >= 0.0 and c.max() <= 1.0


def test_step_respects_the_stated_stability_limit() -> None:
    d = np.full((8, 8, 8), 0.5)
    solver = FisherKolmogorov(d, np.ones(d.shape, bool), 2.0, 0.01, dt_safety=1.0, max_dt_rho=10.0)
    assert solver.dt_diffusion == pytest.approx(2.0**2 / (2 * 3 * 0.5))
    assert solver.dt == pytest.approx(solver.dt_diffusion)
    fast = FisherKolmogorov(d, np.ones(d.shape, bool), 2.0, 0.2, dt_safety=1.0, max_dt_rho=0.1)
    assert fast.dt == pytest.approx(0.1 / 0.2)


def test_no_flux_boundary_conserves_mass_and_nothing_leaks() -> None:
    rng = np.random.default_rng(0)
    shape = (20, 20, 20)
    domain = np.zeros(shape, bool)
    domain[4:16, 3:17, 5:15] = True
    d = rng.uniform(0.05, 1.0, size=shape)
    # rho so small that the reaction adds nothing measurable: pure diffusion must conserve mass exactly.
    solver = FisherKolmogorov(d, domain, 1.0, 1e-12)
    c0 = np.zeros(shape)
    c0[8:10, 8:10, 8:10] = 1.0
    c = solver.initial(c0)
    before = c.sum(dtype=np.float64)
    solver.advance(c, 200.0)
    assert c.sum(dtype=np.float64) == pytest.approx(before, rel=1e-4)
    assert np.all(c[~domain] == 0.0)
    assert c[domain].min() > 0.0  # it spread over the whole (connected) domain


def test_burden_grows_monotonically_and_stays_bounded() -> None:
    shape = (24, 24, 24)
    domain = np.ones(shape, bool)
    domain[:, :, :3] = False
    solver = FisherKolmogorov(np.full(shape, 0.3), domain, 2.0, 0.05)
    c0 = np.zeros(shape)
    c0[12, 12, 12] = 0.3
    c = solver.initial(c0)
    burden = []
    for _ in range(30):
        solver.advance(c, 10.0)
        burden.append(c.sum(dtype=np.float64))
    assert np.all(np.diff(burden) > 0)
    assert 0.0 <= c.min() and c.max() <= 1.0


def test_radially_symmetric_growth_stays_symmetric() -> None:
    # A seed at the centre of a homogeneous cube must grow the same way along every axis.
    n = 31
    solver = FisherKolmogorov(np.full((n, n, n), 0.2), np.ones((n, n, n), bool), 1.0, 0.05)
    c0 = np.zeros((n, n, n))
    c0[15, 15, 15] = 0.5
    c = solver.initial(c0)
    solver.advance(c, 100.0)
    np.testing.assert_allclose(c[15, 15, :], c[15, :, 15], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(c[15, 15, :], c[:, 15, 15], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(c[15, 15, :], c[15, 15, ::-1], rtol=1e-5, atol=1e-7)


def test_invalid_problem_reports_every_fault_at_once() -> None:
    with pytest.raises(ValueError) as err:
        FisherKolmogorov(np.ones((4, 4)), np.ones((4, 5), bool), -1.0, 0.0, dt_safety=2.0)
    text = str(err.value)
    for fragment in ("shape", "spacing_mm", "rho", "dt_safety"):
        assert fragment in text
