"""Trajectory coherence: a model whose forecasts grow with the gap is fully monotone, one that alternates
between growing and shrinking is not, and the grid is validated."""

from __future__ import annotations

import pytest
import torch

from longitudinal.data.phantoms import make_phantom_store
from longitudinal.evaluation.coherence import trajectory_coherence
from longitudinal.models.base import Forecast, ForecastModel, build_model


class _Wobbly(ForecastModel):
    """The last context label, eroded at every other query (volume goes up and down along the grid)."""

    kind = "wobbly"
    stochastic = True
    trainable = False

    def loss(self, batch):  # pragma: no cover - not trained
        return torch.zeros(())

    def sample(self, context_images, context_labels, context_times, context_mask, query_times, n_samples=1,
               generator=None, conditions=None):
        b, q = query_times.shape
        last = context_labels[:, -1]
        probs = torch.zeros(b, q, n_samples, 3, *last.shape[-3:])
        for qi in range(q):
            lab = last.clone()
            if qi % 2:
                lab[..., ::2, :, :] = 0  # drop half the slices
            probs[:, qi, :, 0] = (lab == 0).float()[:, None]
            probs[:, qi, :, 1] = (lab > 0).float()[:, None]
        return Forecast(images=context_images[:, -1:, None].expand(b, q, n_samples, *context_images.shape[2:]),
                        probs=probs)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_phantom_store(str(tmp_path_factory.mktemp("coh") / "c.zarr"), n_patients=3, seed=5,
                              grid=(24, 24, 24), n_times=(3, 4))


def test_growing_forecasts_are_monotone_and_wobbly_ones_are_not(cohort):
    pids = list(cohort.patients)
    kw = dict(crop_size=(16, 16, 16), max_context=2, n_samples=4)
    lin = trajectory_coherence("linear", build_model("linear"), cohort.url, pids, **kw)
    # A deterministic model has one trajectory per patient.
    assert lin.n_patients == 3 and lin.n_trajectories == 3 and lin.monotone_fraction == 1.0
    wob = trajectory_coherence("wobbly", _Wobbly(), cohort.url, pids, **kw)
    assert wob.monotone_fraction == 0.0


def test_grid_must_increase(cohort):
    with pytest.raises(ValueError, match="strictly increasing"):
        trajectory_coherence("lci", build_model("lci"), cohort.url, list(cohort.patients), grid_days=(90.0, 30.0))
