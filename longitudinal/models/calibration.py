"""Split-conformal calibration of forecast volume intervals.

Sampled models (``tfm``, ``np``) are over-confident: their samples spread far less than their errors. Every
trained model therefore carries a calibration fitted on held-out patients (its *validation* patients, never the
test patients it is scored on), and every volume interval a user sees goes through ``volume_quantiles``. Why each
choice below, with the measurements: docs/decisions/interval-calibration.md.

    m       = median of the model's sampled volumes (ml) for one query
    scale   = offset_years + gap_years          (gap = query time - last context scan, in years, >= 0)
    score e = |v_true - m| / scale              one per calibration target ("symmetric" form)
    score e = |v_true - m| / (scale * (c + |m - v_lin|))      "scaled" form (the default), c = ``difficulty_ml``
    score e = (v_true - m) / scale              "signed" form (older checkpoints; each end from its own quantile)

The p-interval of a new query is ``m -/+ scale * q_p`` (scaled: ``m -/+ scale * (c + |m - v_lin|) * q_p``; the
lower end clipped at 0 ml), with ``q_p`` the conservative conformal p-quantile of the scores (rank
ceil((n + 1) p)): with exchangeable targets it covers at least p. Its forecast distribution, scored by CRPS, is
the 2n equally likely volumes ``m -/+ scale * e_j``. v_lin is the closed-form ``linear`` baseline's volume
forecast of the same query (``linear_volumes_ml`` in ``longitudinal.models.baselines``); a scaled calibration
needs it (``reference_ml``) with every query.

Mondrian (per-horizon) scores: the scores are grouped by horizon bin (the evaluation's bins, ``edges_days``) and
a query takes the quantiles of its own bin's scores, so the guarantee holds per bin. A bin with fewer than
``min_per_bin`` targets is merged with its smaller neighbour first. Targets of one patient are correlated, so the
precision rests on the number of calibration *patients* (``n_patients``).

Treatment strata: a query whose gap (last context scan, query] holds a treatment event is "treated", the others
"untreated" (``longitudinal.data.context.treatment_in_gap`` decides). Errors after a resection or a course of
radiotherapy are not exchangeable with those of untreated growth, so beside the pooled ``"whole"`` /
``"enhancing"`` calibrations a model may carry one per stratum, keyed ``"<structure>:<stratum>"``
(``calibration_key``); a stratum is fitted only from at least ``MIN_PER_STRATUM`` validation targets of its own,
and a query of a stratum without one takes the pooled calibration (``select_calibration``).

The sampled trajectories themselves are left as they are (their masks, coherence and GED are the model's);
only the volume summaries go through the calibration. Pure numpy; stored as a plain dict in the checkpoint's
``meta["volume_calibration"]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from longitudinal.models.base import DAYS_PER_YEAR

# Central intervals: 80% = [q10, q90], 95% = [q2.5, q97.5] (the same levels as the raw-sample summaries).
LEVELS: dict[str, float] = {"lo95": 0.025, "lo80": 0.10, "median": 0.50, "hi80": 0.90, "hi95": 0.975}
STRUCTURES = ("whole", "enhancing")
FORMS = ("scaled", "symmetric", "signed")
DEFAULT_FORM = "scaled"
DEFAULT_DIFFICULTY_ML = 10.0
MIN_PER_BIN = 20
# Strata of a query by its gap: a treatment event between the last context scan and the query, or none.
STRATA = ("untreated", "treated")
# A stratum gets its own calibration from as many targets as the pooled fit asks of one horizon bin; with
# fewer its quantiles would rest on a handful of scores, and the pooled calibration serves it instead.
MIN_PER_STRATUM = MIN_PER_BIN


@dataclass(frozen=True)
class VolumeCalibration:
    """Conformal scores of one structure's volume (``whole`` or ``enhancing``).

    scores: sorted scores e of the n validation targets (all bins pooled): absolute errors per year of scale
        (ml per year) in the ``"symmetric"`` form, divided again by ``difficulty_ml + |m - v_lin|`` (ml) in the
        ``"scaled"`` form (then unitless, per year), signed ones (v_true - m, ml per year) in the ``"signed"``
        form of older checkpoints.
    offset_years: the scale's offset (years). n_patients: validation patients the scores come from.
    edges_days: interior horizon-bin edges (days, increasing; bins are [lo, hi) of the gap) after merging
        small bins; empty: one bin. bin_scores: the sorted scores of each of the len(edges_days) + 1 bins
        (empty: the pooled ``scores``). form: ``"scaled"``, ``"symmetric"`` or ``"signed"`` (see the module
        docstring). difficulty_ml: the scaled form's c (ml, > 0); 0 for the other forms.
    """

    structure: str
    scores: tuple[float, ...]
    offset_years: float = 0.25
    n_patients: int = 0
    edges_days: tuple[float, ...] = ()
    bin_scores: tuple[tuple[float, ...], ...] = ()
    form: str = "symmetric"
    difficulty_ml: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.structure not in STRUCTURES:
            problems.append(f"structure must be one of {STRUCTURES}, got {self.structure!r}")
        if len(self.scores) < 1 or not all(math.isfinite(s) for s in self.scores):
            problems.append(f"need >= 1 finite score, got {len(self.scores)}")
        if self.form not in FORMS:
            problems.append(f"form must be one of {FORMS}, got {self.form!r}")
        elif self.form != "signed" and any(s < 0 for s in self.scores):
            problems.append(f"{self.form} scores are absolute errors and must be >= 0")
        if self.form == "scaled" and not (math.isfinite(self.difficulty_ml) and self.difficulty_ml > 0):
            problems.append(f"the scaled form needs difficulty_ml > 0 (ml), got {self.difficulty_ml}")
        if self.form != "scaled" and self.difficulty_ml != 0:
            problems.append(f"difficulty_ml is for the scaled form only, got {self.difficulty_ml} with {self.form!r}")
        if not self.offset_years > 0:
            problems.append(f"offset_years must be > 0, got {self.offset_years}")
        if list(self.edges_days) != sorted(set(self.edges_days)):
            problems.append(f"edges_days must be strictly increasing, got {list(self.edges_days)}")
        if self.bin_scores:
            if len(self.bin_scores) != len(self.edges_days) + 1 or not all(self.bin_scores):
                problems.append(f"need {len(self.edges_days) + 1} non-empty bins of scores for edges "
                                f"{list(self.edges_days)}, got sizes {[len(b) for b in self.bin_scores]}")
            elif sum(len(b) for b in self.bin_scores) != len(self.scores):
                problems.append("bin_scores must partition scores")
        elif self.edges_days:
            problems.append("edges_days given without bin_scores")
        if problems:
            raise ValueError("volume calibration: " + "; ".join(problems))

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def needs_reference(self) -> bool:
        """True when every query needs the linear baseline's volume forecast (``reference_ml``)."""
        return self.form == "scaled"

    def scale(self, gap_days: np.ndarray | float, median_ml: np.ndarray | float,
              reference_ml: np.ndarray | float | None = None) -> np.ndarray:
        """What a score is multiplied by to give a half-width in ml: ``offset + gap years``, times
        ``difficulty_ml + |median - reference|`` in the scaled form (gap in days, volumes in ml)."""
        s = horizon_scale(gap_days, self.offset_years)
        if not self.needs_reference:
            return s
        if reference_ml is None:
            raise ValueError("this volume calibration is difficulty-scaled: give reference_ml, the linear "
                             "baseline's volume forecast of the query (longitudinal.models.baselines."
                             "linear_volumes_ml)")
        ref = np.asarray(reference_ml, dtype=np.float64)
        if not np.all(np.isfinite(ref)):
            raise ValueError(f"reference_ml must be finite, got {reference_ml}")
        return s * (self.difficulty_ml + np.abs(np.asarray(median_ml, dtype=np.float64) - ref))

    @classmethod
    def fit(cls, structure: str, true_ml: Sequence[float], median_ml: Sequence[float], gap_days: Sequence[float],
            offset_years: float = 0.25, n_patients: int = 0, edges_days: Sequence[float] = (),
            min_per_bin: int = MIN_PER_BIN, form: str = "symmetric", reference_ml: Sequence[float] | None = None,
            difficulty_ml: float = DEFAULT_DIFFICULTY_ML) -> VolumeCalibration:
        """Scores from validation targets: true volumes, the model's median sampled volumes (ml) and the gaps
        from the last context scan to the target (days), all of length n. ``edges_days``: interior edges of
        the horizon bins (days); bins with fewer than ``min_per_bin`` targets are merged into a neighbour.
        ``form``: ``"symmetric"`` (absolute scores), ``"scaled"`` (absolute scores divided by ``difficulty_ml
        + |median - reference|``, which then needs ``reference_ml``: the linear baseline's volume forecast of
        every target, ml, length n) or ``"signed"``."""
        t, m, g = (np.asarray(x, dtype=np.float64).ravel() for x in (true_ml, median_ml, gap_days))
        if not (t.size == m.size == g.size) or t.size == 0:
            raise ValueError(f"volume calibration: need n >= 1 aligned values, got {t.size}, {m.size}, {g.size}")
        if form not in FORMS:
            raise ValueError(f"volume calibration: form must be one of {FORMS}, got {form!r}")
        ref = None
        if form == "scaled":
            if reference_ml is None:
                raise ValueError("volume calibration: the scaled form needs reference_ml (the linear baseline's "
                                 "volume forecast of every target)")
            ref = np.asarray(reference_ml, dtype=np.float64).ravel()
            if ref.size != t.size:
                raise ValueError(f"volume calibration: need {t.size} reference volumes, got {ref.size}")
        c = float(difficulty_ml) if form == "scaled" else 0.0
        proto = cls(structure, (0.0,), offset_years, form=form, difficulty_ml=c)  # validates form, c, offset
        scores = (t - m) / proto.scale(g, m, ref)
        if form != "signed":
            scores = np.abs(scores)
        edges = _merged_edges(g, sorted(float(e) for e in edges_days), min_per_bin)
        pooled = tuple(float(v) for v in np.sort(scores))
        if not edges:
            return cls(structure, pooled, offset_years, n_patients, form=form, difficulty_ml=c)
        which = np.searchsorted(np.asarray(edges), g, side="right")
        bins = tuple(tuple(float(v) for v in np.sort(scores[which == i])) for i in range(len(edges) + 1))
        return cls(structure, pooled, offset_years, n_patients, tuple(edges), bins, form, c)

    def scores_for(self, gap_days: float) -> tuple[float, ...]:
        """The sorted scores of the horizon bin that holds ``gap_days`` (days from the last context scan)."""
        if not self.bin_scores:
            return self.scores
        return self.bin_scores[int(np.searchsorted(np.asarray(self.edges_days), float(gap_days), side="right"))]

    def samples(self, median_ml: float, gap_days: float, reference_ml: float | None = None) -> np.ndarray:
        """The calibrated forecast distribution of one query as equally likely volumes (ml, >= 0, sorted): one
        per validation score of the query's horizon bin (signed form), or two, ``m -/+ scale * e`` (symmetric,
        scaled; ``reference_ml``: see ``quantiles``)."""
        e = np.asarray(self.scores_for(gap_days))
        if self.form != "signed":
            e = np.concatenate([-e[::-1], e])
        return np.maximum(median_ml + float(self.scale(gap_days, median_ml, reference_ml)) * e, 0.0)

    def quantiles(self, median_ml: float, gap_days: float, reference_ml: float | None = None) -> dict[str, float]:
        """{lo95, lo80, median, hi80, hi95} (ml) of the calibrated distribution, ordered by construction.

        Symmetric and scaled forms: the p-interval (p = 0.80, 0.95) is ``median_ml -/+ scale * e_(k)``, e_(k)
        the k-th smallest score of the query's bin with k = ceil((n + 1) p) (the largest when k > n), the lower
        end clipped at 0; the median is ``median_ml``. ``scale`` is ``self.scale``: the scaled form needs
        ``reference_ml``, the linear baseline's volume forecast of the query (ml), and raises without it.

        Signed form: the outer quantiles use the conservative conformal order statistics (rank ceil((n+1) p)
        from the top for the upper ends, floor((n+1) p) from the bottom for the lower ends): with n validation targets
        exchangeable with the new one (n = the targets of the query's horizon bin), the interval covers at
        least its nominal level. With too few targets
        for a level, the extreme score is used (coverage may then fall short; ``n`` says how many there are).
        """
        if self.form != "signed":
            e = self.scores_for(gap_days)
            n, m = len(e), float(median_ml)
            scale = float(self.scale(float(gap_days), m, reference_ml))
            sym = {}
            for name, p in LEVELS.items():
                central = abs(2 * p - 1)  # lo80 / hi80 -> 0.80: both ends of one interval share a half-width
                half = scale * e[min(math.ceil((n + 1) * central), n) - 1] if central > 0 else 0.0
                sym[name] = max(m + math.copysign(half, p - 0.5), 0.0)
            return sym
        vals = self.samples(median_ml, gap_days)  # sorted: scores are sorted and the map is monotone
        n = vals.size
        out = {}
        for name, p in LEVELS.items():
            if p < 0.5:
                k = math.floor((n + 1) * p)  # 1-based rank from the bottom
                out[name] = float(vals[max(k, 1) - 1])
            elif p > 0.5:
                k = math.ceil((n + 1) * p)
                out[name] = float(vals[min(k, n) - 1])
            else:
                out[name] = float(np.median(vals))
        return out

    def method(self) -> str:
        """How the intervals are made, in words (the forecast JSON's ``intervals``)."""
        scores = {"scaled": f"difficulty-scaled scores, c = {self.difficulty_ml:g} ml",
                  "symmetric": "symmetric scores", "signed": "signed scores"}[self.form]
        return f"split conformal ({scores}, per horizon bin) around the median sampled volume"

    def summary(self) -> str:
        """'N targets of M held-out patients': what the calibration was fitted on."""
        return f"{self.n} targets of {self.n_patients} held-out patients"

    def bin_sizes(self) -> list[int]:
        """Validation targets per horizon bin (one entry when the scores are pooled)."""
        return [len(b) for b in self.bin_scores] or [self.n]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"] = list(self.scores)
        d["edges_days"] = list(self.edges_days)
        d["bin_scores"] = [list(b) for b in self.bin_scores]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VolumeCalibration:
        return cls(structure=str(d["structure"]), scores=tuple(float(s) for s in d["scores"]),
                   offset_years=float(d.get("offset_years", 0.25)), n_patients=int(d.get("n_patients", 0)),
                   edges_days=tuple(float(e) for e in d.get("edges_days", ())),
                   bin_scores=tuple(tuple(float(s) for s in b) for b in d.get("bin_scores", ())),
                   # dicts written before the symmetric form held signed scores
                   form=str(d.get("form", "signed")), difficulty_ml=float(d.get("difficulty_ml", 0.0)))


