"""Tumour-centred crops read lazily from (zarr or numpy) arrays, padded with zeros at the volume borders.

All coordinates are voxels of the store grid in (z, y, x) order. A crop is described by its ``start`` corner
(may be negative or run past the far border; those voxels are zero-padded) and its ``size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BBox = tuple[tuple[int, int, int], tuple[int, int, int]]  # (lo inclusive, hi exclusive), voxels (z, y, x)


def tumour_bbox(label: np.ndarray) -> BBox | None:
    """Bounding box of ``label > 0`` for one (Z, Y, X) volume, or None when it has no tumour."""
    nz = np.nonzero(label > 0)
    if len(nz[0]) == 0:
        return None
    lo = tuple(int(a.min()) for a in nz)
    hi = tuple(int(a.max()) + 1 for a in nz)
    return lo, hi  # type: ignore[return-value]


def union_bbox(boxes: Sequence[BBox | None]) -> BBox | None:
    """Smallest box holding every non-None box (None when all are None)."""
    real = [b for b in boxes if b is not None]
    if not real:
        return None
    lo = tuple(min(b[0][i] for b in real) for i in range(3))
    hi = tuple(max(b[1][i] for b in real) for i in range(3))
    return lo, hi  # type: ignore[return-value]


def crop_start(
    centre: Sequence[float], size: Sequence[int], shift: Sequence[int] = (0, 0, 0)
) -> tuple[int, int, int]:
    """Start corner of a crop of ``size`` whose centre voxel is ``centre`` (+ integer ``shift``)."""
    return tuple(int(np.floor(c - s / 2 + 0.5)) + int(d) for c, s, d in zip(centre, size, shift, strict=True))  # type: ignore[return-value]


def context_crop_centre(boxes: Sequence[BBox | None], grid: Sequence[int]) -> tuple[float, float, float]:
    """Crop centre (z, y, x voxels) from the CONTEXT tumours only: centre of the union of their bounding boxes,
    or the grid centre when no context scan shows tumour. Targets never enter, so a crop cannot leak where the
    future tumour is."""
    box = union_bbox(boxes)
    if box is None:
        return tuple((n - 1) / 2 for n in grid)  # type: ignore[return-value]
    return tuple((lo + hi - 1) / 2 for lo, hi in zip(box[0], box[1], strict=True))  # type: ignore[return-value]


def read_crop(
    array: Any, leading: tuple[Any, ...], start: Sequence[int], size: Sequence[int]
) -> np.ndarray:
    """Read ``array[leading..., z0:z0+dz, y0:y0+dy, x0:x0+dx]`` with zero padding wherever the box leaves the
    array. ``array`` is anything sliceable like numpy (a zarr array reads only the chunks it touches).

    ``leading`` indexes the non-spatial leading axes; a list in it (e.g. several time points) is read with one
    orthogonal selection when the array supports ``oindex``.
    """
    shape = array.shape[-3:]
    src, dst = [], []
    for s0, n, dim in zip(start, size, shape, strict=True):
        lo, hi = max(s0, 0), min(s0 + n, dim)
        if hi <= lo:  # crop entirely outside this axis: nothing to read
            lo = hi = 0
        src.append(slice(lo, hi))
        dst.append(slice(lo - s0, lo - s0 + (hi - lo)))
    sel = (*leading, *src)
    if any(isinstance(i, list | np.ndarray) for i in leading) and hasattr(array, "oindex"):
        part = np.asarray(array.oindex[sel])
    else:
        part = np.asarray(array[sel])
    out = np.zeros(part.shape[:-3] + tuple(size), dtype=part.dtype)
    out[(..., *dst)] = part
    return out
