"""The one context rule: which scans a forecast sees, where its crop lies and how its intensities are scaled.

Training samples (``dataset.build_sample``) and every prediction (``longitudinal.predict``) use these functions,
so a model is applied exactly as it was trained:

- context: the (up to K) most recent scans strictly before the query day (:func:`context_indices`);
- crop: a box of the model's crop size centred on the union of the CONTEXT tumours' bounding boxes, or on the
  grid centre when no context scan shows tumour; targets never enter (:func:`crop_box`). With an adaptive field
  of view the box spans ``stride`` store voxels per crop voxel, the smallest whole stride whose box holds the
  context tumours plus a growth margin (:func:`fov_stride`); the crop is read at that coarser spacing
  (:func:`read_box`: mean of each stride^3 block for images, the majority class for labels), so a tumour larger
  than the fixed crop is still seen and forecast whole;
- normalisation: "none" keeps store intensities; "context_mean" divides each channel by the mean of the non-zero
  voxels of the context crops, and targets get the same factor (:func:`normalisation_scale`).

All coordinates are voxels of the store grid in (z, y, x) order; days are days since the patient's baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from longitudinal.data.crops import BBox, context_crop_centre, crop_start, read_crop, tumour_bbox, union_bbox

# Query days are rounded to 1e-6 (query resolution), which can lift a query at a scan's own day just past it:
# a scan counts as "before" a query only when it is earlier by more than that rounding.
SAME_DAY_DAYS = 1e-6


@dataclass(frozen=True)
class CropBox:
    """start: (z, y, x) voxel of the store grid at crop index (0, 0, 0) (may be negative: zero padding);
    size: (D, H, W) crop voxels; stride: store voxels per crop voxel along each axis (1: the store's spacing).
    The box covers ``size * stride`` store voxels."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]
    stride: int = 1

    @property
    def extent(self) -> tuple[int, int, int]:
        """(z, y, x) store voxels covered by the box."""
        return tuple(int(n) * self.stride for n in self.size)  # type: ignore[return-value]

    def spacing_mm(self, store_spacing_mm: Sequence[float]) -> tuple[float, float, float]:
        """(z, y, x) size of one crop voxel in mm."""
        return tuple(float(s) * self.stride for s in store_spacing_mm)  # type: ignore[return-value]

    def voxel_ml(self, store_spacing_mm: Sequence[float]) -> float:
        return float(np.prod(self.spacing_mm(store_spacing_mm))) / 1000.0

    def volume_ml(self, spacing_mm: Sequence[float]) -> float:
        """The crop's volume in ml (``spacing_mm``: the store's): the largest tumour a forecast on it can show."""
        return float(np.prod(self.size)) * self.voxel_ml(spacing_mm)

    def upsample(self, crop: np.ndarray) -> np.ndarray:
        """A crop-grid array (..., D, H, W) repeated onto the store voxels it covers (..., *extent)."""
        out = crop
        for axis in (-3, -2, -1):
            out = np.repeat(out, self.stride, axis=axis)
        return out


Event = tuple[float, float, str]  # (start day, end day, kind); days since baseline; end = start without an end


def recorded_events(treatments: Sequence[Any]) -> list[Event]:
    """The store's ``TreatmentRecord``s as (start day, end day, kind) events, in start order."""
    out = []
    for t in treatments:
        start = float(t.start_days)
        end = float(t.end_days) if getattr(t, "end_days", None) is not None else start
        out.append((start, end, str(t.kind)))
    return sorted(out)


def treatment_in_gap(events: Sequence[Event], last_day: float, query_day: float) -> bool:
    """Whether a treatment acts between the last context scan and the query: an event whose days [start, end]
    overlap (``last_day``, ``query_day``] (a course that began before the last scan and is still running counts)."""
    return any(float(end) > float(last_day) and float(start) <= float(query_day) for start, end, _ in events)


@dataclass
class PatientSeries:
    """One patient's registered scans as a model sees them: the first ``n`` time points of ``arrays``.

    arrays: ``storage.store.PatientArrays``-like (``image`` (T, C, Z, Y, X) and ``label`` (T, Z, Y, X) sliceable
    lazily, ``days`` (T,) float64 days since baseline, ``spacing_mm`` (z, y, x), ``channels``). ``upto(i)`` is the
    series as of a cut before scan i (what evaluation forecasts from); it shares the tumour-box cache.
    """

    arrays: Any
    n: int | None = None
    _boxes: dict[int, BBox | None] = field(default_factory=dict, repr=False)
    plan: tuple[Event, ...] = ()

    def __post_init__(self) -> None:
        total = len(self.arrays.days)
        self.n = total if self.n is None else int(self.n)
        if not 1 <= self.n <= total:
            raise ValueError(f"a series needs 1..{total} scans, got {self.n}")

    @property
    def patient_id(self) -> str:
        return str(self.arrays.patient_id)

    @property
    def days(self) -> np.ndarray:
        """(n,) float64 days since baseline."""
        return np.asarray(self.arrays.days, dtype=np.float64)[: self.n]

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.arrays.label.shape[-3:])  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.arrays.spacing_mm)  # type: ignore[return-value]

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000.0

    @property
    def recorded_events(self) -> list[Event]:
        """The stored treatment history (empty for an untreated patient or a store without treatments)."""
        return recorded_events(getattr(self.arrays, "treatments", None) or [])

    @property
    def events(self) -> list[Event]:
        """Recorded history plus the planned events of a counterfactual query, in start order."""
        return sorted([*self.recorded_events, *self.plan])

    def with_plan(self, plan: Sequence[Event]) -> PatientSeries:
        """The same scans with ``plan`` (planned events, days since baseline) added to the recorded history;
        the treatment history of one counterfactual query. Raises ValueError for an event before the last scan."""
        last = float(self.days[-1])
        early = [e for e in plan if float(e[0]) < last]
        if early:
            raise ValueError(f"a plan starts after the last scan (day {last:g}); planned events on days "
                             f"{[float(e[0]) for e in early]} start before it")
        return replace(self, plan=tuple((float(a), float(b), str(k)) for a, b, k in plan), _boxes=self._boxes)

    def upto(self, n: int) -> PatientSeries:
        """The first ``n`` scans only."""
        return replace(self, n=int(n), _boxes=self._boxes)

    def box(self, t: int) -> BBox | None:
        """Tumour bounding box of scan ``t`` (None when its label is empty), read once."""
        if t not in self._boxes:
            self._boxes[t] = tumour_bbox(np.asarray(self.arrays.label[int(t)]))
        return self._boxes[t]


