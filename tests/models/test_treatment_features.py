"""Treatment features and how the learned models use them: known answers, events after the query change nothing
(bit for bit), an event in the gap changes the forecast of a treatment-aware model and not of a blind one."""

from __future__ import annotations

import math

import pytest
import torch

from longitudinal.models.base import DAYS_PER_YEAR, Conditions, build_model, encode_treatments
from longitudinal.models.treatment_features import FEATURES_PER_KIND, N_TREATMENT_FEATURES, treatment_features

SURGERY, RADIO, CHEMO = 0, 1, 2


def _cond(events: list[tuple[float, float, str]], spacing: float = 2.0) -> Conditions:
    return Conditions(treatments=encode_treatments([events]), spacing_mm=torch.full((1, 3), spacing))


def test_features_have_known_values() -> None:
    events = [(0.0, 0.0, "surgery"), (110.0, 150.0, "radiotherapy"), (130.0, 130.0, "surgery")]
    f = treatment_features(_cond(events, spacing=4.0), torch.tensor([100.0]), torch.tensor([[90.0 + 10, 140.0, 400.0]]))
    assert f.shape == (1, 3, N_TREATMENT_FEATURES)
    r, s = FEATURES_PER_KIND * RADIO, FEATURES_PER_KIND * SURGERY
    # query at the last scan's day: nothing acts in an empty gap; the week-0 surgery is history
    assert f[0, 0, r] == 0 and f[0, 0, s] == 0
    assert f[0, 0, s + 3] == pytest.approx(math.exp(-100 / DAYS_PER_YEAR))
    # day 140: radiotherapy running for 30 days, the day-130 surgery 10 days ago
    assert f[0, 1, r] == 1 and f[0, 1, r + 1] == pytest.approx(30 / DAYS_PER_YEAR)
    assert f[0, 1, r + 2] == pytest.approx(30 / DAYS_PER_YEAR)
    assert f[0, 1, s] == 1 and f[0, 1, s + 1] == 0 and f[0, 1, s + 2] == pytest.approx(10 / DAYS_PER_YEAR)
    # day 400: the whole course (40 days) lies in the gap
    assert f[0, 2, r + 1] == pytest.approx(40 / DAYS_PER_YEAR)
    assert f[0, :, FEATURES_PER_KIND * CHEMO: FEATURES_PER_KIND * (CHEMO + 1)].abs().sum() == 0
    assert f[0, 0, -1] == pytest.approx(1.0)  # log2(4 mm / 2 mm)
    assert treatment_features(None, torch.tensor([0.0]), torch.tensor([[5.0]])).abs().sum() == 0


def _context() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(1, 2, 8, 8, 8, dtype=torch.int64)
    labels[0, 0, 3:5, 3:5, 3:5] = 1
    labels[0, 1, 2:6, 3:5, 3:5] = 2
    images = torch.rand(1, 2, 2, 8, 8, 8, generator=g) + labels[:, :, None].float()
    return images, labels, torch.tensor([[0.0, 60.0]]), torch.ones(1, 2, dtype=torch.bool)


TINY = {"tfm": {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 8},
        "np": {"width": 4, "latent_dim": 4, "heads": 2, "time_dim": 8, "n_freqs": 2}}


@pytest.mark.parametrize("kind", ["tfm", "np"])
def test_a_plan_after_the_query_changes_nothing_and_one_in_the_gap_does(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(kind, TINY[kind]).eval()
    # Give the treatment inputs weight, as training would, so a change in them shows in the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ctx, q = _context(), torch.tensor([[150.0]])

    def run(events: list[tuple[float, float, str]]) -> torch.Tensor:
        fc = model.sample(*ctx, q, n_samples=2, generator=torch.Generator().manual_seed(3), conditions=_cond(events))
        return fc.probs

    recorded = run([(0.0, 0.0, "surgery")])
    after = run([(0.0, 0.0, "surgery"), (200.0, 240.0, "radiotherapy")])
    assert torch.equal(recorded, after)
    in_gap = run([(0.0, 0.0, "surgery"), (90.0, 130.0, "radiotherapy")])
    assert not torch.equal(recorded, in_gap)
    blind = build_model(kind, TINY[kind] | {"treatment_aware": False}).eval()
    a = blind.sample(*ctx, q, n_samples=2, generator=torch.Generator().manual_seed(3), conditions=_cond([]))
    b = blind.sample(*ctx, q, n_samples=2, generator=torch.Generator().manual_seed(3),
                     conditions=_cond([(90.0, 130.0, "radiotherapy")]))
    assert torch.equal(a.probs, b.probs)


@pytest.mark.parametrize("kind", ["tfm", "np"])
def test_checkpoints_without_the_setting_load_treatment_blind(kind: str) -> None:
    blind = build_model(kind, TINY[kind] | {"treatment_aware": False})
    config = {k: v for k, v in blind.config_dict().items() if k != "treatment_aware"}
    cls = type(blind)
    config, state = cls.upgrade_checkpoint(config, blind.state_dict())
    assert config["treatment_aware"] is False
    again = build_model(kind, config)
    again.load_state_dict(state)


def _cube_labels(sizes: list[int], grid: int = 16) -> torch.Tensor:
    labels = torch.zeros(1, len(sizes), grid, grid, grid, dtype=torch.int64)
    for k, n in enumerate(sizes):
        labels[0, k].view(-1)[:n] = 1
    return labels


def test_linear_restart_extrapolates_from_the_scans_after_the_latest_event() -> None:
    labels = _cube_labels([100, 200, 50, 80])
    images = labels[:, :, None].float()
    times = torch.tensor([[0.0, 50.0, 70.0, 90.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    surgery = _cond([(60.0, 60.0, "surgery")])
    q = torch.tensor([[110.0]])
    restart = build_model("linear_restart")
    # the two post-operative scans (50 and 80 voxels, 20 days apart): 110 voxels 20 days later
    f = restart.sample(images, labels, times, mask, q, conditions=surgery)
    assert int((f.probs[0, 0, 0].argmax(0) > 0).sum()) == 110
    # only one scan since the surgery: the last scan (LCI), where plain linear extrapolates across the surgery
    f = restart.sample(images[:, :3], labels[:, :3], times[:, :3], mask[:, :3], torch.tensor([[90.0]]),
                       conditions=surgery)
    assert int((f.probs[0, 0, 0].argmax(0) > 0).sum()) == 50
    lin = build_model("linear").sample(images[:, :3], labels[:, :3], times[:, :3], mask[:, :3],
                                       torch.tensor([[90.0]]), conditions=surgery)
    assert int((lin.probs[0, 0, 0].argmax(0) > 0).sum()) == 0  # 50 + (50 - 200) = clamped at 0
    # no treatment: the same as linear
    a = restart.sample(images, labels, times, mask, q, conditions=_cond([]))
    b = build_model("linear").sample(images, labels, times, mask, q)
    assert torch.equal(a.probs, b.probs)
