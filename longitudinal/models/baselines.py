"""Closed-form baselines behind the ForecastModel interface: ``lci`` and ``linear``.

Every learned model is judged against these on the same targets (``longitudinal.evaluation.harness``).
Both are deterministic: the S samples of a Forecast are identical copies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from longitudinal.models.base import Batch, Conditions, Forecast, ForecastModel, check_context, register_model
from longitudinal.models.blocks import gather_k, last_context_index, one_hot_labels, previous_context_index


def _expand_samples(x: Tensor, n_samples: int) -> Tensor:
    """[B, Q, ...] -> [B, Q, S, ...] (a real copy, so callers may write into it)."""
    return x.unsqueeze(2).expand(x.shape[0], x.shape[1], n_samples, *x.shape[2:]).contiguous()


class _Baseline(ForecastModel):
    stochastic = False
    trainable = False

    def __init__(self, **_ignored: Any) -> None:
        # Accept and ignore common build arguments (e.g. in_channels) so every kind builds the same way.
        super().__init__()

    def loss(self, batch: Batch) -> Tensor:
        """Zero with no gradient: nothing to fit."""
        return torch.zeros((), device=batch.context_images.device)


@register_model("lci")
class LastContextImage(_Baseline):
    """Last context image (and label), persisted unchanged to every query time.

    "Last" is by context time among masked-in scans, not by position in K.
    """

    kind = "lci"

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
        """Forecast: images [B,Q,S,C,D,H,W] = last image; probs [B,Q,S,3,D,H,W] = one-hot of last label."""
        check_context(context_images, context_labels, context_times, context_mask, query_times)
        q = query_times.shape[1]
        last = last_context_index(context_times, context_mask)
        img = gather_k(context_images, last).unsqueeze(1).expand(-1, q, *context_images.shape[2:])
        probs = one_hot_labels(gather_k(context_labels, last), context_images.dtype)
        probs = probs.unsqueeze(1).expand(-1, q, *probs.shape[1:])
        return Forecast(images=_expand_samples(img, n_samples), probs=_expand_samples(probs, n_samples))


def _dilate(x: Tensor, cube: bool) -> Tensor:
    """Binary dilation of x [N, 1, D, H, W] (float 0/1) by a 3^3 cube or a 6-connected cross."""
    if cube:
        return F.max_pool3d(x, 3, stride=1, padding=1)
    return torch.maximum(
        torch.maximum(
            F.max_pool3d(x, (3, 1, 1), stride=1, padding=(1, 0, 0)),
            F.max_pool3d(x, (1, 3, 1), stride=1, padding=(0, 1, 0)),
        ),
        F.max_pool3d(x, (1, 1, 3), stride=1, padding=(0, 0, 1)),
    )


def _blur(x: Tensor, sigma: float = 1.5) -> Tensor:
    """Separable Gaussian blur of x [N, 1, D, H, W] with zero padding."""
    r = max(1, int(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = 2 * r + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = r
        x = F.conv3d(F.pad(x, pad), k.view(shape))
    return x


def depth_score(mask: Tensor) -> Tensor:
    """Growth-order score of every voxel for a binary mask [N, D, H, W] -> float [N, D, H, W].

    Positive inside (number of erosions a voxel survives), negative outside (minus the number of dilations
    needed to reach it): an approximate signed distance in voxels. Cube and cross structuring elements
    alternate, which makes iso-levels close to spheres (an octagon-like metric). A Gaussian-blurred copy of
    the mask (in [0, 1)) breaks ties within a level, so "the N highest-scoring voxels" is a smooth, nested
    family of shapes: N below the current size shrinks the mask from its boundary, N above grows it outward.
    """
    x = mask.float().unsqueeze(1)
    inside = torch.zeros_like(x)
    outside = torch.zeros_like(x)
    grown = x.clone()
    eroded = x.clone()
    for i in range(max(mask.shape[-3:]) + 1):
        cube = i % 2 == 0
        eroded = -_dilate(-eroded, cube)
        inside += eroded
        new = _dilate(grown, cube)
        outside += 1 - new
        if torch.equal(new, grown) and not bool(eroded.any()):
            break
        grown = new
    # Voxels never reached (an empty mask) stay at the most negative level; the target count is 0 there.
    score = torch.where(x > 0, inside + 1, -outside)
    return (score + 0.99 * _blur(x).clamp(0, 1)).squeeze(1)


def top_n_mask(score: Tensor, n: Tensor) -> Tensor:
    """For score [N, D, H, W] and counts n [N] (int), the mask of the n[i] highest-scoring voxels of item i."""
    flat = score.flatten(1)
    order = flat.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return (rank < n[:, None]).view_as(score)


def _extrapolation(context_times: Tensor, context_mask: Tensor, query_times: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(last [B], previous [B] context index by time, factor [B, Q] float64): how many "last intervals" (last
    minus previous scan, days) each query lies past the last scan; 0 (LCI) with one scan or a zero interval."""
    last = last_context_index(context_times, context_mask)
    prev, has_prev = previous_context_index(context_times, context_mask)
    t_last = gather_k(context_times, last).double()
    span = t_last - gather_k(context_times, prev).double()
    ok = has_prev & (span > 0)
    factor = torch.where(ok[:, None], (query_times.double() - t_last[:, None]) / span.clamp_min(1e-9)[:, None], 0.0)
    return last, prev, factor


