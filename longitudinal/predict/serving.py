"""Which forecast is served for a horizon: the model's, or a simple baseline's where the model did worse.

A learned model that loses to the last scan (``lci``) or to linear volume extrapolation (``linear``) at some
horizon should not be served there. After training, the model and both baselines forecast the validation
targets; per horizon bin (days after the last context scan) :func:`fit_serving_policy` picks the source:

- ``model`` when it is at least as good as the better baseline on whole-tumour Dice AND on volume error;
- otherwise the source (model, ``lci`` or ``linear``) with the least relative regret, summed over the two
  metrics, against the best of the three (a baseline that is best on both is chosen outright);
- a bin with fewer than ``MIN_TARGETS`` validation targets takes the choice of the nearest bin that has enough
  (the model when none has).

The policy travels in the checkpoint (``provenance["serving"]``); the Predictor applies it per query and each
forecast says which source served it (``QueryPrediction.served_by``, the JSON's ``served_by``). Validation
targets only: the held-out patients never choose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SOURCES = ("model", "lci", "linear")
MIN_TARGETS = 3


@dataclass(frozen=True)
class ServingPolicy:
    """edges_days: upper edges of the horizon bins ([0, e1), [e1, e2), ..., [e_last, inf)); sources: one of
    SOURCES per bin (``len(edges_days) + 1``). evidence: per bin label, the validation figures behind the choice
    (n targets, Dice and volume error of each source)."""

    edges_days: tuple[float, ...]
    sources: tuple[str, ...]
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if len(self.sources) != len(self.edges_days) + 1:
            problems.append(f"{len(self.sources)} sources for {len(self.edges_days) + 1} bins")
        bad = [s for s in self.sources if s not in SOURCES]
        if bad:
            problems.append(f"unknown sources {bad}; valid: {list(SOURCES)}")
        if list(self.edges_days) != sorted(self.edges_days):
            problems.append(f"edges must be increasing, got {list(self.edges_days)}")
        if problems:
            raise ValueError("bad serving policy: " + "; ".join(problems))

    def source_for(self, gap_days: float) -> str:
        """The source served for a query ``gap_days`` after the last context scan."""
        return self.sources[int(np.searchsorted(np.asarray(self.edges_days), float(gap_days), side="right"))]

    @property
    def uses_baselines(self) -> bool:
        return any(s != "model" for s in self.sources)

    def to_meta(self) -> dict[str, Any]:
        return {"edges_days": list(self.edges_days), "sources": list(self.sources), "evidence": self.evidence}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None) -> ServingPolicy | None:
        if not meta:
            return None
        return cls(tuple(float(e) for e in meta["edges_days"]), tuple(str(s) for s in meta["sources"]),
                   dict(meta.get("evidence") or {}))

    def describe(self) -> str:
        labels = bin_labels(self.edges_days)
        return ", ".join(f"{lab} d: {src}" for lab, src in zip(labels, self.sources, strict=True))


def bin_labels(edges_days: Sequence[float]) -> list[str]:
    lo = [0.0, *edges_days]
    hi = [*edges_days, math.inf]
    return [f">{a:g}" if math.isinf(b) else f"{a:g}-{b:g}" for a, b in zip(lo, hi, strict=True)]


def fit_serving_policy(records: Sequence[Mapping[str, Any]], names: Mapping[str, str],
                       edges_days: Sequence[float]) -> ServingPolicy:
    """The policy from validation records (one per (model, target): ``model``, ``horizon_days``,
    ``dice_whole``, ``volume_error_ml``). names: source ("model", "lci", "linear") -> the record's model name.
    Every source must have scored the same targets."""
    edges = tuple(float(e) for e in edges_days)
    labels = bin_labels(edges)
    per_bin: list[dict[str, tuple[float, float]] | None] = []
    evidence: dict[str, Any] = {}
    for b, label in enumerate(labels):
        lo = 0.0 if b == 0 else edges[b - 1]
        hi = edges[b] if b < len(edges) else math.inf
        figs: dict[str, tuple[float, float]] = {}
        n = 0
        for src, name in names.items():
            rows = [r for r in records if r["model"] == name and lo <= float(r["horizon_days"]) < hi]
            n = len(rows)
            if rows:
                figs[src] = (float(np.mean([r["dice_whole"] for r in rows])),
                             float(np.mean([r["volume_error_ml"] for r in rows])))
        enough = n >= MIN_TARGETS and set(figs) == set(names)
        per_bin.append(figs if enough else None)
        evidence[label] = {"n": n, **{f"{s}_dice": round(v[0], 4) for s, v in figs.items()},
                           **{f"{s}_volume_error_ml": round(v[1], 3) for s, v in figs.items()}}
    chosen = [_choose(f) if f is not None else None for f in per_bin]
    sources = []
    for b in range(len(labels)):
        if chosen[b] is not None:
            sources.append(chosen[b])
            continue
        near = sorted((abs(b - j), j) for j, c in enumerate(chosen) if c is not None)
        sources.append(chosen[near[0][1]] if near else "model")
    for label, src, own in zip(labels, sources, chosen, strict=True):
        evidence[label]["served_by"] = src
        evidence[label]["from_neighbour"] = own is None
    return ServingPolicy(edges, tuple(sources), evidence)  # type: ignore[arg-type]


def _choose(figs: Mapping[str, tuple[float, float]]) -> str:
    """The source of one bin (module docstring); figs: source -> (Dice, volume error ml)."""
    base_dice = max(figs[s][0] for s in figs if s != "model")
    base_err = min(figs[s][1] for s in figs if s != "model")
    if figs["model"][0] >= base_dice and figs["model"][1] <= base_err:
        return "model"
    top_dice = max(v[0] for v in figs.values())
    low_err = min(v[1] for v in figs.values())

    def regret(s: str) -> float:
        dice, err = figs[s]
        return (top_dice - dice) / max(top_dice, 1e-6) + (err - low_err) / max(low_err, 1e-6)

    return min(SOURCES, key=lambda s: (regret(s), SOURCES.index(s)) if s in figs else (math.inf, 0))
