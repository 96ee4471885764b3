"""Small pure-torch building blocks shared by the model kinds.

Shapes use the letters of ``longitudinal.models.base`` (B batch, K context scans, Q queries, C channels,
D/H/W crop voxels). Times reaching these helpers are already in model time (years, via ``scale_days``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longitudinal.models.base import N_CLASSES

SKIP_MODES = ("concat", "add")  # FiLMUNet3d: how a skip joins the upsampled features
OUT_KERNELS = (1, 3)  # FiLMUNet3d: kernel of the output convolution


def last_context_index(context_times: Tensor, context_mask: Tensor) -> Tensor:
    """[B] index of the latest masked-in context scan (by time, not by position).

    Padding positions are excluded even when they carry a larger (garbage) time.
    """
    t = context_times.masked_fill(~context_mask, float("-inf"))
    return t.argmax(dim=1)


def previous_context_index(context_times: Tensor, context_mask: Tensor) -> tuple[Tensor, Tensor]:
    """([B] index, [B] bool valid) of the second-latest masked-in context scan; valid is False with one scan."""
    last = last_context_index(context_times, context_mask)
    mask = context_mask.clone()
    mask[torch.arange(mask.shape[0], device=mask.device), last] = False
    valid = mask.any(dim=1)
    t = context_times.masked_fill(~mask, float("-inf"))
    return t.argmax(dim=1), valid


def gather_k(x: Tensor, index: Tensor) -> Tensor:
    """Pick x[b, index[b]] for every b: [B, K, ...] -> [B, ...]."""
    return x[torch.arange(x.shape[0], device=x.device), index]


def one_hot_labels(labels: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Integer labels [..., D, H, W] in {0..N_CLASSES-1} -> one-hot [..., N_CLASSES, D, H, W]."""
    oh = F.one_hot(labels.long().clamp(0, N_CLASSES - 1), N_CLASSES).to(dtype)
    return oh.movedim(-1, -4)