def context_indices(days: Sequence[float], query_day: float, max_context: int) -> tuple[int, ...]:
    """Indices of the (up to ``max_context``) most recent scans strictly before ``query_day`` (empty when none)."""
    before = [t for t, d in enumerate(days) if float(d) < float(query_day) - SAME_DAY_DAYS]
    return tuple(before[-int(max_context):])


MAX_STRIDE = 4  # 32 crop voxels at 2 mm x 4 = 256 mm: a whole head


def fov_stride(context_boxes: Sequence[BBox | None], size: Sequence[int], spacing_mm: Sequence[float],
               margin_mm: float) -> int:
    """The smallest stride (1..MAX_STRIDE) whose box of ``size`` crop voxels holds the union of the context
    tumours plus ``margin_mm`` of growth room on every side; 1 when no context scan shows tumour."""
    box = union_bbox(list(context_boxes))
    if box is None:
        return 1
    need = [(hi - lo) + 2 * float(margin_mm) / float(sp) for lo, hi, sp in zip(box[0], box[1], spacing_mm,
                                                                                 strict=True)]
    stride = max(int(np.ceil(n / int(s) - 1e-9)) for n, s in zip(need, size, strict=True))
    return int(min(max(stride, 1), MAX_STRIDE))


def crop_box(context_boxes: Sequence[BBox | None], grid: Sequence[int], size: Sequence[int],
             shift: Sequence[int] = (0, 0, 0), stride: int = 1) -> CropBox:
    """The crop of ``size`` crop voxels of ``stride`` store voxels each, centred on the context tumours (module
    docstring); ``shift`` is training's jitter in crop voxels."""
    size3 = tuple(int(s) for s in size)
    extent = tuple(n * int(stride) for n in size3)
    start = crop_start(context_crop_centre(list(context_boxes), tuple(grid)), extent,
                       tuple(int(d) * int(stride) for d in shift))
    return CropBox(start, size3, int(stride))  # type: ignore[arg-type]


