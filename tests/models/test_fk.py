"""The personalised Fisher-Kolmogorov model: it recovers the growth parameters of a tumour grown by the equation,
forecasts a growing tumour to keep growing, and its samples follow the fit's likelihood."""

from __future__ import annotations

import math

import pytest
import torch

from longitudinal.models.base import build_model
from longitudinal.models.fk import FisherKolmogorovModel
from longitudinal.models.fk_solver import BatchedFisherKolmogorov

GRID = (24, 24, 24)


def _grown(d: float, rho: float, days: list[float], model: FisherKolmogorovModel) -> torch.Tensor:
    """Labels [T, *GRID] of a tumour grown from a small seed by the equation with (d, rho), thresholded as the
    model reads images: whole where c >= u_w, enhancing where c >= u_e."""
    r2 = sum((g - 11.5) ** 2 for g in torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij"))
    c0 = torch.where(r2 <= 9.0, 1.0, 0.0)
    solver = BatchedFisherKolmogorov(torch.full((1, *GRID), d), torch.ones(GRID, dtype=torch.bool),
                                     model.config.spacing_mm, torch.tensor([rho]))
    c = solver.snapshots(c0, days)[:, 0]
    whole, enh = model._masks(c)
    return whole.long() + enh.long()


def _mature(d: float, rho: float, gaps: list[float], model: FisherKolmogorovModel, visible: int = 150
            ) -> tuple[torch.Tensor, list[float]]:
    """Labels [T, *GRID] and days of a tumour grown as the synthetic cohort grows its tumours: a dense seed grows
    silently until ``visible`` voxels show, then is scanned after each of ``gaps`` days (a mature front)."""
    r2 = sum((g - 11.5) ** 2 for g in torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij"))
    solver = BatchedFisherKolmogorov(torch.full((1, *GRID), d), torch.ones(GRID, dtype=torch.bool),
                                     model.config.spacing_mm, torch.tensor([rho]))
    c, t0 = solver.initial(torch.where(r2 <= 2.0, 1.0, 0.0)), 0.0
    while int((c >= model.config.whole_threshold).sum()) < visible:
        solver.advance(c, 5.0)
        t0 += 5.0
    states = [c.clone()]
    for gap in gaps:
        states.append(solver.advance(c, gap).clone())
    whole, enh = model._masks(torch.stack(states)[:, 0])
    return whole.long() + enh.long(), [t0 + sum(gaps[:k]) for k in range(len(gaps) + 1)]


@pytest.mark.parametrize("d,rho", [(0.05, 0.02), (0.03, 0.04)])
def test_fit_recovers_the_growth_parameters(d: float, rho: float) -> None:
    """Mature fronts scanned 90 days apart on a 2 mm grid (an immature front, grown 60 days from a hard sphere,
    is fitted with D rho about half the truth: the initial density assumes a mature front's profile)."""
    model = FisherKolmogorovModel(d_grid=(0.02, 0.06, 0.2, 0.6), rho_grid=(0.005, 0.015, 0.04), refine=3)
    labels, days = _mature(d, rho, [90.0, 90.0], model)
    fit = model.fit(labels, torch.tensor(days), torch.ones(GRID, dtype=torch.bool))
    best_d, best_rho = fit.best()
    # The front speed 2 sqrt(D rho) is what segmentations pin down best; D and rho themselves to within 50%.
    assert abs(math.log(best_d * best_rho) - math.log(d * rho)) < math.log(1.3), (best_d, best_rho)
    assert abs(math.log(best_d / d)) < math.log(1.5) and abs(math.log(best_rho / rho)) < math.log(1.5), \
        (best_d, best_rho)
    assert float(fit.loss.min()) < 0.15 and abs(float(fit.weight.sum()) - 1) < 1e-6


def test_a_growing_tumour_is_forecast_to_keep_growing_with_samples_spread_by_the_fit() -> None:
    model = build_model("fk", {"refine": 0, "temperature": 0.05})
    days = [60.0, 150.0, 240.0]
    labels = _grown(0.06, 0.015, days, model)
    images = torch.ones(1, 3, 1, *GRID)
    q = torch.tensor([[300.0, 380.0, 480.0]])
    fc = model.sample(images, labels[None], torch.tensor([days]), torch.ones(1, 3, dtype=torch.bool), q,
                      n_samples=8, generator=torch.Generator().manual_seed(0))
    assert fc.probs.shape == (1, 3, 8, 3, *GRID) and fc.images.shape == (1, 3, 8, 1, *GRID)
    whole = (fc.probs.argmax(3) > 0).flatten(3).sum(-1).float()  # [1, Q, S]
    observed = float((labels[-1] > 0).sum())
    med = whole[0].median(dim=1).values
    assert observed < med[0] < med[1] < med[2], (observed, med)
    # Deterministic under a seed; another seed may pick other parameter sets.
    again = model.sample(images, labels[None], torch.tensor([days]), torch.ones(1, 3, dtype=torch.bool), q,
                         n_samples=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fc.probs, again.probs)


def test_bad_config_is_refused_with_every_problem() -> None:
    with pytest.raises(ValueError) as info:
        build_model("fk", {"whole_threshold": 0.8, "enhancing_threshold": 0.5, "temperature": 0, "d_grid": [-1]})
    msg = str(info.value)
    assert "whole_threshold" in msg and "temperature" in msg and "d_grid" in msg
