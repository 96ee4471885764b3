"""Temporal flow matching: config validation, the ODE solvers against exact answers, sampling noise."""

from __future__ import annotations

import math

import pytest
import torch

from longitudinal.models.base import build_model
from longitudinal.models.tfm import SOLVERS, TFMConfig
from longitudinal.models.treatment_features import N_TREATMENT_FEATURES

TINY = {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 16, "in_channels": 1}


def _context(phantom, b: int = 2, size: int = 8):
    labels = torch.stack([phantom.sphere_labels(torch.full((b,), r), size) for r in (2.0, 3.0)], dim=1)
    return (phantom.labels_to_images(labels), labels, torch.tensor([[0.0, 100.0]] * b),
            torch.ones(b, 2, dtype=torch.bool), torch.tensor([[200.0, 400.0]] * b))


def test_config_collects_every_problem():
    with pytest.raises(ValueError) as err:
        TFMConfig(width=0, solver="heun", sigma=-1.0, channel_mult=(), skip_mode="sum", out_kernel=2)
    msg = str(err.value)
    for part in ("width", "heun", "sigma", "channel_mult", "euler", "skip_mode", "out_kernel"):
        assert part in msg
    with pytest.raises(ValueError, match="valid keys"):
        build_model("tfm", {"widht": 8})


def test_defaults_round_trip_and_channel_check(phantom):
    model = build_model("tfm", {}, in_channels=1)
    assert build_model("tfm", model.config_dict()).config == model.config
    with pytest.raises(ValueError, match="channels"):
        build_model("tfm", TINY | {"in_channels": 2}).sample(*_context(phantom))


class _Decay(torch.nn.Module):
    """Velocity v(x, t) = -x: the flow from x0 ends at exactly x0 * exp(-1)."""

    def condition(self, cond):
        return None

    def forward(self, x, emb, cond_feat=None):
        return -x  # x_t: 1 image + 3 tumour channels


@pytest.mark.parametrize("solver,steps,tol", [("euler", 4, None), ("midpoint", 4, None), ("rk4", 4, 1e-4),
                                              ("dopri5", 1, 1e-4)])
