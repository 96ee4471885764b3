"""Building blocks of the continuous-time neural process (``longitudinal.models.np``). Pure torch.

Shapes: B batch, K context scans, Q query times, N = B*Q*S decoded volumes, X flattened voxels of one scale.
Times entering these blocks are already model time (years, see ``base.scale_days``) and relative to the last
context scan, so the blocks never see absolute days.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _groups(channels: int) -> int:
    """GroupNorm group count: per-sample normalisation (never BatchNorm: padded scans must not leak)."""
    return math.gcd(8, channels)


class TimeEmbedding(nn.Module):
    """Gap in years [...] -> embedding [..., dim].

    Fourier features at octave frequencies cover gaps from weeks to several years; the raw gap is kept as a
    feature so the embedding stays monotone-aware far outside the training range.
    """

    def __init__(self, dim: int, n_freqs: int = 6) -> None:
        super().__init__()
        # Periods from ~2 months to ~4 years (in years): the clinically relevant follow-up intervals.
        self.register_buffer("freqs", (2.0 ** torch.arange(n_freqs, dtype=torch.float32)) * (math.pi / 4.0))
        self.mlp = nn.Sequential(nn.Linear(2 * n_freqs + 1, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, gap: Tensor) -> Tensor:
        ang = gap.unsqueeze(-1) * self.freqs
        return self.mlp(torch.cat([gap.unsqueeze(-1), ang.sin(), ang.cos()], dim=-1))


class ConvBlock(nn.Module):
    """Two 3^3 convolutions with GroupNorm + SiLU; ``stride=2`` halves D, H, W in the first one."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1)
        self.norm1 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.norm2(self.conv2(h)))


class FiLMBlock(nn.Module):
    """Residual conv block whose features are scaled/shifted by a conditioning vector (gap to query, latent).

    x [N, cin, D, H, W], cond [N, cond_dim] -> [N, cout, D, H, W].
    """

    def __init__(self, cin: int, cout: int, cond_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNorm(_groups(cout), cout)
        self.film = nn.Linear(cond_dim, 2 * cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.skip = nn.Conv3d(cin, cout, 1)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.norm1(self.conv1(x))
        gamma, beta = self.film(cond).chunk(2, dim=-1)
        h = F.silu(h * (1.0 + gamma[:, :, None, None, None]) + beta[:, :, None, None, None])
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class TimeAttention(nn.Module):
    """Per-location multi-head attention from query times over context times, at one spatial scale.

    feats    [B, K, ch, X]  context features at this scale (padding rows arbitrary; masked here)
    mask     [B, K]         True where a context scan is present
    ctx_emb  [B, K, E]      embedding of each context scan's gap to the last context scan
    q_emb    [B, Q, E]      embedding of each query's gap to the last context scan
    summary  [B, ch, X]     masked mean of the context features (the deterministic path; it forms the
                            query together with the query time, and is added back to the output)
    returns  [B, Q, ch, X]
    """

    def __init__(self, ch: int, emb_dim: int, heads: int) -> None:
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention channels {ch} not divisible by heads {heads}")
        self.heads = heads
        self.q_feat, self.q_time = nn.Linear(ch, ch), nn.Linear(emb_dim, ch, bias=False)
        self.k_feat, self.k_time = nn.Linear(ch, ch), nn.Linear(emb_dim, ch, bias=False)
        self.v_feat, self.v_time = nn.Linear(ch, ch), nn.Linear(emb_dim, ch, bias=False)
        self.out = nn.Linear(ch, ch)
        self.norm = nn.LayerNorm(ch)

    def forward(self, feats: Tensor, mask: Tensor, ctx_emb: Tensor, q_emb: Tensor, summary: Tensor) -> Tensor:
        b, k, ch, x = feats.shape
        q_n = q_emb.shape[1]
        h, dh = self.heads, ch // self.heads
        f = feats.permute(0, 3, 1, 2)  # [B, X, K, ch]
        s = summary.transpose(1, 2)  # [B, X, ch]
        keys = self.k_feat(f) + self.k_time(ctx_emb).unsqueeze(1)
        vals = self.v_feat(f) + self.v_time(ctx_emb).unsqueeze(1)
        qry = self.q_feat(s).unsqueeze(1) + self.q_time(q_emb).unsqueeze(2)  # [B, Q, X, ch]
        keys = keys.view(b, x, k, h, dh)
        vals = vals.view(b, x, k, h, dh)
        qry = qry.view(b, q_n, x, h, dh)
        scores = torch.einsum("bqxhd,bxkhd->bqxhk", qry, keys) / math.sqrt(dh)
        scores = scores.masked_fill(~mask[:, None, None, None, :], float("-inf"))
        attn = scores.softmax(dim=-1)
        out = torch.einsum("bqxhk,bxkhd->bqxhd", attn, vals).reshape(b, q_n, x, ch)
        out = self.norm(self.out(out) + s.unsqueeze(1))
        return out.permute(0, 1, 3, 2)  # [B, Q, ch, X]
