"""Markdown tables of the treatment experiment, from the per-target rows that forecast_quality.py writes.

    .venv/bin/python benchmarks/treatment_tables.py --work $WORK/fq128

reads ``<work>/targets.csv`` (one row per patient, target and model; written by
``benchmarks/forecast_quality.py --treatment both``; with several --work folders, their rows together, each
folder's patients kept apart) and prints five tables, per treatment stratum of the gap
(none, or a treatment event between the last context scan and the target) and horizon bin (days after the last
context scan):

1. whole-tumour Dice / absolute volume error (ml) of every model, ``lci`` and ``linear`` included;
2. calibrated 80% / 95% coverage of the volume intervals of the trained models;
3. treatment-aware minus treatment-blind, and minus ``lci``, per trained kind, with 95% bootstrap intervals over
   patients (bins of at least 10 targets);
4. each served model (``<kind>_served``) minus the better of ``lci`` and ``linear`` in the bin, on Dice and on
   volume error, with the same intervals (the better baseline is picked per bin on these held-out targets, the
   strictest comparison);
5. calibrated coverage of each served model per stratum and bin of at least 10 targets, with 95% bootstrap
   intervals over patients and the number of patients: how far a cell's coverage moves with its patients alone.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from longitudinal.evaluation.strata import PairedDifference, paired_difference, stratum_mean

ORDER = ("lci", "linear", "tfm", "tfm_blind", "tfm_served", "np", "np_blind", "np_served")
BINS = (("0-90", 0.0, 90.0), ("90-180", 90.0, 180.0), ("180-365", 180.0, 365.0), (">365", 365.0, math.inf),
        ("all", 0.0, math.inf))
# (row label, treated_gap flag or None for every target, the stratum name paired_difference takes)
STRATA = (("all", None, "all"), ("untreated gap", False, "untreated"), ("treatment in gap", True, "treated"))
MIN_TARGETS = 10


@dataclass(frozen=True)
class Table:
    """Rows of one markdown table."""

    title: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]

    def markdown(self) -> str:
        lines = [f"#### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "| " + " | ".join("---" for _ in self.header) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def read_targets(path: Path) -> list[dict]:
    """The rows of targets.csv as records (``horizon_days`` in days, ``treated_gap`` bool, metrics float)."""
    out = []
    with path.open() as f:
        for r in csv.DictReader(f):
            rec = {"patient_id": r["patient_id"], "target_idx": int(r["target_idx"]),
                   "last_context_idx": int(r["last_context_idx"]), "model": r["model"],
                   "horizon_days": float(r["days_after_last_context"]), "treated_gap": r["treated_gap"] == "true"}
            for k in ("dice_whole", "volume_error_ml", "coverage80", "coverage95"):
                rec[k] = float(r[k]) if r.get(k, "") != "" else math.nan
            out.append(rec)
    return out


def _sel(recs: Sequence[dict], model: str, flag: bool | None, lo: float, hi: float) -> list[dict]:
    return [r for r in recs if r["model"] == model and (flag is None or r["treated_gap"] == flag)
            and lo <= r["horizon_days"] < hi]


def _mean(rows: Sequence[dict], key: str) -> float:
    xs = [r[key] for r in rows if not math.isnan(r[key])]
    return sum(xs) / len(xs) if xs else math.nan


def _diff(recs: Sequence[dict], a: str, b: str, key: str, stratum: str, lo: float, hi: float) -> str:
    d = paired_difference(recs, a, b, key, stratum, lo, hi)
    return (f"{d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]" if key == "dice_whole"
            else f"{d.mean:+.1f} [{d.lo:+.1f}, {d.hi:+.1f}]")


def _share(m: PairedDifference) -> str:
    return f"{m.mean:.2f} [{m.lo:.2f}, {m.hi:.2f}]"


def tables(recs: Sequence[dict]) -> list[Table]:
    """The five tables of the module docstring."""
    models = [m for m in ORDER if any(r["model"] == m for r in recs)]
    quality, coverage, aware, served, spread = [], [], [], [], []
    trained = [m for m in models if m not in ("lci", "linear")]
    for label, flag, _stratum in STRATA:
        for b, lo, hi in BINS:
            n = len(_sel(recs, "lci", flag, lo, hi))
            quality.append((label, b, str(n), *(
                f"{_mean(_sel(recs, m, flag, lo, hi), 'dice_whole'):.3f} / "
                f"{_mean(_sel(recs, m, flag, lo, hi), 'volume_error_ml'):.1f}" for m in models)))
            coverage.append((label, b, str(n), *(
                f"{_mean(_sel(recs, m, flag, lo, hi), 'coverage80'):.2f} / "
                f"{_mean(_sel(recs, m, flag, lo, hi), 'coverage95'):.2f}" for m in trained)))
    for kind in ("tfm", "np"):
        if kind not in models or f"{kind}_blind" not in models:
            continue
        for label, flag, stratum in STRATA[1:]:
            for b, lo, hi in BINS:
                n = len(_sel(recs, kind, flag, lo, hi))
                if n >= MIN_TARGETS:
                    aware.append((kind, label, b, str(n), *(
                        _diff(recs, kind, other, key, stratum, lo, hi)
                        for other in (f"{kind}_blind", "lci") for key in ("dice_whole", "volume_error_ml"))))
    for name in ("tfm_served", "np_served"):
        if name not in models:
            continue
        for label, flag, stratum in STRATA:
            for b, lo, hi in BINS:
                n = len(_sel(recs, name, flag, lo, hi))
                if n < MIN_TARGETS:
                    continue
                best_dice = max(("lci", "linear"), key=lambda m: _mean(_sel(recs, m, flag, lo, hi), "dice_whole"))
                best_err = min(("lci", "linear"),
                               key=lambda m: _mean(_sel(recs, m, flag, lo, hi), "volume_error_ml"))
                served.append((name, label, b, str(n), best_dice,
                               _diff(recs, name, best_dice, "dice_whole", stratum, lo, hi), best_err,
                               _diff(recs, name, best_err, "volume_error_ml", stratum, lo, hi)))
                c80, c95 = (stratum_mean(recs, name, key, stratum, lo, hi) for key in ("coverage80", "coverage95"))
                spread.append((name, label, b, str(n), str(c80.n_patients), _share(c80), _share(c95)))
    return [
        Table("Dice / volume error (ml) per stratum and horizon", ("stratum", "horizon", "n", *models), quality),
        Table("Calibrated 80% / 95% coverage of the volume intervals", ("stratum", "horizon", "n", *trained),
              coverage),
        Table("Aware minus blind, aware minus lci (mean [95% bootstrap interval over patients])",
              ("model", "stratum", "horizon", "n", "Dice - blind", "dV ml - blind", "Dice - lci", "dV ml - lci"),
              aware),
        Table("Served model minus the better of lci and linear in each bin",
              ("model", "stratum", "horizon", "n", "best Dice", "Dice - best", "best dV", "dV ml - best"), served),
        Table("Served models' coverage with 95% bootstrap intervals over patients",
              ("model", "stratum", "horizon", "n", "patients", "coverage 80%", "coverage 95%"), spread),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, nargs="+",
                    help="forecast_quality.py's --work folder; several: their held-out patients pooled (the same "
                         "runs scored on their own test split and, with --runs-from, on unseen cohorts)")
    args = ap.parse_args(argv)
    recs = []
    for i, work in enumerate(args.work):
        path = work / "targets.csv"
        if not path.is_file():
            ap.error(f"{path}: not found; run benchmarks/forecast_quality.py --work {work} --treatment both first")
        # Patients of different folders are different patients, even should a pseudonym repeat (a shared key).
        recs += [{**r, "patient_id": f"{i}:{r['patient_id']}"} if i else r for r in read_targets(path)]
    for t in tables(recs):
        print(t.markdown() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