def fourier_features(x: Tensor, n_freqs: int, max_freq: float, min_freq: float = 1.0) -> Tensor:
    """[N] scalars -> [N, 2*n_freqs + 1]: the value itself plus sin/cos at geometric frequencies.

    Frequencies are in cycles per unit of ``x`` (years for gaps, flow-time for ``t``), spaced geometrically
    between ``min_freq`` and ``max_freq`` so that both sub-unit and multi-unit differences are resolved.
    """
    if n_freqs <= 0:
        return x[:, None]
    freqs = torch.logspace(math.log10(min_freq), math.log10(max_freq), n_freqs, device=x.device, dtype=x.dtype)
    ang = 2 * math.pi * x[:, None] * freqs[None]
    return torch.cat([x[:, None], ang.sin(), ang.cos()], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 8 dividing ``channels`` (batch-size independent)."""
    groups = max(g for g in range(1, 9) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class FiLMResBlock(nn.Module):
    """3D residual block whose features are scaled/shifted by an embedding vector (FiLM).

    x [N, cin, D, H, W], emb [N, emb_dim] -> [N, cout, D, H, W].
    """

    def __init__(self, cin: int, cout: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = group_norm(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class FiLMUNet3d(nn.Module):
    """Small 3D U-Net with FiLM conditioning in every block, sized for 16^3-64^3 crops on a CPU.

    x [N, cin, D, H, W], emb [N, emb_dim] -> [N, cout, D, H, W]. Any D/H/W works: inputs are padded up to a
    multiple of 2**(levels-1) and the output is cropped back.
    ``cond_channels`` > 0 adds a conditioning input cond [N, cond_channels, D, H, W] with its own stem
    convolution, whose output ``condition(cond)`` can be computed once and reused by every call that shares
    the conditioning (an ODE solver calls the network many times for one context; the stem is linear, so
    ``stem(cat[x, cond]) = stem_x(x) + stem_c(cond)``).
    skip_mode "concat" joins each skip to the upsampled features by concatenation; "add" projects the coarse
    features to the skip's width (1x1x1, at the coarse resolution) and adds them, so every full-resolution
    block is width -> width: about a quarter less compute per call at the same widths.
    out_kernel: 3 or 1, the output convolution's kernel.
    The output convolution starts tiny (not zero) so that the untrained network is close to "no change"
    while gradients still reach every parameter from the first step.
    """

    def __init__(self, cin: int, cout: int, width: int, channel_mult: tuple[int, ...], emb_dim: int,
                 cond_channels: int = 0, skip_mode: str = "concat", out_kernel: int = 3) -> None:
        super().__init__()
        chans = [width * m for m in channel_mult]
        self.levels = len(chans)
        self.stem = nn.Conv3d(cin, chans[0], 3, padding=1)
        self.cond_stem = nn.Conv3d(cond_channels, chans[0], 3, padding=1, bias=False) if cond_channels else None
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, c in enumerate(chans):
            self.down_blocks.append(FiLMResBlock(chans[i - 1] if i else chans[0], c, emb_dim))
            if i < len(chans) - 1:
                self.downsamples.append(nn.Conv3d(c, c, 3, stride=2, padding=1))
        self.mid = FiLMResBlock(chans[-1], chans[-1], emb_dim)
        if skip_mode not in SKIP_MODES or out_kernel not in OUT_KERNELS:
            raise ValueError(f"skip_mode must be one of {list(SKIP_MODES)} (got {skip_mode!r}); out_kernel one of "
                             f"{list(OUT_KERNELS)} (got {out_kernel!r})")
        self.skip_mode = skip_mode
        self.up_blocks = nn.ModuleList()
        self.up_proj = nn.ModuleList()
        for i in range(len(chans) - 2, -1, -1):
            if skip_mode == "add":
                self.up_proj.append(nn.Conv3d(chans[i + 1], chans[i], 1))
                self.up_blocks.append(FiLMResBlock(chans[i], chans[i], emb_dim))
            else:
                self.up_blocks.append(FiLMResBlock(chans[i + 1] + chans[i], chans[i], emb_dim))
        self.out_norm = group_norm(chans[0])
        self.out = nn.Conv3d(chans[0], cout, out_kernel, padding=out_kernel // 2)
        with torch.no_grad():
            self.out.weight.mul_(1e-2)
            self.out.bias.zero_()

    def _pad(self, x: Tensor) -> Tensor:
        m = 2 ** (self.levels - 1)
        pad = [p for s in reversed(x.shape[-3:]) for p in (0, (-s) % m)]
        x = F.pad(x, pad, mode="replicate") if any(pad) else x
        return x.contiguous(memory_format=torch.channels_last_3d)

    def condition(self, cond: Tensor) -> Tensor:
        """The conditioning's stem features [N, width, D', H', W'] (padded grid), for ``forward(cond_feat=)``."""
        if self.cond_stem is None:
            raise ValueError("this FiLMUNet3d was built without cond_channels")
        return self.cond_stem(self._pad(cond))

    def forward(self, x: Tensor, emb: Tensor, cond_feat: Tensor | None = None) -> Tensor:
        size = x.shape[-3:]
        h = self.stem(self._pad(x))
        if self.cond_stem is not None:
            if cond_feat is None:
                raise ValueError("this FiLMUNet3d needs cond_feat = condition(cond)")
            h = h + cond_feat
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)
            if i < self.levels - 1:
                skips.append(h)
                h = self.downsamples[i](h)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up_blocks):
            skip = skips.pop()
            if self.skip_mode == "add":
                h = F.interpolate(self.up_proj[i](h), size=skip.shape[-3:], mode="trilinear", align_corners=False)
                h = block(h + skip, emb)
            else:
                h = F.interpolate(h, size=skip.shape[-3:], mode="trilinear", align_corners=False)
                h = block(torch.cat([h, skip], dim=1), emb)
        out = self.out(F.silu(self.out_norm(h)))
        return out[..., : size[0], : size[1], : size[2]]


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over dim 1 of x [B, K, ...] counting only mask [B, K] True entries -> [B, ...]."""
    w = mask.to(x.dtype).view(*mask.shape, *([1] * (x.ndim - 2)))
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