def stratum_name(treated: bool) -> str:
    """``"treated"`` when a treatment event lies in the query's gap, else ``"untreated"``."""
    return STRATA[1] if treated else STRATA[0]


def calibration_key(structure: str, stratum: str | None = None) -> str:
    """The calibration dict's key: ``structure`` (pooled) or ``"<structure>:<stratum>"``."""
    if structure not in STRUCTURES or (stratum is not None and stratum not in STRATA):
        raise ValueError(f"calibration key: structure must be one of {STRUCTURES} and stratum None or one of "
                         f"{STRATA}, got {structure!r}, {stratum!r}")
    return structure if stratum is None else f"{structure}:{stratum}"


def selected_key(cals: Mapping[str, VolumeCalibration], structure: str, treated: bool) -> str | None:
    """The key in ``cals`` of the calibration of ``structure`` for one query: its stratum's (``treated``: a
    treatment event in the gap, ``"<structure>:<stratum>"``) when the model carries one, else the pooled one
    (``structure``); None when the model has no calibration of that structure."""
    own = calibration_key(structure, stratum_name(treated))
    if own in cals:
        return own
    return structure if structure in cals else None


def select_calibration(cals: Mapping[str, VolumeCalibration], structure: str, treated: bool
                       ) -> VolumeCalibration | None:
    """The calibration of ``structure`` for one query (``selected_key``); None when the model has none."""
    key = selected_key(cals, structure, treated)
    return None if key is None else cals[key]