def linear_volume_counts(context_labels: Tensor, context_times: Tensor, context_mask: Tensor,
                         query_times: Tensor) -> Tensor:
    """The ``linear`` baseline's (whole tumour, enhancing) voxel counts at every query: int64 [B, Q, 2].

    context_labels [B, K, D, H, W] (0 background, 1 tumour, 2 enhancing), context_times [B, K] and
    query_times [B, Q] in days, context_mask [B, K] bool. Each count is extrapolated linearly from the last two
    masked-in context scans (by time), rounded and clamped to [0, D*H*W], enhancing <= whole; with one scan (or
    two at the same day) it is the last scan's count. Closed form and cheap: the difficulty-scaled volume
    calibration (``longitudinal.models.calibration``) needs it for every query.
    """
    n_vox = int(context_labels.shape[-3] * context_labels.shape[-2] * context_labels.shape[-1])
    last, prev, factor = _extrapolation(context_times, context_mask, query_times)
    lab_last, lab_prev = gather_k(context_labels, last), gather_k(context_labels, prev)
    vol_last = torch.stack([(lab_last > 0).flatten(1).sum(1), (lab_last == 2).flatten(1).sum(1)], 1).double()
    vol_prev = torch.stack([(lab_prev > 0).flatten(1).sum(1), (lab_prev == 2).flatten(1).sum(1)], 1).double()
    vol_q = vol_last[:, None] + (vol_last - vol_prev)[:, None] * factor[..., None]  # [B, Q, 2]
    vol_q = vol_q.round().clamp(0, n_vox).long()
    vol_q[..., 1] = torch.minimum(vol_q[..., 1], vol_q[..., 0])
    return vol_q


def linear_volumes_ml(context_labels: Tensor, context_times: Tensor, context_mask: Tensor, query_times: Tensor,
                      voxel_volume_ml: float) -> Tensor:
    """``linear_volume_counts`` in ml (float64 [B, Q, 2]; ``voxel_volume_ml``: one voxel's volume in ml)."""
    return linear_volume_counts(context_labels, context_times, context_mask, query_times).double() * voxel_volume_ml


@register_model("linear")
class LinearExtrapolation(_Baseline):
    """Linear extrapolation from the last two context scans (by time); LCI when only one scan is present.

    Images: voxel-wise ``x(tq) = x_last + (x_last - x_prev) * (tq - t_last) / (t_last - t_prev)``.

    Tumour: volume-wise. The whole-tumour and enhancing voxel counts are extrapolated the same way (clamped to
    [0, crop voxels]), then the last mask is grown or shrunk to exactly that count by keeping the highest
    voxels of an approximate signed-distance score (``depth_score``): growth proceeds outward from the current
    boundary, shrinkage erodes it. The enhancing core is placed the same way inside the new whole tumour.
    An absent last mask stays absent (there is no boundary to grow from).
    """

    kind = "linear"

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
        """Forecast: images [B,Q,S,C,D,H,W]; probs [B,Q,S,3,D,H,W] one-hot of the resized last label."""
        check_context(context_images, context_labels, context_times, context_mask, query_times)
        b, q = query_times.shape
        spatial = context_images.shape[-3:]
        last, prev, factor = _extrapolation(context_times, context_mask, query_times)
        x_last = gather_k(context_images, last)
        x_prev = gather_k(context_images, prev)
        f_img = factor.to(context_images.dtype).view(b, q, 1, 1, 1, 1)
        images = x_last.unsqueeze(1) + (x_last - x_prev).unsqueeze(1) * f_img

        lab_last = gather_k(context_labels, last)
        whole_last, enh_last = lab_last > 0, lab_last == 2
        vol_q = linear_volume_counts(context_labels, context_times, context_mask, query_times)

        score_whole = depth_score(whole_last)  # [B, D, H, W]
        score_enh = depth_score(enh_last)
        whole_q = top_n_mask(
            score_whole.unsqueeze(1).expand(b, q, *spatial).reshape(b * q, *spatial), vol_q[..., 0].reshape(-1)
        )
        enh_score_q = score_enh.unsqueeze(1).expand(b, q, *spatial).reshape(b * q, *spatial)
        enh_q = top_n_mask(enh_score_q.masked_fill(~whole_q, float("-inf")), vol_q[..., 1].reshape(-1))
        labels = whole_q.long() + (enh_q & whole_q).long()
        probs = one_hot_labels(labels.view(b, q, *spatial), context_images.dtype)
        return Forecast(images=_expand_samples(images, n_samples), probs=_expand_samples(probs, n_samples))


def post_event_mask(context_times: Tensor, context_mask: Tensor, conditions: Conditions | None) -> Tensor:
    """context_mask [B, K] without the scans taken on or before the start of the latest treatment event that
    started before the last context scan: what the tumour did before a resection or a course of radiotherapy
    says little about what it does after. The last scan is always kept."""
    if conditions is None or conditions.treatments is None:
        return context_mask
    keep = context_mask.clone()
    last = last_context_index(context_times, context_mask)
    for i in range(context_times.shape[0]):
        t_last = float(context_times[i, last[i]])
        starts = [start for start, _end, _kind in conditions.events(i) if start < t_last]
        if starts:
            keep[i] &= context_times[i] > max(starts)
            keep[i, last[i]] = True
    return keep


@register_model("linear_restart")
class LinearRestart(LinearExtrapolation):
    """``linear`` restarted after treatment: extrapolates from the scans after the latest event that began before
    the last context scan (``post_event_mask``); the last scan alone (LCI) when it is the only one since."""

    kind = "linear_restart"

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
        """As ``linear`` on the post-event scans."""
        mask = post_event_mask(context_times, context_mask, conditions)
        return super().sample(context_images, context_labels, context_times, mask, query_times, n_samples,
                              generator, conditions)
