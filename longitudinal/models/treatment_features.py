"""What a learned model knows of treatment: a fixed-size feature vector per (patient, query time).

From ``Conditions.treatments`` (events as start day, end day, kind), the time of the last context scan and the
query time, per treatment kind (``TREATMENT_KINDS``, in order):

- ``in_gap``: 1 when an event of the kind acts between the last context scan and the query (its days
  [start, end] overlap (last, query]; the same rule as ``data.context.treatment_in_gap``);
- ``exposure``: years of that overlap (0 for a surgery, which has no duration);
- ``since``: years from the most recent such event's start inside the gap to the query (how long the tumour
  has had to respond and regrow), 0 when none;
- ``history``: exp(-years since the most recent event of the kind that started by the last context scan),
  0 when none: the context scans already show its effect, the recency says how fresh it is.

Plus one scale feature: log2 of the crop's mean voxel size over 2 mm (0 when unknown), so a model knows that a
voxel of a coarser, adapted field of view is larger. Events that start after the query change no feature, so
a plan dated after the query changes nothing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longitudinal.models.base import DAYS_PER_YEAR, TREATMENT_KINDS, Conditions

FEATURES_PER_KIND = 4
N_TREATMENT_FEATURES = FEATURES_PER_KIND * len(TREATMENT_KINDS) + 1
REFERENCE_SPACING_MM = 2.0


def treatment_features(conditions: Conditions | None, t_last_days: Tensor, query_days: Tensor) -> Tensor:
    """[B, Q, N_TREATMENT_FEATURES] float32 features (module docstring).

    t_last_days [B]: day of each item's last context scan; query_days [B, Q]: query days (days since baseline).
    """
    b, q = query_days.shape
    dev = query_days.device
    out = torch.zeros(b, q, N_TREATMENT_FEATURES, device=dev)
    if conditions is not None and conditions.spacing_mm is not None:
        sp = conditions.spacing_mm.to(dev).float().mean(-1)  # [B]
        out[:, :, -1] = torch.log2(sp / REFERENCE_SPACING_MM)[:, None]
    if conditions is None or conditions.treatments is None or conditions.treatments.shape[1] == 0:
        return out
    ev = conditions.treatments.to(dev).double()  # [B, E, 3]
    start, end, kind = ev[..., 0][:, None], ev[..., 1][:, None], ev[..., 2][:, None]  # [B, 1, E]
    end = torch.maximum(end, start)
    last = t_last_days.to(dev).double()[:, None, None]  # [B, 1, 1]
    qd = query_days.to(dev).double()[:, :, None]  # [B, Q, 1]
    for k in range(len(TREATMENT_KINDS)):
        of_kind = kind == float(k)
        acts = of_kind & (end > last) & (start <= qd)  # [B, Q, E]
        overlap = (torch.minimum(end, qd) - torch.maximum(start, last)).clamp_min(0.0) * acts
        started = of_kind & (start > last) & (start <= qd)
        since = torch.where(started, qd - start, torch.full_like(overlap, math.inf)).amin(-1)
        before = of_kind & (start <= last)
        age = torch.where(before, last - start, torch.full_like(start, math.inf)).amin(-1)  # [B, 1]
        base = FEATURES_PER_KIND * k
        out[:, :, base] = acts.any(-1).float()
        out[:, :, base + 1] = (overlap.sum(-1) / DAYS_PER_YEAR).float()
        out[:, :, base + 2] = torch.where(torch.isinf(since), 0.0, since / DAYS_PER_YEAR).float()
        out[:, :, base + 3] = torch.exp(-age / DAYS_PER_YEAR).float().expand(b, q)
    return out
