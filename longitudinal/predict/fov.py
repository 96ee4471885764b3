"""Does a forecast fit the model's field of view?

A model sees, and forecasts, one crop of the store grid centred on the context tumours (``data.context``): 32^3
crop voxels; at the store's 2 mm that is 64 mm a side and 262 ml. With the adaptive field of view (the default
for models trained now) the crop's stride grows with the tumour, so these signs become rare; models trained with
a fixed field of view keep the 262 ml limit. A tumour larger than the crop is cut at its
border, and a forecast tumour cannot grow past it, so the forecast volume of such a tumour is wrong, usually far
too small (it can even seem to shrink). Three signs, each computed per query:

- the context tumours' bounding box reaches the crop's border (touches or exceeds it);
- in at least ``BORDER_SAMPLE_SHARE`` of the samples the forecast tumour reaches the crop's border;
- the whole-tumour interval is capped at the crop volume (``max_ml``), the largest volume the model can forecast.

Any of them makes the forecast untrustworthy; ``FieldOfView.warnings`` says which, in plain words, and the CLI,
the JSON summary and the plot carry them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from longitudinal.data.context import CropBox
from longitudinal.data.crops import BBox, union_bbox

# A forecast whose tumour reaches the crop's border in at least this share of its samples is flagged.
BORDER_SAMPLE_SHARE = 0.1
# Interval ends within this of the crop volume count as capped (ml).
CAP_TOLERANCE_ML = 1e-6



@dataclass(frozen=True)
class FieldOfView:
    """Whether one query's forecast fits the model's field of view (the crop).

    crop_mm: (z, y, x) extent of the crop in mm; crop_ml: its volume, the largest tumour the model can forecast.
    tumour_mm: (z, y, x) extent in mm of the bounding box of the tumours in the scans the model saw (None when
    they show no tumour). context_at_border: that box touches or passes the crop's border. samples_at_border:
    share of the samples whose forecast whole tumour reaches the crop's border. capped: the upper end of the
    whole-tumour 95% interval is capped at ``crop_ml``.
    """

    crop_mm: tuple[float, float, float]
    crop_ml: float
    tumour_mm: tuple[float, float, float] | None
    context_at_border: bool
    samples_at_border: float
    n_samples: int
    capped: bool

    @property
    def ok(self) -> bool:
        return not (self.context_at_border or self.samples_at_border >= BORDER_SAMPLE_SHARE or self.capped)

    def warnings(self) -> list[str]:
        """Why the forecast cannot be trusted, one sentence per sign (empty when it fits)."""
        fov = f"{_mm(self.crop_mm)} ({_ml(self.crop_ml)})"
        out = []
        if self.context_at_border:
            size = _mm(self.tumour_mm) if self.tumour_mm is not None else "?"
            verb = "is larger than" if self.tumour_mm is not None and any(
                t > c for t, c in zip(self.tumour_mm, self.crop_mm, strict=True)) else "reaches the edge of"
            out.append(f"the tumour in the scans the model saw ({size}) {verb} the model's field of view {fov}")
        if self.samples_at_border >= BORDER_SAMPLE_SHARE:
            k = round(self.samples_at_border * self.n_samples)
            out.append(f"in {k} of {self.n_samples} samples the forecast tumour reaches the edge of the field of "
                       f"view: growth beyond it cannot be forecast")
        if self.capped:
            out.append(f"the volume interval is capped at {_ml(self.crop_ml)}, the volume of the field of view")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "crop_mm": [round(v, 3) for v in self.crop_mm],
            "crop_ml": round(self.crop_ml, 3),
            "tumour_mm": None if self.tumour_mm is None else [round(v, 3) for v in self.tumour_mm],
            "context_at_border": self.context_at_border,
            "samples_at_border": round(self.samples_at_border, 4),
            "capped": self.capped,
            "warnings": self.warnings(),
        }


def _mm(extent: Sequence[float]) -> str:
    return " x ".join(f"{v:.0f}" for v in extent) + " mm"


def _ml(v: float) -> str:
    return f"{v:.0f} ml" if v >= 10 else f"{v:.2g} ml"


def box_at_border(box: BBox | None, start: Sequence[int], size: Sequence[int]) -> bool:
    """True when the voxel box touches or passes the border of the crop at ``start`` of ``size``."""
    if box is None:
        return False
    lo, hi = box
    return any(lo[i] <= start[i] or hi[i] >= start[i] + size[i] for i in range(3))


def border_share(probs: torch.Tensor) -> np.ndarray:
    """Per query, the share of samples whose whole-tumour mask (the hard mask ``sample_volumes_ml`` counts) has a
    voxel on the crop's border: probs [Q, S, 3, D, H, W] -> (Q,) float64."""
    p0, p1, p2 = probs[:, :, 0], probs[:, :, 1], probs[:, :, 2]
    whole = p1.maximum(p2) > p0  # [Q, S, D, H, W]
    faces = [whole[..., 0, :, :], whole[..., -1, :, :], whole[..., :, 0, :], whole[..., :, -1, :],
             whole[..., :, :, 0], whole[..., :, :, -1]]
    touch = torch.zeros(whole.shape[:2], dtype=torch.bool, device=whole.device)
    for f in faces:
        touch |= f.flatten(2).any(-1)
    return touch.float().mean(1).cpu().numpy().astype(np.float64)


def field_of_view(crop: CropBox, spacing_mm: Sequence[float], context_boxes: Sequence[BBox | None],
                  samples_at_border: float, n_samples: int, whole_hi_ml: float, max_ml: float) -> FieldOfView:
    """The check of one query (module docstring). crop: the crop of the store grid; spacing_mm: the store's
    (z, y, x) voxel size; context_boxes: the tumour boxes (store voxels) of the context scans; whole_hi_ml: the
    upper end of the whole-tumour 95% interval."""
    sp = [float(s) for s in spacing_mm]
    box = union_bbox(list(context_boxes))
    tumour = None if box is None else tuple((box[1][i] - box[0][i]) * sp[i] for i in range(3))
    return FieldOfView(
        crop_mm=tuple(int(crop.extent[i]) * sp[i] for i in range(3)),  # type: ignore[arg-type]
        crop_ml=float(max_ml),
        tumour_mm=tumour,  # type: ignore[arg-type]
        context_at_border=box_at_border(box, crop.start, crop.extent),
        samples_at_border=float(samples_at_border),
        n_samples=int(n_samples),
        capped=bool(whole_hi_ml >= max_ml - CAP_TOLERANCE_ML),
    )
