"""Which forecast is served for a horizon: the model's, or a simple baseline's where the model did worse.

A learned model that loses to the last scan (``lci``) or to linear volume extrapolation (``linear``) at some
horizon should not be served there. After training, the model and both baselines forecast the validation
targets; per horizon bin (days after the last context scan) :func:`fit_serving_policy` picks the source:

- ``model`` when it is at least as good as the better baseline on whole-tumour Dice AND on volume error;
- otherwise the source (model, ``lci`` or ``linear``) with the least relative regret, summed over the two
  metrics, against the best of the three (a baseline that is best on both is chosen outright);
- a bin with fewer than ``MIN_TARGETS`` validation targets takes the choice of the nearest bin that has enough
  (the model when none has).

Treatment strata: a query whose gap (last context scan, query] holds a treatment event (recorded or planned;
``longitudinal.data.context.treatment_in_gap``) is ``treated``, the others ``untreated``. A model can beat linear
extrapolation after a resection and lose to it on untreated growth at the same horizon, so the same rule is also
applied to each stratum's own validation targets (records' ``treated_gap``): a (stratum, bin) cell with at least
``MIN_STRATUM_TARGETS`` targets gets its own choice, a smaller cell the pooled bin's.

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

from longitudinal.models.calibration import STRATA  # the same strata the intervals are calibrated on

SOURCES = ("model", "lci", "linear")
MIN_TARGETS = 3
# A stratum's own choice needs as many targets as the evaluation asks of a bin before it reports one.
MIN_STRATUM_TARGETS = 10


@dataclass(frozen=True)
class ServingPolicy:
    """edges_days: upper edges of the horizon bins ([0, e1), [e1, e2), ..., [e_last, inf)); sources: one of
    SOURCES per bin (``len(edges_days) + 1``), for any query. by_stratum: ``"treated"`` / ``"untreated"`` ->
    that stratum's sources per bin (a stratum not in it takes ``sources``). evidence: per bin label, the
    validation figures behind the pooled choice (n targets, Dice and volume error of each source), and under
    ``"strata"`` the same per stratum and bin."""

    edges_days: tuple[float, ...]
    sources: tuple[str, ...]
    evidence: dict[str, Any] = field(default_factory=dict)
    by_stratum: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        for name, srcs in [("pooled", self.sources), *self.by_stratum.items()]:
            if name != "pooled" and name not in STRATA:
                problems.append(f"unknown stratum {name!r}; valid: {list(STRATA)}")
            if len(srcs) != len(self.edges_days) + 1:
                problems.append(f"{len(srcs)} {name} sources for {len(self.edges_days) + 1} bins")
            bad = [s for s in srcs if s not in SOURCES]
            if bad:
                problems.append(f"unknown sources {bad} ({name}); valid: {list(SOURCES)}")
        if list(self.edges_days) != sorted(self.edges_days):
            problems.append(f"edges must be increasing, got {list(self.edges_days)}")
        if problems:
            raise ValueError("bad serving policy: " + "; ".join(problems))

    def source_for(self, gap_days: float, treated: bool | None = None) -> str:
        """The source served for a query ``gap_days`` after the last context scan; treated: whether a treatment
        event lies in that gap (None: unknown, the pooled choice)."""
        srcs = self.sources if treated is None else self.by_stratum.get(STRATA[int(bool(treated))], self.sources)
        return srcs[int(np.searchsorted(np.asarray(self.edges_days), float(gap_days), side="right"))]

    @property
    def uses_baselines(self) -> bool:
        return any(s != "model" for srcs in (self.sources, *self.by_stratum.values()) for s in srcs)

    def to_meta(self) -> dict[str, Any]:
        return {"edges_days": list(self.edges_days), "sources": list(self.sources), "evidence": self.evidence,
                "by_stratum": {k: list(v) for k, v in self.by_stratum.items()}}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None) -> ServingPolicy | None:
        if not meta:
            return None
        return cls(tuple(float(e) for e in meta["edges_days"]), tuple(str(s) for s in meta["sources"]),
                   dict(meta.get("evidence") or {}),
                   {str(k): tuple(str(s) for s in v) for k, v in (meta.get("by_stratum") or {}).items()})

    def describe(self) -> str:
        labels = bin_labels(self.edges_days)
        parts = []
        for b, (lab, src) in enumerate(zip(labels, self.sources, strict=True)):
            own = [f"{k} {v[b]}" for k, v in self.by_stratum.items() if v[b] != src]
            parts.append(f"{lab} d: {src}" + (f" ({', '.join(own)})" if own else ""))
        return ", ".join(parts)


def bin_labels(edges_days: Sequence[float]) -> list[str]:
    lo = [0.0, *edges_days]
    hi = [*edges_days, math.inf]
    return [f">{a:g}" if math.isinf(b) else f"{a:g}-{b:g}" for a, b in zip(lo, hi, strict=True)]


def fit_serving_policy(records: Sequence[Mapping[str, Any]], names: Mapping[str, str],
                       edges_days: Sequence[float]) -> ServingPolicy:
    """The policy from validation records (one per (model, target): ``model``, ``horizon_days``,
    ``dice_whole``, ``volume_error_ml``, and ``treated_gap`` for the per-stratum choices; records without it
    give a pooled policy only). names: source ("model", "lci", "linear") -> the record's model name. Every
    source must have scored the same targets."""
    edges = tuple(float(e) for e in edges_days)
    labels = bin_labels(edges)
    figs, evidence = _bin_figures(records, names, edges)
    chosen = [_choose(f) if f is not None and f[0] >= MIN_TARGETS else None for f in figs]
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
    by_stratum: dict[str, tuple[str, ...]] = {}
    strata_evidence: dict[str, Any] = {}
    if records and all("treated_gap" in r and r["treated_gap"] is not None for r in records):
        for k, stratum in enumerate(STRATA):
            rows = [r for r in records if bool(r["treated_gap"]) == bool(k)]
            s_figs, s_ev = _bin_figures(rows, names, edges)
            own_src = [_choose(f) if f is not None and f[0] >= MIN_STRATUM_TARGETS else None for f in s_figs]
            by_stratum[stratum] = tuple(o if o is not None else p for o, p in zip(own_src, sources, strict=True))
            for label, src, own in zip(labels, by_stratum[stratum], own_src, strict=True):
                s_ev[label]["served_by"] = src
                s_ev[label]["from_pooled"] = own is None
            strata_evidence[stratum] = s_ev
        evidence["strata"] = strata_evidence
    return ServingPolicy(edges, tuple(sources), evidence, by_stratum)  # type: ignore[arg-type]


def _bin_figures(records: Sequence[Mapping[str, Any]], names: Mapping[str, str], edges: tuple[float, ...]
                 ) -> tuple[list[tuple[int, dict[str, tuple[float, float]]] | None], dict[str, Any]]:
    """Per horizon bin: (n targets, source -> (mean Dice, mean volume error ml)), None where a source scored
    no target of the bin; and the evidence per bin label."""
    out: list[tuple[int, dict[str, tuple[float, float]]] | None] = []
    evidence: dict[str, Any] = {}
    for b, label in enumerate(bin_labels(edges)):
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
        out.append((n, figs) if set(figs) == set(names) else None)
        evidence[label] = {"n": n, **{f"{s}_dice": round(v[0], 4) for s, v in figs.items()},
                           **{f"{s}_volume_error_ml": round(v[1], 3) for s, v in figs.items()}}
    return out, evidence


def _choose(cell: tuple[int, Mapping[str, tuple[float, float]]]) -> str:
    """The source of one bin (module docstring); cell: (n targets, source -> (Dice, volume error ml))."""
    figs = cell[1]
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