def test_solvers_integrate_known_flows(solver, steps, tol, phantom):
    """With v = -x the solvers reproduce known answers: euler (1 - h)^n, midpoint (1 - h + h^2/2)^n with
    h = 1/n, rk4 and dopri5 exp(-1)."""
    torch.manual_seed(0)
    # The fake net returns the velocity itself (no offset/rate pair).
    model = build_model("tfm", TINY | {"ctx_width": 2, "rtol": 1e-7, "atol": 1e-9, "rate_head": False})
    model.net = _Decay()
    ctx = _context(phantom)
    g = torch.Generator().manual_seed(3)
    f = model.sample(*ctx, n_samples=2, generator=g, solver=solver, steps=steps)
    g = torch.Generator().manual_seed(3)
    x0 = model._states(ctx[0][:, 1], ctx[1][:, 1])  # last scan's state, [B, 4, D, H, W]
    noise = torch.randn((2, 1, 2, *x0.shape[1:]), generator=g)  # [B, 1, S]: shared by the 2 query times
    x0 = x0.repeat_interleave(4, dim=0) + model.config.sigma * noise.expand(2, 2, 2, *x0.shape[1:]).flatten(0, 2)
    h = 1 / steps
    factor = {"euler": (1 - h) ** steps, "midpoint": (1 - h + h * h / 2) ** steps}.get(solver, math.exp(-1))
    expected = (x0 * factor).view(2, 2, 2, 4, 8, 8, 8)
    torch.testing.assert_close(f.images, expected[:, :, :, :1], atol=tol or 1e-6, rtol=tol or 1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_samples_finite_forecasts(solver, phantom):
    model = build_model("tfm", TINY)
    f = model.sample(*_context(phantom), n_samples=3, generator=torch.Generator().manual_seed(0), solver=solver,
                     steps=3)
    assert tuple(f.images.shape) == (2, 2, 3, 1, 8, 8, 8) and tuple(f.probs.shape) == (2, 2, 3, 3, 8, 8, 8)
    assert torch.isfinite(f.images).all() and torch.isfinite(f.probs).all()
    torch.testing.assert_close(f.probs.sum(dim=3), torch.ones(2, 2, 3, 8, 8, 8))


def test_samples_differ_only_through_x0_noise(phantom):
    ctx = _context(phantom)
    torch.manual_seed(0)
    still = build_model("tfm", TINY | {"sigma": 0.0}).sample(*ctx, n_samples=3)
    assert torch.equal(still.images[:, :, 0], still.images[:, :, 2])
    torch.manual_seed(0)
    noisy = build_model("tfm", TINY).sample(*ctx, n_samples=3, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(noisy.images[:, :, 0], noisy.images[:, :, 2])


def test_one_noise_draw_per_sample_is_shared_by_its_query_times(phantom):
    """With a gap-blind velocity (v = -x) the flow map is the same at every query time, so the forecasts of one
    sample agree across query times exactly when they start from the same x0 noise; samples still differ."""
    model = build_model("tfm", TINY | {"rate_head": False})
    model.net = _Decay()
    f = model.sample(*_context(phantom), n_samples=3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(f.images[:, 0], f.images[:, 1])
    assert not torch.allclose(f.images[:, :, 0], f.images[:, :, 1])


def test_untrained_forecast_is_near_the_last_scan_and_chunking_is_invisible(phantom):
    """The tiny output init makes the untrained flow ~ LCI (a sane start); max_batch does not change results."""
    ctx = _context(phantom)
    torch.manual_seed(0)
    a = build_model("tfm", TINY | {"max_batch": 1})
    torch.manual_seed(0)
    b = build_model("tfm", TINY | {"max_batch": 64})
    fa = a.sample(*ctx, n_samples=2, generator=torch.Generator().manual_seed(2))
    fb = b.sample(*ctx, n_samples=2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(fa.images, fb.images)
    last = ctx[0][:, 1][:, None, None]
    assert (fa.images - last).abs().mean() < 0.3  # sigma 0.1 noise plus a tiny untrained velocity
    assert torch.equal(fa.probs.argmax(dim=3), ctx[1][:, 1][:, None, None].expand_as(fa.probs[:, :, :, 0]))


def test_rate_head_scales_the_velocity_with_the_gap():
    """v = a + gap * r: at fixed (x, t, context) the velocity is affine in the gap, exactly."""
    torch.manual_seed(0)
    model = build_model("tfm", TINY).eval()
    g = torch.Generator().manual_seed(5)
    x, last, ctx = (torch.rand(3, n, 8, 8, 8, generator=g) for n in (4, 4, 4))
    t, t_last = torch.full((3,), 0.5), torch.zeros(3)
    net_out = {}
    model.net.register_forward_hook(lambda _m, _i, out: net_out.update(out=out))
    with torch.no_grad():
        v = model.velocity(x, t, model.condition(last, ctx), torch.tensor([0.0, 1.0, 2.0]), t_last)
    offset, rate = net_out["out"].split(4, dim=1)
    torch.testing.assert_close(v, offset + torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1, 1, 1) * rate)
    assert tuple(net_out["out"].shape) == (3, 8, 8, 8, 8)


def test_a_lone_flow_integrates_as_it_does_inside_a_batch():
    """A batch of one is run as two copies (a faster CPU kernel); the flow's result must not change."""
    torch.manual_seed(0)
    model = build_model("tfm", TINY).eval()
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 4, 8, 8, 8, generator=g)
    last = torch.rand(3, 4, 8, 8, 8, generator=g)
    ctx = torch.rand(3, 4, 8, 8, 8, generator=g)
    gap, t_last = torch.tensor([0.3, 0.5, 1.0]), torch.tensor([0.2, 0.4, 0.1])
    treat = torch.rand(3, N_TREATMENT_FEATURES, generator=g)
    with torch.no_grad():
        together = model._integrate(x0, last, ctx, gap, t_last, "euler", 4, treat)
        for i in range(3):
            alone = model._integrate(x0[i:i + 1], last[i:i + 1], ctx[i:i + 1], gap[i:i + 1], t_last[i:i + 1],
                                     "euler", 4, treat[i:i + 1])
            assert alone.shape == (1, 4, 8, 8, 8)
            torch.testing.assert_close(alone, together[i:i + 1])