def context_crop(series: PatientSeries, ctx: Sequence[int], size: Sequence[int], data: Any) -> CropBox:
    """The crop of a forecast from the scans ``ctx`` of ``series`` under ``data`` (``DataSettings``-like:
    ``fov`` "fixed" or "adaptive", ``fov_margin_mm``)."""
    return adapted_crop([series.box(t) for t in ctx], series.grid, size, series.spacing_mm, data)


def adapted_crop(context_boxes: Sequence[BBox | None], grid: Sequence[int], size: Sequence[int],
                 spacing_mm: Sequence[float], data: Any, shift: Sequence[int] = (0, 0, 0)) -> CropBox:
    """:func:`crop_box` with the stride ``data`` asks for (``fov`` "adaptive": :func:`fov_stride`; else 1)."""
    stride = 1
    if getattr(data, "fov", "fixed") == "adaptive":
        stride = fov_stride(context_boxes, size, spacing_mm, float(data.fov_margin_mm))
    return crop_box(context_boxes, grid, size, shift, stride)


def read_box(array: Any, leading: tuple[Any, ...], box: CropBox, labels: bool = False) -> np.ndarray:
    """``array[leading..., box]`` on the crop grid (zero padded outside the array), see :func:`pool_box`."""
    return pool_box(read_crop(array, leading, box.start, box.extent), box, labels)


def pool_box(raw: np.ndarray, box: CropBox, labels: bool = False) -> np.ndarray:
    """Store voxels (..., *box.extent) -> the crop grid (..., *box.size): unchanged when the stride is 1;
    otherwise the mean of each stride^3 block (images), or for ``labels`` (integer classes 0..2) tumour where at
    least half the block is tumour (so the whole-tumour volume is kept, not split between its classes), and
    within it enhancing (2) where enhancing voxels are at least as many as the other tumour voxels."""
    k = box.stride
    if k == 1:
        return raw
    lead = raw.shape[:-3]
    blocks = raw.reshape(*lead, box.size[0], k, box.size[1], k, box.size[2], k)
    axes = (-5, -3, -1)
    if not labels:
        return blocks.mean(axis=axes, dtype=np.float64).astype(raw.dtype)
    tumour = (blocks > 0).sum(axis=axes)
    enhancing = (blocks == 2).sum(axis=axes)
    out = np.where(2 * tumour >= k**3, np.where(2 * enhancing >= tumour, 2, 1), 0)
    return out.astype(raw.dtype)


def normalisation_scale(context_images: torch.Tensor, normalize: str) -> torch.Tensor:
    """Per-channel divisor [C] of the context crops ``context_images`` [K, C, D, H, W] (ones for "none")."""
    c = context_images.shape[1]
    if normalize == "none":
        return torch.ones(c, dtype=torch.float32)
    if normalize != "context_mean":
        raise ValueError(f"normalize must be 'none' or 'context_mean', got {normalize!r}")
    nz = context_images.abs() > 0
    denom = (context_images * nz).sum((0, 2, 3, 4)) / nz.sum((0, 2, 3, 4)).clamp_min(1)
    return torch.where(denom > 0, denom, torch.ones_like(denom)).float()