def calibrations_from_meta(meta: Mapping[str, Any] | None) -> dict[str, VolumeCalibration]:
    """{key: VolumeCalibration} from a checkpoint's meta (empty when the model has none); keys are the pooled
    structures and, when fitted, ``"<structure>:<stratum>"`` (``calibration_key``). Raises ValueError for a
    key that is neither."""
    raw = (meta or {}).get("volume_calibration") or {}
    out = {}
    for key, value in raw.items():
        cal = VolumeCalibration.from_dict(value)
        structure, _, stratum = str(key).partition(":")
        valid = structure in STRUCTURES and (stratum == "" if ":" not in str(key) else stratum in STRATA)
        if not valid:
            raise ValueError(f"volume calibration key {key!r}: expected one of {STRUCTURES}, optionally with "
                             f"':<stratum>' ({STRATA})")
        out[str(key)] = cal
    return out


def calibrations_to_meta(cals: Mapping[str, VolumeCalibration]) -> dict[str, Any]:
    """The ``meta["volume_calibration"]`` value for ``cals``."""
    return {k: c.to_dict() for k, c in cals.items()}


def _merged_edges(gap_days: np.ndarray, edges: list[float], min_per_bin: int) -> list[float]:
    """Interior edges left after merging, smallest bin first, every bin holding < ``min_per_bin`` gaps into
    its smaller neighbour (the only one at either end)."""
    edges = [e for e in edges if math.isfinite(e)]
    while edges:
        counts = np.bincount(np.searchsorted(np.asarray(edges), gap_days, side="right"), minlength=len(edges) + 1)
        i = int(np.argmin(counts))
        if counts[i] >= min_per_bin:
            break
        if i == 0:
            j = 1
        elif i == len(counts) - 1:
            j = i - 1
        else:
            j = i - 1 if counts[i - 1] <= counts[i + 1] else i + 1
        del edges[min(i, j)]  # the edge between bins i and j
    return edges


