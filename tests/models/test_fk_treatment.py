"""``fk`` with conditions: known treatments act in the fit and in the forecast (and events after a query change
nothing, bit for bit), tissue maps shape the diffusivity and the domain, and the crop's voxel size is the one the
conditions give."""

from __future__ import annotations

import math

import pytest
import torch

from longitudinal.models.base import Conditions, encode_treatments
from longitudinal.models.fk import FisherKolmogorovModel
from longitudinal.models.fk_solver import BatchedFisherKolmogorov
from longitudinal.models.fk_treatment import TreatmentEffects, dilate

GRID = (24, 24, 24)
DAYS = [60.0, 150.0, 240.0]


def _grown(d: float = 0.06, rho: float = 0.015, spacing: float = 2.0, model: FisherKolmogorovModel | None = None
           ) -> torch.Tensor:
    """Labels [3, *GRID] of a tumour grown by the equation from a small seed, scanned on ``DAYS``."""
    model = model or FisherKolmogorovModel()
    r2 = sum((g - 11.5) ** 2 for g in torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij"))
    solver = BatchedFisherKolmogorov(torch.full((1, *GRID), d), torch.ones(GRID, dtype=torch.bool), spacing,
                                     torch.tensor([rho]))
    whole, enh = model._masks(solver.snapshots(torch.where(r2 <= 9.0, 1.0, 0.0), DAYS)[:, 0])
    return whole.long() + enh.long()


def _forecast(model: FisherKolmogorovModel, labels: torch.Tensor, query: list[float],
              conditions: Conditions | None = None, samples: int = 4) -> torch.Tensor:
    """probs [Q, S, 3, *GRID] of one patient."""
    images = torch.ones(1, len(labels), 1, *labels.shape[-3:])
    fc = model.sample(images, labels[None], torch.tensor([DAYS]), torch.ones(1, len(labels), dtype=torch.bool),
                      torch.tensor([query]), n_samples=samples, generator=torch.Generator().manual_seed(0),
                      conditions=conditions)
    return fc.probs[0]


def _median_volume(probs: torch.Tensor) -> torch.Tensor:
    """[Q] median over samples of the whole-tumour voxel count."""
    return (probs.argmax(2) > 0).flatten(2).sum(-1).float().median(dim=1).values


def _events(*rows: tuple[float, float, str]) -> Conditions:
    return Conditions(treatments=encode_treatments([list(rows)]))


@pytest.fixture(scope="module")
def growing() -> tuple[FisherKolmogorovModel, torch.Tensor]:
    model = FisherKolmogorovModel(refine=0, d_grid=(0.02, 0.06, 0.2), rho_grid=(0.005, 0.015, 0.04))
    return model, _grown(model=model)


def test_events_on_or_after_the_query_change_nothing_bit_for_bit(growing) -> None:
    model, labels = growing
    query = [300.0, 400.0]
    plain = _forecast(model, labels, query)
    later = _events((400.0, 400.0, "surgery"), (400.0, 440.0, "radiotherapy"), (450.0, 600.0, "chemotherapy"))
    assert torch.equal(_forecast(model, labels, query, later), plain)
    # An empty treatment table (padding rows only) and no conditions at all are the same forecast too.
    assert torch.equal(_forecast(model, labels, query, Conditions(treatments=encode_treatments([[]]))), plain)


def test_each_treatment_in_the_gap_lowers_the_forecast_of_a_growing_tumour(growing) -> None:
    model, labels = growing
    query = [330.0, 420.0]
    base = _median_volume(_forecast(model, labels, query))
    assert float(base[1]) > float(base[0]) > float((labels[-1] > 0).sum())  # it keeps growing untreated
    for rows in ([(250.0, 290.0, "radiotherapy")], [(250.0, 250.0, "surgery")], [(245.0, 420.0, "chemotherapy")]):
        treated = _median_volume(_forecast(model, labels, query, _events(*rows)))
        assert torch.all(treated < base), (rows, treated, base)


def test_a_surgery_leaves_an_empty_cavity_that_nothing_regrows_into(growing) -> None:
    model, labels = growing
    geometry = model.geometry(torch.ones(GRID, dtype=torch.bool), labels)
    d, rho = torch.tensor([0.06]), torch.tensor([0.015])
    before, after = model.simulate(labels[-1], geometry, d, rho, 240.0, [250.0, 400.0],
                                   [(250.0, 250.0, "surgery")])[:, 0]
    untreated = model.simulate(labels[-1], geometry, d, rho, 240.0, [250.0])[0, 0]
    assert torch.equal(before, untreated)  # the snapshot on the surgery's day is taken before it
    core = untreated >= model.config.enhancing_threshold
    assert bool(core.any()) and float(after[core].abs().max()) == 0.0  # the resected core stays empty


@pytest.mark.parametrize("course", [[(100.0, 100.0, "surgery")], [(70.0, 200.0, "chemotherapy")]])
def test_events_between_context_scans_are_fitted_through(course: list[tuple[float, float, str]]) -> None:
    """Scans around a treatment: with it known the fit finds the growth that made them, without it not."""
    model = FisherKolmogorovModel(refine=0, d_grid=(0.02, 0.06, 0.2), rho_grid=(0.005, 0.015, 0.04))
    first = _grown(model=model)[0]
    geometry = model.geometry(torch.ones(GRID, dtype=torch.bool), first[None])
    snaps = model.simulate(first, geometry, torch.tensor([0.06]), torch.tensor([0.015]), DAYS[0], DAYS[1:],
                           course)[:, 0]
    whole, enh = model._masks(snaps)
    labels = torch.cat([first[None], whole.long() + enh.long()])
    known = model.fit(labels, torch.tensor(DAYS), geometry, course)
    unknown = model.fit(labels, torch.tensor(DAYS), geometry)
    assert float(known.loss.min()) < 0.05 < float(unknown.loss.min())
    assert known.best() == pytest.approx((0.06, 0.015), rel=1e-6)


def test_linear_quadratic_course_and_dilation() -> None:
    fx = TreatmentEffects()
    assert fx.surviving_fraction == pytest.approx(math.exp(-(0.04 * 2.0 + 0.004 * 4.0)))
    days = fx.fraction_days(10.0, 49.0)
    assert len(days) == 30 and days[0] == 10.0 and days[-1] == pytest.approx(49.0)
    assert fx.fraction_days(10.0, 10.0)[-1] == pytest.approx(49.0)  # no end: the standard 39-day span
    seed = torch.zeros(1, 21, 21, 21, dtype=torch.bool)
    seed[0, 10, 10, 10] = True
    grown = dilate(seed, 8.0, (2.0, 2.0, 2.0))[0]  # four steps of 2 mm
    assert bool(grown[10, 10, 14]) and not bool(grown[10, 10, 15]) and not bool(grown[14, 14, 14])


def test_tissue_maps_set_the_diffusivity_and_the_domain() -> None:
    model = FisherKolmogorovModel()
    labels = _grown()
    head = torch.ones(GRID, dtype=torch.bool)
    white = torch.zeros(2, *GRID)
    white[0] = 1.0
    grey = torch.zeros(2, *GRID)
    grey[1] = 1.0
    geo_white = model.geometry(head, labels, white)
    geo_grey = model.geometry(head, labels, grey)
    assert torch.allclose(geo_white.relative_d, torch.ones(GRID))
    assert torch.allclose(geo_grey.relative_d, torch.full(GRID, 0.1))
    # CSF (no tissue) outside the tumour leaves the domain, whose border no flux crosses.
    csf = white.clone()
    csf[:, :, :, :4] = 0.0
    geo_csf = model.geometry(head, labels, csf)
    assert not bool(geo_csf.domain[:, :, :4].any()) and float(geo_csf.relative_d[:, :, :4].abs().max()) == 0.0
    d, rho = torch.tensor([0.1]), torch.tensor([0.02])
    vols = [int((model.simulate(labels[-1], g, d, rho, 240.0, [420.0])[0, 0] >= 0.25).sum())
            for g in (geo_white, geo_grey)]
    assert vols[1] < vols[0]  # grey matter diffuses ten times slower
    q = [400.0]
    assert torch.equal(_forecast(model, labels, q, Conditions(tissue=white[None])), _forecast(model, labels, q))
    # The fit reads D as the white-matter diffusivity: in pure grey matter the same growth needs ten times more.
    d_white = model.fit(labels, torch.tensor(DAYS), geo_white).best()[0]
    d_grey = model.fit(labels, torch.tensor(DAYS), geo_grey).best()[0]
    assert d_grey / d_white == pytest.approx(10.0, rel=0.35)


def test_the_crop_spacing_comes_from_the_conditions() -> None:
    """Labels grown at 4 mm voxels are fitted with D four times the one a 2 mm reading gives."""
    model = FisherKolmogorovModel(refine=3, d_grid=(0.02, 0.06, 0.2, 0.6), rho_grid=(0.005, 0.015, 0.04))
    labels = _grown(0.2, 0.015, spacing=4.0, model=model)
    at4 = model.geometry(torch.ones(GRID, dtype=torch.bool), labels, None, (4.0, 4.0, 4.0))
    d4, _ = model.fit(labels, torch.tensor(DAYS), at4).best()
    d2, _ = model.fit(labels, torch.tensor(DAYS), torch.ones(GRID, dtype=torch.bool)).best()
    assert d4 / d2 == pytest.approx(4.0, rel=0.5)
    q = [400.0]
    spacing = Conditions(spacing_mm=torch.tensor([[4.0, 4.0, 4.0]]))
    assert not torch.equal(_forecast(model, labels, q, spacing), _forecast(model, labels, q))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_forecast(growing) -> None:
    model, labels = growing
    rows = _events((250.0, 290.0, "radiotherapy"), (300.0, 300.0, "surgery"))
    cpu = _forecast(model, labels, [330.0, 420.0], rows)
    images = torch.ones(1, 3, 1, *GRID, device="cuda")
    fc = model.to("cuda").sample(images, labels[None].cuda(), torch.tensor([DAYS], device="cuda"),
                                 torch.ones(1, 3, dtype=torch.bool, device="cuda"),
                                 torch.tensor([[330.0, 420.0]], device="cuda"), n_samples=4,
                                 generator=torch.Generator(device="cuda").manual_seed(0), conditions=rows.to("cuda"))
    agree = (fc.probs[0].cpu().argmax(2) == cpu.argmax(2)).float().mean()
    assert float(agree) > 0.99
