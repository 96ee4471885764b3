"""Temporal flow matching (``tfm``): a conditional flow from the last context scan to the scan at a query time.

The flowing state is ``[image channels (C), tumour one-hot (3)]`` per voxel, so every forecast carries a
segmentation. Training uses a *paired* path per sample (never re-paired across patients):

    x0 = state(last context scan) + sigma * noise          x1 = state(target scan at the query time)
    x_t = (1 - t) x0 + t x1,   t ~ U(0, 1)                 loss = || v(x_t, t | context, gap) - (x1 - x0) ||^2

The velocity network is a small 3D U-Net (``FiLMUNet3d``) that sees x_t and, as conditioning whose stem
features are computed once per flow (not once per solver step), the last context state and a
permutation-invariant masked mean over per-scan encodings of every context scan (each encoding FiLM-modulated
by how long before the last scan it was taken). A global embedding of the gap to the query time, the time of
the last scan (both in years via ``scale_days``, as Fourier features) and the flow time t modulates every
block. With ``rate_head`` (the default) the U-Net predicts two maps and the velocity is ``a + gap * r``: the
change drawn over the flow is an offset plus a rate times the gap (years), which extrapolates to long gaps
the way growth does. Each query time is its own flow (B*Q flattened). Sampling integrates dx/dt = v from t=0
to 1 with ``torchdiffeq.odeint`` (euler / midpoint / rk4 fixed-step, dopri5 adaptive); the S samples differ by
their x0 noise, one draw per sample shared by all of its query times, so a sample is one trajectory.
Class probabilities are the flowed tumour channels clipped to [0, 1] and normalised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from longitudinal.models.base import (
    N_CLASSES,
    Batch,
    Conditions,
    Forecast,
    ForecastModel,
    check_context,
    register_model,
    scale_days,
)
from longitudinal.models.blocks import (
    OUT_KERNELS,
    SKIP_MODES,
    FiLMUNet3d,
    fourier_features,
    gather_k,
    group_norm,
    last_context_index,
    masked_mean,
    one_hot_labels,
)
from longitudinal.models.treatment_features import N_TREATMENT_FEATURES, treatment_features

SOLVERS = ("euler", "midpoint", "rk4", "dopri5")
_FLOW_FREQS = 4  # flow time t in [0, 1]: frequencies 1/2 .. 4 cycles per unit of t


@dataclass
class TFMConfig:
    """Configuration of ``tfm``; the defaults are the ones shipped for CPU training on 32^3 crops.

    in_channels: image channels C. width / channel_mult: U-Net widths per level (width * mult).
    ctx_width: channels of the context summary map. emb_dim: size of the time embedding.
    n_freqs / max_freq: Fourier features of gaps in years, frequencies from 1/8 to ``max_freq`` cycles/year.
        Low frequencies on purpose: with 4-6 frequencies up to 4 cycles/year, short trainings on growing
        phantoms forecast volumes that wiggle (shrink again) with the gap; up to 1 cycle/year they grow.
    sigma: std of the noise added to x0 (intensity units; one-hot channels are 0/1).
    seg_weight: weight of the tumour channels in the loss relative to the image channels.
    rate_head: the velocity is ``a + gap_years * r`` with both maps predicted by the U-Net, so the change it
        draws scales with the gap by construction (the neural process's residual form). Without it the gap
        reaches the velocity only through FiLM and long, rarely-trained gaps are under-forecast.
    solver / steps: ODE solver (one of SOLVERS) and fixed step count (euler, midpoint, rk4); rtol / atol for
        dopri5. skip_mode / out_kernel: the U-Net's skip joins and output kernel (``FiLMUNet3d``).
    max_batch: flows integrated at once when sampling (bounds memory; results do not depend on it for
        fixed-step solvers).
    treatment_aware: the embedding also sees the treatment features of each flow (``treatment_features``:
        events in the gap, exposure, time since, history, and the crop's voxel size). False is the
        treatment-blind setting, kept so the gain is measured (and what checkpoints without the key are).
    The shipped solver, steps, rate head, skips and output kernel were tuned on validation patients only:
    docs/decisions/tfm-sampler.md.
    """

    in_channels: int = 2
    width: int = 8
    channel_mult: tuple[int, ...] = (1, 2, 4)
    ctx_width: int = 8
    emb_dim: int = 64
    n_freqs: int = 3
    max_freq: float = 1.0
    sigma: float = 0.1
    seg_weight: float = 4.0
    rate_head: bool = True
    skip_mode: str = "add"
    out_kernel: int = 1
    solver: str = "midpoint"
    steps: int = 2
    rtol: float = 1e-3
    atol: float = 1e-4
    max_batch: int = 16
    treatment_aware: bool = True

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        problems = []
        for name in ("in_channels", "width", "ctx_width", "emb_dim", "steps", "max_batch"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            problems.append(f"channel_mult must be non-empty positive ints, got {self.channel_mult!r}")
        if self.n_freqs < 0:
            problems.append(f"n_freqs must be >= 0, got {self.n_freqs!r}")
        if self.sigma < 0:
            problems.append(f"sigma must be >= 0, got {self.sigma!r}")
        if self.skip_mode not in SKIP_MODES:
            problems.append(f"skip_mode {self.skip_mode!r} is not one of {list(SKIP_MODES)}")
        if self.out_kernel not in OUT_KERNELS:
            problems.append(f"out_kernel must be one of {list(OUT_KERNELS)}, got {self.out_kernel!r}")
        if self.solver not in SOLVERS:
            problems.append(f"solver {self.solver!r} is not one of {list(SOLVERS)}")
        if self.rtol <= 0 or self.atol <= 0:
            problems.append(f"rtol and atol must be > 0, got {self.rtol!r}, {self.atol!r}")
        if problems:
            raise ValueError("bad TFMConfig: " + "; ".join(problems))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TFMConfig:
        """Build from a config dict; unknown keys are reported together with the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise ValueError(f"unknown tfm config keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**kwargs)


class _ContextEncoder(nn.Module):
    """Per-scan encoding of (state_k, state_last), FiLM-modulated by the scan's age, then a masked mean.

    states [B, K, S, D, H, W], last [B, S, D, H, W], age_years [B, K], mask [B, K] -> [B, ctx_width, D, H, W].
    """

    def __init__(self, state_ch: int, ctx_width: int, n_time_feats: int, n_freqs: int, max_freq: float) -> None:
        super().__init__()
        self.n_freqs, self.max_freq = n_freqs, max_freq
        self.conv1 = nn.Conv3d(2 * state_ch, ctx_width, 3, padding=1)
        self.norm = group_norm(ctx_width)
        self.film = nn.Sequential(nn.Linear(n_time_feats, ctx_width), nn.SiLU(), nn.Linear(ctx_width, 2 * ctx_width))
        self.conv2 = nn.Conv3d(ctx_width, ctx_width, 3, padding=1)

    def forward(self, states: Tensor, last: Tensor, age_years: Tensor, mask: Tensor) -> Tensor:
        b, k = states.shape[:2]
        x = torch.cat([states, last.unsqueeze(1).expand_as(states)], dim=2).flatten(0, 1)
        h = self.norm(self.conv1(x))
        feats = fourier_features(age_years.flatten(), self.n_freqs, self.max_freq, 1 / 8)
        scale, shift = self.film(feats)[:, :, None, None, None].chunk(2, dim=1)
        h = self.conv2(torch.nn.functional.silu(h * (1 + scale) + shift))
        return masked_mean(h.view(b, k, *h.shape[1:]), mask)


@register_model("tfm")
class TemporalFlowMatching(ForecastModel):
    """Temporal flow matching; see the module docstring. Build with ``build_model("tfm", config)``."""

    kind = "tfm"
    stochastic = True
    trainable = True

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config = TFMConfig.from_kwargs(**config)
        c = self.config
        self.state_ch = c.in_channels + N_CLASSES
        n_time = 2 * c.n_freqs + 1
        self.context = _ContextEncoder(self.state_ch, c.ctx_width, n_time, c.n_freqs, c.max_freq)
        # gap to query (years), time of the last scan (years), flow time t
        n_treat = N_TREATMENT_FEATURES if c.treatment_aware else 0
        self.embed = nn.Sequential(nn.Linear(2 * n_time + 2 * _FLOW_FREQS + 1 + n_treat, c.emb_dim), nn.SiLU(),
                                   nn.Linear(c.emb_dim, c.emb_dim))
        out_ch = 2 * self.state_ch if c.rate_head else self.state_ch
        self.net = FiLMUNet3d(self.state_ch, out_ch, c.width, c.channel_mult, c.emb_dim,
                              cond_channels=self.state_ch + c.ctx_width, skip_mode=c.skip_mode,
                              out_kernel=c.out_kernel)
        # 3D convolutions on CPU (oneDNN) run ~2x faster channels-last; load_state_dict keeps this layout.
        self.to(memory_format=torch.channels_last_3d)

    def config_dict(self) -> dict[str, Any]:
        d = asdict(self.config)
        d["channel_mult"] = list(d["channel_mult"])
        return d

    @classmethod
    def upgrade_checkpoint(cls, config: dict[str, Any], state_dict: dict[str, Tensor]
                           ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Checkpoints written before the rate head (their configs lack ``rate_head``) used concatenated skips,
        a 3x3x3 output and one stem over [x_t, last state, context map]. The stem is linear, so its weight
        splits exactly into the x_t part and the conditioning part that the current net keeps apart."""
        if "rate_head" not in config:
            config = {**config, "rate_head": False, "skip_mode": "concat", "out_kernel": 3}
        if "treatment_aware" not in config:
            config = {**config, "treatment_aware": False}
        if "net.stem.weight" in state_dict and "net.cond_stem.weight" not in state_dict:
            state_ch = int(config.get("in_channels", TFMConfig.in_channels)) + N_CLASSES
            w = state_dict["net.stem.weight"]
            state_dict = {**state_dict, "net.stem.weight": w[:, :state_ch].clone(),
                          "net.cond_stem.weight": w[:, state_ch:].clone()}
        return config, state_dict

    # -- pieces ------------------------------------------------------------------------------------------
    def _states(self, images: Tensor, labels: Tensor) -> Tensor:
        """images [..., C, D, H, W], labels [..., D, H, W] -> state [..., C+3, D, H, W]."""
        return torch.cat([images.float(), one_hot_labels(labels, torch.float32)], dim=-4)

    def _encode(
        self, images: Tensor, labels: Tensor, times: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Context -> (last state [B,S,...], context map [B,ctx_width,...], last time in years [B])."""
        if images.shape[2] != self.config.in_channels:
            raise ValueError(f"tfm was built for {self.config.in_channels} channels, got {images.shape[2]}")
        states = self._states(images, labels)
        last = last_context_index(times, mask)
        last_state = gather_k(states, last)
        t_last = gather_k(times, last).float()
        age = scale_days((t_last[:, None] - times.float()).masked_fill(~mask, 0.0))
        ctx = self.context(states, last_state, age, mask)
        return last_state, ctx, scale_days(t_last)

    def _embedding(self, gap_years: Tensor, t_last_years: Tensor, flow_t: Tensor,
                   treat: Tensor | None = None) -> Tensor:
        c = self.config
        feats = [
            fourier_features(gap_years, c.n_freqs, c.max_freq, 1 / 8),
            fourier_features(t_last_years, c.n_freqs, c.max_freq, 1 / 8),
            fourier_features(flow_t, _FLOW_FREQS, 4.0, 0.5),
        ]
        if c.treatment_aware:
            feats.append(treat.to(feats[0].dtype) if treat is not None
                         else feats[0].new_zeros(feats[0].shape[0], N_TREATMENT_FEATURES))
        return self.embed(torch.cat(feats, dim=1))

    def condition(self, last_state: Tensor, ctx: Tensor) -> Tensor:
        """The velocity network's features of the conditioning maps, shared by every step of one flow."""
        return self.net.condition(torch.cat([last_state, ctx], dim=1))

    def velocity(self, x: Tensor, flow_t: Tensor, cond: Tensor, gap_years: Tensor,
                 t_last_years: Tensor, treat: Tensor | None = None) -> Tensor:
        """v(x_t, t) [N, C+3, D, H, W] for states x [N, C+3, D, H, W] and per-flow conditioning ([N, ...];
        ``cond`` = ``condition(last_state, ctx)``; ``treat`` [N, N_TREATMENT_FEATURES] or None)."""
        emb = self._embedding(gap_years, t_last_years, flow_t, treat)
        out = self.net(x, emb, cond)
        if not self.config.rate_head:
            return out
        offset, rate = out.split(self.state_ch, dim=1)
        return offset + gap_years.to(out.dtype).view(-1, 1, 1, 1, 1) * rate

    # -- interface ---------------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> Tensor:
        """Flow-matching MSE over real queries: image channels + seg_weight * tumour channels (scalar)."""
        batch.check()
        if batch.target_images is None or batch.target_labels is None:
            raise ValueError("tfm.loss needs target_images and target_labels")
        last_state, ctx, t_last = self._encode(
            batch.context_images, batch.context_labels, batch.context_times, batch.context_mask
        )
        bi, qi = batch.query_mask.nonzero(as_tuple=True)
        if bi.numel() == 0:
            return ctx.sum() * 0.0
        t_last_days = gather_k(batch.context_times, last_context_index(batch.context_times, batch.context_mask))
        gap = scale_days((batch.query_times[bi, qi] - t_last_days[bi]).float())
        x1 = self._states(batch.target_images[bi, qi], batch.target_labels[bi, qi])
        x0 = last_state[bi] + self.config.sigma * torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device)
        tb = t.view(-1, 1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * x1
        treat = treatment_features(batch.conditions, t_last_days, batch.query_times)[bi, qi]
        v = self.velocity(xt, t, self.condition(last_state[bi], ctx[bi]), gap, t_last[bi], treat)
        err = (v - (x1 - x0)) ** 2
        c = self.config.in_channels
        return err[:, :c].mean() + self.config.seg_weight * err[:, c:].mean()

    @torch.no_grad()
    def sample(
        self,
        context_images: Tensor,
        context_labels: Tensor,
        context_times: Tensor,
        context_mask: Tensor,
        query_times: Tensor,
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        conditions: Conditions | None = None,
        *,
        solver: str | None = None,
        steps: int | None = None,
    ) -> Forecast:
        """Integrate the flow for every (query, sample). ``solver``/``steps`` override the config.

        Returns images [B,Q,S,C,D,H,W] and probs [B,Q,S,3,D,H,W] (clip-normalised tumour channels).
        """
        check_context(context_images, context_labels, context_times, context_mask, query_times)
        solver = solver or self.config.solver
        steps = int(steps or self.config.steps)
        if solver not in SOLVERS or steps < 1 or n_samples < 1:
            raise ValueError(f"solver must be one of {list(SOLVERS)} (got {solver!r}); steps >= 1 (got {steps}); "
                             f"n_samples >= 1 (got {n_samples})")
        b, q = query_times.shape
        device = context_images.device
        last_state, ctx, t_last = self._encode(context_images, context_labels, context_times, context_mask)
        t_last_days = gather_k(context_times, last_context_index(context_times, context_mask))
        gap = scale_days((query_times - t_last_days[:, None]).float())  # [B, Q]
        bi = torch.arange(b, device=device).repeat_interleave(q * n_samples)
        gap_n = gap.repeat_interleave(n_samples, dim=1).flatten()
        treat_n = treatment_features(conditions, t_last_days, query_times).repeat_interleave(n_samples, dim=1)
        treat_n = treat_n.flatten(0, 1)
        # Noise drawn up front, in one call, so samples do not depend on max_batch; one draw per (patient,
        # sample), shared by all of its query times, so sample s is one trajectory over the query times (its
        # flows differ only by the gap) rather than unrelated draws per time.
        noise = torch.randn(
            (b, 1, n_samples, *last_state.shape[1:]), generator=generator,
            device=generator.device if generator is not None else device,
        ).to(device)
        x0 = last_state[bi] + self.config.sigma * noise.expand(b, q, *noise.shape[2:]).flatten(0, 2)
        out = []
        mb = self.config.max_batch
        for s in range(0, bi.numel(), mb):
            sl = slice(s, s + mb)
            out.append(self._integrate(x0[sl], last_state[bi[sl]], ctx[bi[sl]], gap_n[sl], t_last[bi[sl]], solver,
                                       steps, treat_n[sl]))
        x1 = torch.cat(out).view(b, q, n_samples, self.state_ch, *last_state.shape[-3:])
        c = self.config.in_channels
        p = x1[:, :, :, c:].clamp(0, 1)
        p[:, :, :, 0] += 1e-6  # an all-zero voxel becomes background rather than 0/0
        return Forecast(images=x1[:, :, :, :c].contiguous(), probs=p / p.sum(dim=3, keepdim=True))

    def _integrate(self, x0: Tensor, last_state: Tensor, ctx: Tensor, gap: Tensor, t_last: Tensor, solver: str,
                   steps: int, treat: Tensor) -> Tensor:
        if x0.shape[0] == 1 and x0.device.type == "cpu":
            # A batch of one makes ATen's CPU conv3d pick its slow reference kernel at these channel counts
            # (oneDNN only for batch > 1 or large planes); two copies of the flow cost less than one alone
            # (~0.4 s vs ~1 s of CPU for 8 steps at 32^3). Flows are independent, so the copy changes nothing.
            pair = self._integrate(x0.expand(2, *x0.shape[1:]), last_state.expand(2, *last_state.shape[1:]),
                                   ctx.expand(2, *ctx.shape[1:]), gap.expand(2), t_last.expand(2), solver, steps,
                                   treat.expand(2, *treat.shape[1:]))
            return pair[:1]
        cond = self.condition(last_state, ctx)

        def func(t: Tensor, x: Tensor) -> Tensor:
            return self.velocity(x, t.expand(x.shape[0]).to(x.dtype), cond, gap, t_last, treat)

        # Imported here: torchdiffeq pulls in scipy.integrate, about a second of every cold start of the other kinds.
        from torchdiffeq import odeint

        span = torch.tensor([0.0, 1.0], device=x0.device, dtype=x0.dtype)
        if solver == "dopri5":
            return odeint(func, x0, span, method="dopri5", rtol=self.config.rtol, atol=self.config.atol)[-1]
        return odeint(func, x0, span, method=solver, options={"step_size": 1.0 / steps})[-1]
