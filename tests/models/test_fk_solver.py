"""The batched torch Fisher-Kolmogorov solver against known answers: the travelling-wave speed 2 sqrt(D rho), mass
conservation with rho = 0 behind no-flux borders, convergence under grid refinement, and agreement with the
synthetic cohort's solver."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longitudinal.models.fk_solver import BatchedFisherKolmogorov
from longitudinal.synth.solver import FisherKolmogorov


def _front(c: torch.Tensor, h: float, level: float = 0.5) -> torch.Tensor:
    """Position (mm) where each row of c [P, N] first drops below ``level``, linearly interpolated."""
    out = []
    for row in c:
        i = int(torch.nonzero(row < level)[0])
        a, b = float(row[i - 1]), float(row[i])
        out.append((i - 1 + (a - level) / (a - b)) * h)
    return torch.tensor(out, dtype=torch.float64)


def test_travelling_wave_speed_is_two_sqrt_d_rho_for_every_parameter_set() -> None:
    d = torch.tensor([0.1, 0.05])  # mm^2/day
    rho = torch.tensor([0.05, 0.1])  # 1/day
    h, n = 0.5, 260
    solver = BatchedFisherKolmogorov(d[:, None].expand(2, n), torch.ones(n, dtype=torch.bool), h, rho)
    c0 = (torch.arange(n) * h < 5.0).float()
    t1, t2 = 300.0, 600.0
    snaps = solver.snapshots(c0, [t1, t2])
    speed = (_front(snaps[1], h) - _front(snaps[0], h)) / (t2 - t1)
    exact = 2 * torch.sqrt(d * rho).double()
    # A pulled front approaches 2 sqrt(D rho) from below with the logarithmic (Bramson) delay 3/2 sqrt(D/rho) ln t.
    bramson = exact - 1.5 * torch.sqrt(d / rho).double() * math.log(t2 / t1) / (t2 - t1)
    assert torch.allclose(speed, bramson, rtol=0.03), (speed, bramson)
    assert torch.all((speed - exact).abs() / exact < 0.06), (speed, exact)


def test_mass_is_conserved_without_growth_and_nothing_leaks_out_of_the_domain() -> None:
    g = torch.Generator().manual_seed(0)
    grid = (12, 14, 10)
    domain = torch.rand(grid, generator=g) > 0.3
    domain[0], domain[-1] = False, False
    d = 0.05 + torch.rand(3, *grid, generator=g)  # heterogeneous D per parameter set
    solver = BatchedFisherKolmogorov(d, domain, (1.0, 1.5, 2.0), torch.zeros(3))
    c = solver.initial(torch.rand(grid, generator=g))
    mass0 = c.double().sum((1, 2, 3))
    solver.advance(c, 200.0)
    assert torch.allclose(c.double().sum((1, 2, 3)), mass0, rtol=1e-5)
    assert float(c[:, ~domain].abs().max()) == 0.0
    assert float(c.min()) >= 0.0 and float(c.max()) <= 1.0


def _blob(h: float, length: float = 40.0, days: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    n = int(round(length / h))
    x = (np.arange(n) + 0.5) * h
    c0 = torch.from_numpy(0.8 * np.exp(-((x - length / 2) ** 2) / 8.0)).float()
    # Small time steps, so the spatial error dominates what is measured.
    solver = BatchedFisherKolmogorov(torch.full((1, n), 0.2), torch.ones(n, dtype=torch.bool), h,
                                     torch.tensor([0.03]), dt_safety=0.1, max_dt_rho=0.001)
    return x, solver.snapshots(c0, [days])[0, 0].double().numpy()


def test_the_solution_converges_under_grid_refinement() -> None:
    h_ref = 0.125
    _, ref = _blob(h_ref)
    errors = []
    for h in (1.0, 0.5, 0.25):
        _, c = _blob(h)
        # Finite volumes: a coarse cell holds the mean of the fine cells it covers.
        k = int(round(h / h_ref))
        errors.append(float(np.abs(c - ref.reshape(-1, k).mean(1)).max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < errors[0] / 2 and errors[2] < errors[1] / 2, errors


@pytest.mark.parametrize("rho", [0.02, 0.1])
def test_it_agrees_with_the_synthetic_cohorts_solver(rho: float) -> None:
    g = np.random.default_rng(3)
    grid = (10, 12, 9)
    domain = g.random(grid) > 0.2
    d = 0.02 + 0.3 * g.random(grid)
    c0 = (g.random(grid) > 0.9).astype(np.float32)
    ref = FisherKolmogorov(d, domain, 2.0, rho)
    c_ref = ref.advance(ref.initial(c0), 90.0)
    solver = BatchedFisherKolmogorov(torch.from_numpy(d)[None], torch.from_numpy(domain), 2.0, torch.tensor([rho]))
    assert solver.dt == pytest.approx(ref.dt, rel=1e-6)
    c = solver.advance(solver.initial(torch.from_numpy(c0)), 90.0)[0].numpy()
    np.testing.assert_allclose(c, c_ref, atol=2e-5)


def test_bad_problems_are_reported_together() -> None:
    with pytest.raises(ValueError) as info:
        BatchedFisherKolmogorov(-torch.ones(2, 4, 4), torch.ones(5, 4, dtype=torch.bool), (1.0,), torch.ones(3))
    msg = str(info.value)
    assert "spacing_mm" in msg and "grid" in msg and "rho holds 3" in msg and ">= 0" in msg


def test_rho_scale_slows_growth_as_a_lower_rate_would() -> None:
    g = torch.Generator().manual_seed(1)
    grid = (8, 9, 10)
    d, c0 = 0.1 + torch.rand(2, *grid, generator=g), torch.rand(grid, generator=g)
    solver = BatchedFisherKolmogorov(d, torch.ones(grid, dtype=torch.bool), 2.0, torch.tensor([0.02, 0.04]))
    plain = solver.advance(solver.initial(c0), 30.0)
    assert torch.equal(solver.advance(solver.initial(c0), 30.0, rho_scale=1.0), plain)
    halved = BatchedFisherKolmogorov(d, torch.ones(grid, dtype=torch.bool), 2.0, torch.tensor([0.01, 0.02]))
    halved.dt = solver.dt  # the same steps, so only the rate differs
    expected = halved.advance(halved.initial(c0), 30.0)
    assert torch.allclose(solver.advance(solver.initial(c0), 30.0, rho_scale=0.5), expected, atol=1e-6)
    with pytest.raises(ValueError, match="rho_scale"):
        solver.advance(solver.initial(c0), 1.0, rho_scale=1.5)
