"""Per-process lazy reads of a cohort store for training and evaluation samples, with a crop read cache.

The reader holds only the store URL and plain settings; the store and its zarr arrays are opened lazily inside
each process (the per-process cache is dropped when pickled), so DataLoader workers work with any start method
and with object stores.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from longitudinal.data.crops import BBox, read_crop, tumour_bbox

__all__ = ["InMemoryReader", "StoreReader"]


class StoreReader:
    """Per-process lazy access to a cohort store: opened on first use, caches each patient's arrays and the
    tumour bounding box of each (patient, time). Pickles as just its settings.

    Read cache: zarr decodes whole chunks (64^3 in schema v1) even for a 32^3 crop, so a crop costs several
    decoded chunks per time point and channel. `read` therefore keeps, per (patient, array, time), the crop
    window grown by ``cache_margin`` voxels on every side (LRU, at most ``cache_mb`` MB per process); a later
    crop of the same time point that lies inside it (jitter, another context subset) is sliced from memory.
    Results are identical with or without the cache; ``cache_mb=0`` disables it.
    """

    def __init__(self, url: str, cache_mb: float = 512.0, cache_margin: int = 8) -> None:
        self.url = url
        self.cache_bytes = int(cache_mb * 2**20)
        self.cache_margin = int(cache_margin)
        self._store: Any = None
        self._arrays: dict[str, Any] = {}
        self._boxes: dict[tuple[str, int], BBox | None] = {}
        self._cache: OrderedDict[tuple[str, str, int], tuple[tuple[int, int, int], np.ndarray]] = OrderedDict()
        self._cached_bytes = 0
        self.hits = 0
        self.misses = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "cache_mb": self.cache_bytes / 2**20, "cache_margin": self.cache_margin}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state.get("cache_mb", 512.0), state.get("cache_margin", 8))

    def reset(self) -> None:
        """Forget open handles (call in a freshly started worker); bounding boxes and the read cache stay."""
        self._store = None
        self._arrays = {}

    @property
    def store(self) -> Any:
        if self._store is None:
            from storage.store import CohortStore

            self._store = CohortStore.open(self.url)
        return self._store

    def arrays(self, pid: str) -> Any:
        """storage PatientArrays: lazy ``image`` (T,C,Z,Y,X), ``label`` (T,Z,Y,X), numpy ``days``, ``spacing_mm``."""
        if pid not in self._arrays:
            self._arrays[pid] = self.store.arrays(pid)
        return self._arrays[pid]

    def days(self, pid: str) -> np.ndarray:
        return np.asarray(self.arrays(pid).days, dtype=np.float64)

    def bbox(self, pid: str, t: int) -> BBox | None:
        key = (pid, int(t))
        if key not in self._boxes:
            self._boxes[key] = tumour_bbox(np.asarray(self.arrays(pid).label[int(t)]))
        return self._boxes[key]

    def read(self, pid: str, name: str, times: Sequence[int], start: Sequence[int], size: Sequence[int]
             ) -> np.ndarray:
        """Crop ``size`` at ``start`` (voxels, zero-padded outside the volume) of array ``name`` ("image" ->
        [N, C, *size], "label" -> [N, *size]) at the time indices ``times``; one zarr read for every time
        point not in the cache."""
        arr = getattr(self.arrays(pid), name)
        lead = (slice(None),) if name == "image" else ()
        times = [int(t) for t in times]
        if self.cache_bytes <= 0:
            return read_crop(arr, (times, *lead), start, size)
        out: dict[int, np.ndarray] = {}
        missing = []
        for t in times:
            entry = self._cache.get((pid, name, t))
            if entry is not None and _inside(entry[0], entry[1].shape[-3:], start, size):
                self._cache.move_to_end((pid, name, t))
                out[t] = _slice_region(entry, start, size)
                self.hits += 1
            else:
                missing.append(t)
        if missing:
            self.misses += len(missing)
            m = self.cache_margin
            r_start = tuple(int(s) - m for s in start)
            block = read_crop(arr, (missing, *lead), r_start, tuple(int(n) + 2 * m for n in size))
            for i, t in enumerate(missing):
                entry = (r_start, np.ascontiguousarray(block[i]))
                self._put((pid, name, t), entry)
                out[t] = _slice_region(entry, start, size)
        return np.stack([out[t] for t in times])

    def _put(self, key: tuple[str, str, int], entry: tuple[tuple[int, int, int], np.ndarray]) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            self._cached_bytes -= old[1].nbytes
        if entry[1].nbytes > self.cache_bytes:
            return
        self._cache[key] = entry
        self._cached_bytes += entry[1].nbytes
        while self._cached_bytes > self.cache_bytes:
            _, (_, data) = self._cache.popitem(last=False)
            self._cached_bytes -= data.nbytes


def _inside(r_start: Sequence[int], r_size: Sequence[int], start: Sequence[int], size: Sequence[int]) -> bool:
    return all(rs <= s and s + n <= rs + rn for rs, rn, s, n in zip(r_start, r_size, start, size, strict=True))


def _slice_region(entry: tuple[tuple[int, int, int], np.ndarray], start: Sequence[int], size: Sequence[int]
                  ) -> np.ndarray:
    r_start, data = entry
    sl = tuple(slice(s - rs, s - rs + n) for s, rs, n in zip(start, r_start, size, strict=True))
    return data[(..., *sl)]


class InMemoryReader(StoreReader):
    """A StoreReader whose patients are read into memory up front (numpy arrays instead of zarr arrays): the
    no-I/O reference of the throughput benchmark. Pickles with its arrays."""

    def __init__(self, url: str, patient_ids: Sequence[str] | None = None) -> None:
        super().__init__(url, cache_mb=0)
        from dataclasses import replace

        for pid in (self.store.patient_ids() if patient_ids is None else patient_ids):
            arr = self.store.arrays(pid)
            self._arrays[pid] = replace(arr, image=np.asarray(arr.image[:]), label=np.asarray(arr.label[:]))

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "arrays": self._arrays, "boxes": self._boxes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        StoreReader.__init__(self, state["url"], cache_mb=0)
        self._arrays, self._boxes = state["arrays"], state["boxes"]

    def reset(self) -> None:
        """Nothing to reopen: the arrays live in memory."""
