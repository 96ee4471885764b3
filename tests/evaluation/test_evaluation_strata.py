"""Evaluation by treatment stratum on a phantom store whose patients carry treatment events: every record says
whether a treatment lies in its gap (hand-computed here), the per-target CSV holds one row per (patient,
target, model), the stratum rows partition the pooled ones, and `longitudinal evaluate` prints a table per
stratum."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.data.phantoms import make_phantom_store, phantom_record
from longitudinal.evaluation.harness import EvalConfig, EvaluationReport, evaluate_models
from longitudinal.evaluation.strata import (
    REPORT_STRATA,
    TARGET_COLUMNS,
    stratum_counts,
    stratum_rows,
    write_targets_csv,
)
from longitudinal.models.base import build_model
from storage.schema import TreatmentRecord
from storage.store import CohortStore

CFG = EvalConfig(crop_size=(16, 16, 16), max_context=2, n_samples=2, device="cpu")
TINY_TFM = {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 16, "steps": 2}
GRID = (24, 24, 24)

# Patient -> (scan days, treatment events). Days since baseline; phantom sessions carry no dates, so the event
# dates only need to be valid ISO dates.
PATIENTS = {
    "A": ((0.0, 100.0, 200.0, 300.0), [TreatmentRecord("surgery", 150.0, "2030-05-31")]),
    "B": ((0.0, 50.0, 120.0), [TreatmentRecord("radiotherapy", 30.0, "2030-01-31", 60.0, "2030-03-02")]),
    "C": ((0.0, 80.0, 170.0), []),
}
# (patient, last context scan, target scan) -> a treatment in the gap (last day, target day]. A's surgery on
# day 150 lies between scans 0 or 1 and scans 2 or 3 only; B's radiotherapy (days 30-60) is still running at
# scan 1 (day 50), so every gap of B is treated; C is never treated.
EXPECTED = {
    ("A", 0, 1): False, ("A", 0, 2): True, ("A", 0, 3): True, ("A", 1, 2): True, ("A", 1, 3): True,
    ("A", 2, 3): False,
    ("B", 0, 1): True, ("B", 0, 2): True, ("B", 1, 2): True,
    ("C", 0, 1): False, ("C", 0, 2): False, ("C", 1, 2): False,
}


def treated_store(url: str) -> str:
    """The PATIENTS as growing-sphere phantoms with their treatment events."""
    store = CohortStore.open(url, create=True)
    for i, (pid, (days, events)) in enumerate(PATIENTS.items()):
        radii = [4.0 + 0.01 * d for d in days]
        rec = phantom_record(pid, days, [(12.0, 12.0, 12.0)] * len(days), radii, grid=GRID, seed=i)
        store.write_patient(dataclasses.replace(rec, treatments=list(events)))
    return url


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    return treated_store(str(tmp_path_factory.mktemp("strata") / "c.zarr"))


@pytest.fixture(scope="module")
def report(url) -> EvaluationReport:
    torch.manual_seed(0)
    return evaluate_models({"tfm": build_model("tfm", TINY_TFM, in_channels=2)}, url, config=CFG)


def test_every_record_says_whether_a_treatment_lies_in_its_gap(report):
    assert report.models == ["lci", "linear", "tfm"] and report.n_targets == len(EXPECTED)
    for rec in report.records:
        assert rec["treated_gap"] is EXPECTED[(rec["patient_id"], rec["last_context_idx"], rec["target_idx"])]
        days = PATIENTS[rec["patient_id"]][0]
        gap = days[rec["target_idx"]] - days[rec["last_context_idx"]]
        assert rec["days_after_last_context"] == rec["horizon_days"] == pytest.approx(gap, abs=1e-3)
    assert stratum_counts(report) == {"all": 12, "untreated": 5, "treated": 7}


def test_targets_csv_has_one_row_per_patient_target_and_model(report, tmp_path):
    path = write_targets_csv(report.records, tmp_path / "out" / "targets.csv")
    assert [p.name for p in path.parent.iterdir()] == ["targets.csv"]  # the temporary file was renamed
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == TARGET_COLUMNS
        rows = list(reader)
    keys = [(r["patient_id"], int(r["last_context_idx"]), int(r["target_idx"]), r["model"]) for r in rows]
    assert len(keys) == len(set(keys)) == 3 * len(EXPECTED)
    assert set(keys) == {(*k, m) for k in EXPECTED for m in ("lci", "linear", "tfm")}
    assert not any("date" in c for c in TARGET_COLUMNS)  # days only
    by_key = {(r["patient_id"], r["target_idx"], r["last_context_idx"], r["model"]): r for r in report.records}
    for row, key in zip(rows, keys, strict=True):
        assert row["treated_gap"] == ("true" if EXPECTED[key[:3]] else "false")
        rec = by_key[(key[0], key[2], key[1], key[3])]
        assert float(row["days_after_last_context"]) == pytest.approx(rec["horizon_days"])
        assert float(row["volume_error_ml"]) == pytest.approx(rec["volume_error_ml"])
        lo80, med, hi80 = (float(row[f"interval_{k}_ml"]) for k in ("lo80", "median", "hi80"))
        assert float(row["interval_lo95_ml"]) <= lo80 <= med <= hi80 <= float(row["interval_hi95_ml"])
        if row["model"] == "tfm":
            assert row["coverage80"] in ("0.0", "1.0") and row["coverage95"] in ("0.0", "1.0")
        else:  # deterministic: no interval to cover the truth
            assert row["coverage80"] == row["coverage95"] == ""


def test_stratum_rows_partition_the_pooled_rows_with_coverage_per_stratum(report):
    rows = stratum_rows(report)
    assert [r["stratum"] for r in rows] == [s for s in REPORT_STRATA for _ in range(len(report.rows))]
    pooled = [r for r in rows if r["stratum"] == "all"]
    for a, b in zip(pooled, report.rows, strict=True):
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) for k in a)
    by = {(r["stratum"], r["model"], r["horizon"]): r for r in rows}
    for model in report.models:
        for horizon in {r["horizon"] for r in report.rows}:
            assert by[("untreated", model, horizon)]["n"] + by[("treated", model, horizon)]["n"] == \
                by[("all", model, horizon)]["n"]
    # Coverage per stratum: the mean over that stratum's sampled targets.
    for stratum, treated in (("untreated", False), ("treated", True)):
        cov = [r["coverage80"] for r in report.records if r["model"] == "tfm" and r["treated_gap"] is treated]
        assert by[(stratum, "tfm", "all")]["coverage80"] == pytest.approx(sum(cov) / len(cov))
        assert "coverage80" not in by[(stratum, "lci", "all")]
        # Skill is against LCI on the same stratum's targets.
        lci, lin = by[(stratum, "lci", "all")], by[(stratum, "linear", "all")]
        assert lin["skill_volume_error_ml"] == pytest.approx(1 - lin["volume_error_ml"] / lci["volume_error_ml"])


def test_evaluate_cli_prints_a_table_per_stratum_and_writes_the_targets_csv(url, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGITUDINAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "220")
    monkeypatch.delenv("LONGITUDINAL_DASK_ADDRESS", raising=False)
    runner = CliRunner()
    out_csv, out_json = tmp_path / "targets.csv", tmp_path / "rows.json"
    res = runner.invoke(app, ["evaluate", "--store", url, "--model", "linear", "--targets-csv", str(out_csv),
                              "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    assert "12 targets, 3 patients" in res.output
    assert "untreated gap: 5 of 12 targets" in res.output and "treatment in gap: 7 of 12 targets" in res.output
    with out_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * len(EXPECTED) and {r["model"] for r in rows} == {"lci", "linear"}
    assert sum(r["treated_gap"] == "true" for r in rows) == 2 * sum(EXPECTED.values())
    assert {r["stratum"] for r in json.loads(out_json.read_text())} == set(REPORT_STRATA)

    # A store without treatment events: the treated stratum is named, not printed as an empty table.
    plain = make_phantom_store(str(tmp_path / "plain.zarr"), n_patients=2, seed=1, grid=GRID, n_times=(3, 3)).url
    res = runner.invoke(app, ["evaluate", "--store", plain, "--model", "lci"])
    assert res.exit_code == 0, res.output
    assert "treatment in gap: no targets" in res.output and "untreated gap: 6 of 6 targets" in res.output


def _paired_records() -> list[dict]:
    """Two patients, two targets each, at 30 and 200 days; p1's gaps are treated. Model "a" beats "b" on Dice by
    0.1 on p0 and 0.3 on p1; "b" has one extra target that "a" lacks."""
    recs = []
    for pid, gain, treated in (("p0", 0.1, False), ("p1", 0.3, True)):
        for target, days in ((1, 30.0), (2, 200.0)):
            base = {"patient_id": pid, "last_context_idx": 0, "target_idx": target, "horizon_days": days,
                    "treated_gap": treated}
            recs.append({**base, "model": "b", "dice_whole": 0.5})
            recs.append({**base, "model": "a", "dice_whole": 0.5 + gain})
    recs.append({"patient_id": "p0", "last_context_idx": 0, "target_idx": 3, "horizon_days": 400.0,
                 "treated_gap": False, "model": "b", "dice_whole": 0.0})
    return recs


def test_paired_difference_pairs_targets_and_resamples_patients() -> None:
    from longitudinal.evaluation.strata import paired_difference

    recs = _paired_records()
    d = paired_difference(recs, "a", "b", "dice_whole")
    assert (d.n_targets, d.n_patients) == (4, 2)  # b's unpaired target is left out
    assert d.mean == pytest.approx(0.2)
    # Resampling two patients gives means 0.1 (p0 twice), 0.2 or 0.3 (p1 twice): the interval spans them.
    assert d.lo == pytest.approx(0.1) and d.hi == pytest.approx(0.3)
    treated = paired_difference(recs, "a", "b", "dice_whole", stratum="treated")
    assert (treated.n_patients, treated.mean, treated.lo, treated.hi) == (1, pytest.approx(0.3),
                                                                         pytest.approx(0.3), pytest.approx(0.3))
    late = paired_difference(recs, "a", "b", "dice_whole", lo_days=90.0, hi_days=365.0)
    assert late.n_targets == 2 and late.mean == pytest.approx(0.2)
    reverse = paired_difference(recs, "b", "a", "dice_whole")
    assert reverse.mean == pytest.approx(-0.2) and reverse.hi == pytest.approx(-0.1)
    empty = paired_difference(recs, "a", "b", "dice_whole", lo_days=1000.0)
    assert empty.n_targets == 0 and math.isnan(empty.mean)


def test_stratum_mean_weights_targets_and_resamples_patients() -> None:
    from longitudinal.evaluation.strata import stratum_mean

    # p0 covers 1 of its 3 targets, p1 both of its 2; NaN coverage (a deterministic model) is left out.
    recs = [{"patient_id": "p0", "model": "m", "horizon_days": d, "treated_gap": False, "coverage80": c}
            for d, c in ((10.0, 1.0), (20.0, 0.0), (200.0, 0.0))]
    recs += [{"patient_id": "p1", "model": "m", "horizon_days": d, "treated_gap": True, "coverage80": 1.0}
             for d in (10.0, 300.0)]
    recs += [{"patient_id": "p1", "model": "m", "horizon_days": 50.0, "treated_gap": True, "coverage80": math.nan},
             {"patient_id": "p0", "model": "other", "horizon_days": 10.0, "treated_gap": False, "coverage80": 1.0}]
    m = stratum_mean(recs, "m", "coverage80")
    assert (m.n_targets, m.n_patients) == (5, 2) and m.mean == pytest.approx(3 / 5)
    # Resamples: p0 twice (1/3), one of each (3/5), p1 twice (1): the interval spans the extremes.
    assert m.lo == pytest.approx(1 / 3) and m.hi == pytest.approx(1.0)
    untreated = stratum_mean(recs, "m", "coverage80", stratum="untreated", hi_days=90.0)
    assert (untreated.n_targets, untreated.mean, untreated.lo, untreated.hi) == (
        2, pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5))
    assert stratum_mean(recs, "absent", "coverage80").n_targets == 0


def test_leave_one_patient_out_covers_exchangeable_patients_and_misses_an_outlier() -> None:
    from longitudinal.evaluation.strata import leave_one_patient_out

    def rec(pid: str, err: float, days: float = 10.0) -> dict:
        return {"patient_id": pid, "horizon_days": days, "treated_gap": False, "volume_true_ml": 50.0 + err,
                "volume_median_ml": 50.0, "volume_enh_true_ml": 5.0, "volume_enh_median_ml": 5.0}

    # Ten patients with the same errors 1..10 ml: every held-out fit has 90 scores, each value 9 times; the 80%
    # half-width is the 73rd (ceil(91 * 0.8)) = 9 ml and the 95% one the 87th = 10 ml, so 9 of 10 and 10 of 10.
    recs = [rec(f"p{i}", float(e) * (-1) ** e) for i in range(10) for e in range(1, 11)]
    rows = leave_one_patient_out(recs, form="symmetric")
    first = {(r.stratum, r.lo_days): r for r in rows}
    assert set(first) == {("all", 0.0), ("untreated", 0.0)}  # no treated target, no later bin
    cell = first[("untreated", 0.0)]
    assert (cell.n_targets, cell.n_patients) == (100, 10)
    assert cell.coverage80 == pytest.approx(0.9) and cell.coverage95 == pytest.approx(1.0)
    # One more patient whose errors are 100 ml: none of its targets is covered, the others still are.
    wild = leave_one_patient_out(recs + [rec("wild", 100.0) for _ in range(10)], form="symmetric")
    cell = next(r for r in wild if r.stratum == "all")
    assert cell.n_patients == 11 and cell.coverage95 == pytest.approx(100 / 110)
    with pytest.raises(ValueError, match="2 patients"):
        leave_one_patient_out([rec("p0", 1.0)], form="symmetric")