def horizon_scale(gap_days: np.ndarray | float, offset_years: float) -> np.ndarray:
    """The conformal scale ``offset_years + gap in years`` (gap in days, clipped at 0) that scores divide by."""
    return offset_years + np.maximum(np.asarray(gap_days, dtype=np.float64), 0.0) / DAYS_PER_YEAR


def volume_quantiles(samples_ml: Sequence[float] | np.ndarray, gap_days: float = 0.0,
                     calibration: VolumeCalibration | None = None, reference_ml: float | None = None,
                     max_ml: float | None = None) -> dict[str, float]:
    """{lo95, lo80, median, hi80, hi95} (ml) of one query: the calibrated distribution around the median of the
    sampled volumes when ``calibration`` is given, else the raw samples' quantiles. ``gap_days``: days from the
    last context scan to the query; ``reference_ml``: the linear baseline's volume forecast of the query (ml),
    needed by a difficulty-scaled calibration; ``max_ml``: the largest volume the model can forecast (its
    crop's volume, ml), which caps every end. Always ordered lo95 <= lo80 <= median <= hi80 <= hi95."""
    values = np.asarray(samples_ml, dtype=np.float64).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"need >= 1 finite volume sample, got {values.size} values")
    if calibration is not None:
        q = calibration.quantiles(float(np.median(values)), gap_days, reference_ml)
        vals = np.maximum.accumulate([q[k] for k in LEVELS])
    else:
        # Linear-interpolated quantiles are monotone in the level; the running maximum removes any
        # floating-point inversion.
        vals = np.maximum.accumulate(np.quantile(values, list(LEVELS.values())))
    if max_ml is not None:
        # A forecast mask lies inside the model's crop, so no volume beyond the crop's is possible; a calibrated
        # end past it (few calibration patients, a query far from the linear forecast) is capped there.
        vals = np.minimum(vals, float(max_ml))
    return dict(zip(LEVELS, (float(v) for v in vals), strict=True))
