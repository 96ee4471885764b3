"""Continuous-time neural process (``np``): a distribution over whole growth trajectories.

Shapes (B batch, K context scans, Q query times, S samples, C channels, D/H/W crop voxels, L latent size):

* Context encoder: one shared 3D conv encoder per scan over (image, one-hot label) gives feature maps at
  three scales (1, 1/2, 1/4 of the crop). Everything built from the context is a masked pool or a masked
  attention over K, so the model is invariant to the order of the context scans and ignores padding.
* Attention over time: at the 1/2 and 1/4 scales, every location of every query attends over the K context
  scans; keys/values carry the context features plus an embedding of each scan's gap to the last context
  scan, queries carry the masked-mean context features plus the query's gap (``TimeAttention``).
* Latent: a global z [B, L]. Its prior p(z | context) and posterior q(z | context + targets) come from the same
  set encoder (neural-process style), so the KL trains them to agree. One z is drawn per trajectory and shared
  by all its query times: samples are temporally coherent growth curves, different z different curves.
* Decoder: U-Net-like upsampling of the attention outputs, FiLM-conditioned on (gap to the query, z), predicts
  a residual on the last context scan: images = last image + delta, logits = base logits of the last label +
  delta, with delta = offset + rate * gap (years). With the small-initialised head the untrained model is last-carried-forward (LCI) and learns growth.

Training minimises recon(images: MSE, labels: cross-entropy) + beta * KL(q(z|C,T) || p(z|C)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

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
from longitudinal.models.np_blocks import ConvBlock, FiLMBlock, TimeAttention, TimeEmbedding
from longitudinal.models.treatment_features import N_TREATMENT_FEATURES, treatment_features

# The crop is halved twice by the encoder.
SPATIAL_MULTIPLE = 4


@dataclass
class NPConfig:
    """Hyper-parameters of the neural process. ``config_dict()`` of the model round-trips through
    ``build_model("np", cfg)``.

    in_channels: image channels C. width: channels at full resolution (x2 at 1/2, x4 at 1/4 scale).
    latent_dim: size L of the global latent. heads: attention heads (must divide width).
    time_dim: width of the time embeddings. n_freqs: Fourier frequencies of the time embedding.
    beta: weight of KL(posterior || prior) against the per-voxel mean reconstruction terms.
    image_weight / label_weight: weights of the image MSE and the label cross-entropy.
    base_logit: initial logit of the last context label in the residual (learnt; 3 gives it probability 0.91).
    min_sigma: floor of the latent standard deviations (keeps the KL finite).
    head_init_std: std of the output head's initial weights; small so the untrained model is about LCI.
    decode_chunk: at most this many volumes (B*Q*samples) are decoded at once, bounding memory.
    treatment_aware: the decoder's FiLM conditioning also sees each query's treatment features
        (``treatment_features``); False is the treatment-blind setting (and what checkpoints without the key
        are).
    """

    in_channels: int = 2
    width: int = 16
    latent_dim: int = 16
    heads: int = 4
    time_dim: int = 32
    n_freqs: int = 6
    beta: float = 0.01
    image_weight: float = 1.0
    label_weight: float = 1.0
    base_logit: float = 3.0
    min_sigma: float = 1e-3
    head_init_std: float = 1e-3
    decode_chunk: int = 32
    treatment_aware: bool = True

    def problems(self) -> list[str]:
        """Every invalid value, as messages (empty when the config is sound)."""
        out = []
        for name in ("in_channels", "width", "latent_dim", "heads", "time_dim", "n_freqs", "decode_chunk"):
            if int(getattr(self, name)) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.heads >= 1 and self.width >= 1 and self.width % self.heads:
            out.append(f"width {self.width} must be divisible by heads {self.heads}")
        for name in ("beta", "image_weight", "label_weight", "head_init_std"):
            if float(getattr(self, name)) < 0:
                out.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_sigma <= 0:
            out.append(f"min_sigma must be > 0, got {self.min_sigma}")
        return out


@dataclass
class NPContext:
    """Everything the decoder and the latent encoder need from the context, computed once per batch.

    feats:    per attention scale (1/2, 1/4): [B, K, ch, X] features, zero where padded
    summary:  per attention scale: [B, ch, X] masked mean over K (deterministic path)
    last:     per scale (1, 1/2, 1/4): [B, ch, d, h, w] features of the last context scan
    ctx_gap:  [B, K] years from each context scan to the last one (<= 0; 0 where padded)
    mask:     [B, K] bool
    scan_h:   [B, K, 2*L] per-scan inputs of the latent set encoder
    last_image [B, C, D, H, W], last_label [B, D, H, W] int64, t_last [B] years.
    """

    feats: list[Tensor]
    summary: list[Tensor]
    last: list[Tensor]
    ctx_gap: Tensor
    mask: Tensor
    scan_h: Tensor
    last_image: Tensor
    last_label: Tensor
    t_last: Tensor


@register_model("np")
class NeuralProcess(ForecastModel):
    """Continuous-time attentive neural process with a global latent; see the module docstring."""

    kind = "np"
    stochastic = True

    def __init__(self, config: NPConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__()
        self.cfg = _resolve_config(config, overrides)
        c, w, e, lat = self.cfg.in_channels, self.cfg.width, self.cfg.time_dim, self.cfg.latent_dim
        chans = (w, 2 * w, 4 * w)
        self.time_emb = TimeEmbedding(e, self.cfg.n_freqs)
        # Shared per-scan encoder (the set encoder's per-element network).
        self.enc0 = ConvBlock(c + N_CLASSES, chans[0])
        self.enc1 = ConvBlock(chans[0], chans[1], stride=2)
        self.enc2 = ConvBlock(chans[1], chans[2], stride=2)
        self.attn1 = TimeAttention(chans[1], e, self.cfg.heads)
        self.attn2 = TimeAttention(chans[2], e, self.cfg.heads)
        # Latent set encoder: per-scan (pooled deep features, gap) -> h; masked mean over the set -> (mu, sigma).
        self.lat_phi = nn.Sequential(nn.Linear(2 * chans[2] + e, 2 * lat), nn.SiLU(), nn.Linear(2 * lat, 2 * lat))
        self.lat_rho = nn.Sequential(nn.SiLU(), nn.Linear(2 * lat, 2 * lat), nn.SiLU(), nn.Linear(2 * lat, 2 * lat))
        cond = 4 * w
        n_treat = N_TREATMENT_FEATURES if self.cfg.treatment_aware else 0
        self.cond = nn.Sequential(nn.Linear(e + lat + n_treat, cond), nn.SiLU(), nn.Linear(cond, cond))
        self.dec2 = FiLMBlock(2 * chans[2], chans[2], cond)
        self.dec1 = FiLMBlock(chans[2] + 2 * chans[1], chans[1], cond)
        self.dec0 = FiLMBlock(chans[1] + chans[0], chans[0], cond)
        # Two heads: an offset and a rate per year (see _decode_chunk).
        self.head = nn.Conv3d(chans[0], 2 * (c + N_CLASSES), 1)
        # Learnt confidence in the last label (starts at cfg.base_logit): interiors far from the boundary
        # should become near-certain while the boundary keeps changing.
        self.base_logit = nn.Parameter(torch.tensor(float(self.cfg.base_logit)))
        nn.init.normal_(self.head.weight, std=self.cfg.head_init_std)
        nn.init.zeros_(self.head.bias)

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.cfg)

    @classmethod
    def upgrade_checkpoint(cls, config: dict[str, Any], state_dict: dict[str, Tensor]
                           ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Checkpoints written before treatment conditioning are the treatment-blind setting."""
        if "treatment_aware" not in config:
            config = {**config, "treatment_aware": False}
        return config, state_dict

    def query_features(self, times: Tensor, mask: Tensor, query_times: Tensor,
                       conditions: Conditions | None) -> Tensor | None:
        """[B, Q, N_TREATMENT_FEATURES] treatment features of each query (None when treatment-blind)."""
        if not self.cfg.treatment_aware:
            return None
        t_last_days = times.masked_fill(~mask, float("-inf")).amax(dim=1)
        return treatment_features(conditions, t_last_days, query_times)

    # ---- validation -------------------------------------------------------------------------------------

    def _check(self, images: Tensor, labels: Tensor, times: Tensor, mask: Tensor, query_times: Tensor) -> None:
        problems = []
        try:
            check_context(images, labels, times, mask, query_times)
        except ValueError as err:
            problems.append(str(err))
        if images.ndim == 6:
            if images.shape[2] != self.cfg.in_channels:
                problems.append(f"model has in_channels={self.cfg.in_channels}, images have {images.shape[2]}")
            bad = [s for s in images.shape[-3:] if s % SPATIAL_MULTIPLE]
            if bad:
                problems.append(f"crop size {tuple(images.shape[-3:])} must be a multiple of {SPATIAL_MULTIPLE}")
        if problems:
            raise ValueError("np: " + "; ".join(problems))

    # ---- encoder ----------------------------------------------------------------------------------------

    def _encode_scans(self, images: Tensor, labels: Tensor) -> list[Tensor]:
        """images [N, C, D, H, W], labels [N, D, H, W] -> features at scales 1, 1/2, 1/4."""
        onehot = F.one_hot(labels.long().clamp(0, N_CLASSES - 1), N_CLASSES).permute(0, 4, 1, 2, 3)
        x = torch.cat([images, onehot.to(images.dtype)], dim=1)
        f0 = self.enc0(x)
        f1 = self.enc1(f0)
        f2 = self.enc2(f1)
        return [f0, f1, f2]

    def _scan_latent_input(self, deep: Tensor, gap_emb: Tensor) -> Tensor:
        """deep [..., ch, d, h, w] pooled (mean and max: size and intensity of the tumour) + gap -> [..., 2L]."""
        flat = deep.flatten(-3)
        return self.lat_phi(torch.cat([flat.mean(-1), flat.amax(-1), gap_emb], dim=-1))

    def encode_context(self, images: Tensor, labels: Tensor, times: Tensor, mask: Tensor) -> NPContext:
        """Encode a context ([B,K,C,D,H,W], [B,K,D,H,W], [B,K] days, [B,K] bool) once for decoding/latents."""
        b, k = images.shape[:2]
        m6 = mask.view(b, k, 1, 1, 1, 1)
        # Padding may hold anything (even NaN): replace it before it can reach a pooled value.
        images = torch.where(m6, images, torch.zeros((), dtype=images.dtype, device=images.device))
        labels = torch.where(mask.view(b, k, 1, 1, 1), labels, torch.zeros_like(labels))
        t = scale_days(torch.where(mask, times, torch.zeros_like(times)).to(images.dtype))
        t_last = t.masked_fill(~mask, float("-inf")).amax(dim=1)
        ctx_gap = torch.where(mask, t - t_last[:, None], torch.zeros_like(t))
        last_idx = t.masked_fill(~mask, float("-inf")).argmax(dim=1)
        feats_all = self._encode_scans(images.flatten(0, 1), labels.flatten(0, 1))
        maskf = mask.to(images.dtype)
        n_ctx = maskf.sum(dim=1).clamp_min(1.0)
        ar = torch.arange(b, device=images.device)
        feats, summary, last = [], [], []
        for level, f in enumerate(feats_all):
            f = f.view(b, k, *f.shape[1:])
            f = torch.where(m6, f, torch.zeros((), dtype=f.dtype, device=f.device))
            last.append(f[ar, last_idx])
            if level >= 1:
                flat = f.flatten(3)
                feats.append(flat)
                summary.append(flat.sum(dim=1) / n_ctx.view(b, 1, 1))
        gap_emb = self.time_emb(ctx_gap)
        scan_h = self._scan_latent_input(feats_all[2].view(b, k, *feats_all[2].shape[1:]), gap_emb)
        return NPContext(feats=feats, summary=summary, last=last, ctx_gap=ctx_gap, mask=mask, scan_h=scan_h,
                         last_image=images[ar, last_idx], last_label=labels[ar, last_idx].long(), t_last=t_last)

    # ---- latent -----------------------------------------------------------------------------------------

    def _latent(self, h: Tensor, mask: Tensor) -> Normal:
        """Masked mean of per-scan vectors h [B, N, 2L] (mask [B, N]) -> Normal over z [B, L]."""
        m = mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        mu, raw = self.lat_rho(pooled).chunk(2, dim=-1)
        return Normal(mu, self.cfg.min_sigma + (1.0 - self.cfg.min_sigma) * torch.sigmoid(raw))

    def prior(self, ctx: NPContext) -> Normal:
        """p(z | context): loc/scale [B, L]."""
        return self._latent(ctx.scan_h, ctx.mask)

    def posterior(self, ctx: NPContext, target_images: Tensor, target_labels: Tensor, query_times: Tensor,
                  query_mask: Tensor) -> Normal:
        """q(z | context + targets): targets [B,Q,C,D,H,W], [B,Q,D,H,W], query days [B,Q], mask [B,Q] -> [B, L]."""
        b, q = query_times.shape
        deep = self._encode_scans(target_images.flatten(0, 1), target_labels.flatten(0, 1))[2]
        gap = self._query_gap(ctx, query_times, query_mask)
        tgt_h = self._scan_latent_input(deep.view(b, q, *deep.shape[1:]), self.time_emb(gap))
        return self._latent(torch.cat([ctx.scan_h, tgt_h], dim=1), torch.cat([ctx.mask, query_mask], dim=1))

    # ---- decoder ----------------------------------------------------------------------------------------

    def _query_gap(self, ctx: NPContext, query_times: Tensor, query_mask: Tensor | None = None) -> Tensor:
        """[B, Q] days -> years after the last context scan (0 at masked queries)."""
        gap = scale_days(query_times.to(ctx.t_last.dtype)) - ctx.t_last[:, None]
        return gap if query_mask is None else torch.where(query_mask, gap, torch.zeros_like(gap))

    def decode(self, ctx: NPContext, query_times: Tensor, z: Tensor,
               query_mask: Tensor | None = None, treat: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Decode every (query, latent sample) pair.

        query_times [B, Q] days, z [B, S, L] -> images [B, Q, S, C, D, H, W], logits [B, Q, S, 3, D, H, W].
        Each output depends only on (context, its own query time, its own z): the queries of one trajectory
        share z and differ only through time. Masked queries (``query_mask`` False) decode at gap 0. treat:
        [B, Q, N_TREATMENT_FEATURES] (``query_features``; zeros when None and the model is treatment-aware).
        """
        b, q = query_times.shape
        s = z.shape[1]
        gap = self._query_gap(ctx, query_times, query_mask)  # [B, Q] years
        q_emb = self.time_emb(gap)  # [B, Q, E]
        ctx_emb = self.time_emb(ctx.ctx_gap)
        attn = []
        for module, feats, summ, last in zip((self.attn1, self.attn2), ctx.feats, ctx.summary, ctx.last[1:],
                                             strict=True):
            a = module(feats, ctx.mask, ctx_emb, q_emb, summ)  # [B, Q, ch, X]
            attn.append(a.reshape(b, q, *last.shape[1:]))
        parts = [q_emb[:, :, None].expand(b, q, s, -1), z[:, None].expand(b, q, s, -1)]
        if self.cfg.treatment_aware:
            t = treat if treat is not None else q_emb.new_zeros(b, q, N_TREATMENT_FEATURES)
            parts.append(t.to(q_emb.dtype)[:, :, None].expand(b, q, s, -1))
        cond_all = torch.cat(parts, dim=-1)
        # Chunk over samples so that B*Q*chunk volumes are decoded at once.
        chunk = max(1, self.cfg.decode_chunk // max(1, b * q))
        images, logits = [], []
        for s0 in range(0, s, chunk):
            s1 = min(s, s0 + chunk)
            img, lg = self._decode_chunk(ctx, attn, cond_all[:, :, s0:s1], gap)
            images.append(img)
            logits.append(lg)
        return torch.cat(images, dim=2), torch.cat(logits, dim=2)

    def _decode_chunk(self, ctx: NPContext, attn: list[Tensor], cond_in: Tensor,
                      gap: Tensor) -> tuple[Tensor, Tensor]:
        b, q, s = cond_in.shape[:3]
        n = b * q * s

        def per_query(x: Tensor) -> Tensor:  # [B, Q, ...] -> [N, ...]
            return x[:, :, None].expand(b, q, s, *x.shape[2:]).reshape(n, *x.shape[2:])

        def per_batch(x: Tensor) -> Tensor:  # [B, ...] -> [N, ...]
            return x[:, None, None].expand(b, q, s, *x.shape[1:]).reshape(n, *x.shape[1:])

        cond = self.cond(cond_in.reshape(n, -1))
        h = self.dec2(torch.cat([per_query(attn[1]), per_batch(ctx.last[2])], dim=1), cond)
        h = F.interpolate(h, scale_factor=2.0, mode="trilinear", align_corners=False)
        h = self.dec1(torch.cat([h, per_query(attn[0]), per_batch(ctx.last[1])], dim=1), cond)
        h = F.interpolate(h, scale_factor=2.0, mode="trilinear", align_corners=False)
        h = self.dec0(torch.cat([h, per_batch(ctx.last[0])], dim=1), cond)
        # Residual = offset + rate * gap: the rate path is the inductive bias for growth (a rate that varies
        # little with the gap extrapolates growth monotonically); the offset absorbs what does not scale with
        # time (intensity drift between scans, corrections to the last label's confidence).
        offset, rate = self.head(h).chunk(2, dim=1)
        out = offset + rate * per_query(gap.unsqueeze(-1))[:, :, None, None, None]
        c = self.cfg.in_channels
        base_img = per_batch(ctx.last_image)
        onehot = F.one_hot(ctx.last_label, N_CLASSES).permute(0, 4, 1, 2, 3).to(out.dtype)
        base_logits = per_batch(onehot * self.base_logit)
        img = base_img + out[:, :c]
        lg = base_logits + out[:, c:]
        spatial = img.shape[-3:]
        return img.view(b, q, s, c, *spatial), lg.view(b, q, s, N_CLASSES, *spatial)

    # ---- ForecastModel ----------------------------------------------------------------------------------

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        """Scalar terms of the negative ELBO: ``image`` MSE, ``label`` CE (means over voxels and real
        queries), ``kl`` (nats per trajectory, summed over latent dims) and ``loss`` (their weighted sum)."""
        batch.check()
        self._check(batch.context_images, batch.context_labels, batch.context_times, batch.context_mask,
                    batch.query_times)
        if batch.target_images is None or batch.target_labels is None:
            raise ValueError("np: loss needs target_images and target_labels")
        qmask = batch.query_mask.bool()
        ctx = self.encode_context(batch.context_images, batch.context_labels, batch.context_times,
                                  batch.context_mask.bool())
        tgt_img = torch.where(qmask[:, :, None, None, None, None], batch.target_images,
                              torch.zeros((), dtype=batch.target_images.dtype, device=qmask.device))
        tgt_lab = torch.where(qmask[:, :, None, None, None], batch.target_labels.long(),
                              torch.zeros((), dtype=torch.long, device=qmask.device))
        prior = self.prior(ctx)
        post = self.posterior(ctx, tgt_img, tgt_lab, batch.query_times, qmask)
        z = post.rsample().unsqueeze(1)  # [B, 1, L]: one z for every query of the trajectory
        treat = self.query_features(batch.context_times, batch.context_mask.bool(), batch.query_times,
                                    batch.conditions)
        img, logits = self.decode(ctx, batch.query_times, z, qmask, treat)
        img, logits = img[:, :, 0], logits[:, :, 0]
        mse = (img - tgt_img).pow(2).flatten(2).mean(-1)  # [B, Q]
        ce = F.cross_entropy(logits.flatten(0, 1), tgt_lab.flatten(0, 1), reduction="none").flatten(1).mean(-1)
        ce = ce.view_as(mse)
        w = qmask.to(mse.dtype)
        n = w.sum().clamp_min(1.0)
        mse_m, ce_m = (mse * w).sum() / n, (ce * w).sum() / n
        kl = kl_divergence(post, prior).sum(-1).mean()
        total = self.cfg.image_weight * mse_m + self.cfg.label_weight * ce_m + self.cfg.beta * kl
        return {"loss": total, "image": mse_m.detach(), "label": ce_m.detach(), "kl": kl.detach()}

    def loss(self, batch: Batch) -> Tensor:
        """Negative ELBO (see ``loss_terms``)."""
        return self.loss_terms(batch)["loss"]

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
    ) -> Forecast:
        """Draw ``n_samples`` trajectories z ~ p(z | context), each decoded at every query time.

        Returns Forecast(images [B,Q,S,C,D,H,W], probs [B,Q,S,3,D,H,W]); sample s of every query comes from
        the same z, so ``forecast.images[:, :, s]`` is one coherent trajectory.
        """
        if n_samples < 1:
            raise ValueError(f"np: n_samples must be >= 1, got {n_samples}")
        self._check(context_images, context_labels, context_times, context_mask, query_times)
        ctx = self.encode_context(context_images, context_labels, context_times, context_mask.bool())
        z = self.draw_latent(self.prior(ctx), n_samples, generator)
        treat = self.query_features(context_times, context_mask.bool(), query_times, conditions)
        images, logits = self.decode(ctx, query_times, z, treat=treat)
        return Forecast(images=images, probs=logits.softmax(dim=3))

    @staticmethod
    def draw_latent(dist: Normal, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """n_samples draws from a Normal over [B, L] -> [B, S, L] (reproducible with ``generator``)."""
        loc, scale = dist.loc, dist.scale
        eps = torch.randn((loc.shape[0], n_samples, loc.shape[1]), generator=generator, device=loc.device,
                          dtype=loc.dtype)
        return loc[:, None] + scale[:, None] * eps


def _resolve_config(config: NPConfig | dict[str, Any] | None, overrides: dict[str, Any]) -> NPConfig:
    """Merge a config (dataclass or dict) with keyword overrides; one ValueError lists every problem."""
    base = asdict(config) if isinstance(config, NPConfig) else dict(config or {})
    merged = {**base, **overrides}
    valid = {f.name for f in fields(NPConfig)}
    problems = [f"unknown option {k!r}" for k in sorted(set(merged) - valid)]
    if problems:
        problems.append(f"valid options: {sorted(valid)}")
        raise ValueError("np config: " + "; ".join(problems))
    cfg = NPConfig(**merged)
    problems = cfg.problems()
    if problems:
        raise ValueError("np config: " + "; ".join(problems))
    return cfg
