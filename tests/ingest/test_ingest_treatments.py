"""Treatment histories through ingest: a treated synthetic cohort (BIDS ``sub-*_treatments.tsv``) is stored whole,
every event at the truth's day; a rerun changes nothing; a bad treatments CSV names every bad row by line while
the good rows land; BIDS tables are checked at discovery; a new baseline scan recounts the events' days."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.ingest import discover, ingest_cohort
from longitudinal.ingest.deid import date_shift_days, pseudonym
from longitudinal.settings import Settings
from longitudinal.synth import generate_cohort, load_ground_truth
from storage.schema import PatientRecord, SessionRecord, TreatmentRecord
from storage.store import CohortStore

KEY = "ingest-test-pseudonym-key"  # the key of conftest's ``settings``
SPACING_MM = 4.0
SUBJECTS = ("001", "002")


@pytest.fixture(scope="module")
def treated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two treated tiny patients (baseline, post-operative scan, follow-ups) ingested once."""
    tmp = tmp_path_factory.mktemp("treated")
    root = tmp / "bids"
    generate_cohort(root, len(SUBJECTS), 0, "tiny", treated_fraction=1.0)
    settings = Settings(home=tmp / "home", pseudonym_key=KEY, target_spacing_mm=SPACING_MM)
    store_url = str(tmp / "cohort.zarr")
    report = ingest_cohort(root, store_url, settings, workers=2)
    return {"root": root, "store": store_url, "settings": settings, "report": report, "tmp": tmp}


def _shifted(day: str, raw_id: str) -> str:
    return (dt.date.fromisoformat(day) + dt.timedelta(days=date_shift_days(raw_id, KEY.encode()))).isoformat()


def test_treated_cohort_is_stored_whole_with_every_event_at_the_true_day(treated: dict):
    report, store = treated["report"], CohortStore.open(treated["store"])
    truths = {sub: load_ground_truth(treated["root"], sub) for sub in SUBJECTS}
    assert report.quarantined == 0 and report.exit_code() == 0
    assert report.stored == sum(len(t["sessions"]) for t in truths.values())
    assert report.treatments_stored == sum(len(t["treatments"]) for t in truths.values())
    assert report.treatments_quarantined == 0
    assert store.verify() == []
    table = pd.read_parquet(treated["store"] + "/treatments")  # plain pandas, no project code
    for sub, truth in truths.items():
        pid = pseudonym(sub, KEY.encode())
        assert [s["cavity_ml"] > 0 for s in truth["sessions"]][1:] == [True] * (len(truth["sessions"]) - 1)
        events = store.patient_treatments(pid)
        want = sorted(truth["treatments"], key=lambda t: (t["date"], t["kind"]))
        assert [e.kind for e in events] == [t["kind"] for t in want]
        for event, t in zip(events, want, strict=True):
            assert abs(event.start_days - t["days_since_baseline"]) <= 1.0
            assert (event.end_days is None) == (t["end_days_since_baseline"] is None)
            if event.end_days is not None:
                assert abs(event.end_days - t["end_days_since_baseline"]) <= 1.0
            assert event.start_date == _shifted(t["date"], sub)  # the patient's own scan shift
        rows = table[table["patient_id"] == pid].sort_values("event")
        assert rows["start_days"].tolist() == [e.start_days for e in events]
        attrs = zarr.open_group(treated["store"], path=f"patients/{pid}", mode="r").attrs
        assert [a["kind"] for a in attrs["treatments"]] == [e.kind for e in events]
        # Post-operative scans keep their QC well below the limit: the tumour/cavity region is not judged.
        assert all(s.registration_metric < 0.25 for s in store.sessions(pid))


def test_demo_summary_lists_a_patients_treatments(treated: dict):
    from longitudinal.demo import treatments_text

    settings = treated["settings"].model_copy(update={"store": treated["store"]})
    pid = pseudonym("001", KEY.encode())
    lines = treatments_text(settings, pid).splitlines()
    events = CohortStore.open(treated["store"]).patient_treatments(pid)
    assert len(lines) == len(events) and lines[0].startswith(f"surgery: day {events[0].start_days:.0f} (")
    assert all(e.start_date in line for e, line in zip(events, lines, strict=True))


def test_reingest_changes_nothing(treated: dict):
    store = CohortStore.open(treated["store"])
    commits = {pid: store.patient_attrs(pid)["commit"]["generation"] for pid in store.patient_ids()}
    again = ingest_cohort(treated["root"], treated["store"], treated["settings"])
    assert (again.stored, again.quarantined, again.treatments_stored) == (0, 0, 0)
    assert again.treatments_skipped == treated["report"].treatments_stored
    assert {pid: store.patient_attrs(pid)["commit"]["generation"] for pid in store.patient_ids()} == commits


def test_bad_treatments_csv_names_every_bad_row_and_the_good_rows_land(treated: dict, tmp_path: Path,
                                                                        monkeypatch):
    store_url = str(tmp_path / "cohort.zarr")
    shutil.copytree(treated["store"], store_url)
    # The same scans; sub-002's events are stored but no longer listed by its BIDS table.
    source = tmp_path / "bids"
    shutil.copytree(treated["root"], source)
    (source / "sub-002" / "sub-002_treatments.tsv").unlink()
    truth = load_ground_truth(treated["root"], "002")
    surgery = next(t for t in truth["treatments"] if t["kind"] == "surgery")
    radio = next(t for t in truth["treatments"] if t["kind"] == "radiotherapy")
    first_surgery = next(t for t in load_ground_truth(treated["root"], "001")["treatments"] if t["kind"] == "surgery")
    lines = [
        "patient_id,date,treatment,end_date",
        "001,2026-03-01,chemotherapy,2026-08-15",  # 2: good (a new course)
        "001,2026-03-02,immunotherapy,",  # 3: unknown kind
        "001,2026-31-12,surgery,",  # 4: unparseable date
        "001,2026-05-01,radiotherapy,2026-04-01",  # 5: ends before it starts
        "001,1970-01-05,surgery,",  # 6: decades before the first scan
        "XYZ-404,2026-03-01,surgery,",  # 7: unknown patient
        "001,2026-03-01,chemotherapy,2026-08-15",  # 8: duplicate of line 2
        f"002,{surgery['date']},surgery,",  # 9: already stored (skipped, not a problem)
        f"002,{radio['date']},radiotherapy,2099-01-01",  # 10: impossible end date (after the plausible window)
        f"002,{radio['date']},radiotherapy,{radio['date']}",  # 11: conflicts with the stored course's end
        "002,2026-06-10,surgery,",  # 12: good
        f"001,{first_surgery['date']},surgery,",  # 13: the same event as a row of sub-001's BIDS table
    ]
    csv = tmp_path / "treatments.csv"
    csv.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # a BOM, as Excel writes
    monkeypatch.setenv("LONGITUDINAL_PSEUDONYM_KEY", KEY)
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "home"), "ingest", str(source),
                                      "--store", store_url, "--spacing", str(SPACING_MM), "--treatments", str(csv)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    bad = {3: "unknown treatment 'immunotherapy'", 4: "unparseable date", 5: "end_date before date",
           6: "more than 3653 days before the patient's first scan", 7: "unknown patient",
           8: "duplicate treatment", 10: "implausible date", 11: "conflicting treatment",
           13: "_treatments.tsv line 2"}  # named by its pseudonymised folder
    for line, why in bad.items():
        assert f"treatments.csv line {line}" in output, (line, result.output)
        assert why in output, (why, result.output)
    assert "9 treatment row(s) refused" in output
    (report,) = (tmp_path / "home" / "reports").glob("ingest-*.json")
    outcomes = [t for p in json.loads(report.read_text())["patients"] for t in p["treatments"]]
    refused = sorted(t["origin"] for t in outcomes if t["status"] == "quarantined")
    assert refused == sorted(f"treatments.csv line {n}" for n in bad)  # each bad row once, no good one
    assert sorted(t["origin"] for t in outcomes if t["status"] == "stored") == [
        "treatments.csv line 12", "treatments.csv line 2"]
    skipped = [t["origin"] for t in outcomes if t["status"] == "skipped"]
    assert [o for o in skipped if o.startswith("treatments.csv")] == ["treatments.csv line 9"]  # already stored
    for raw in ("2026-03-01", "2026-06-10", "1970-01-05", "XYZ-404"):
        assert raw not in result.output  # neither raw dates nor unknown ids are echoed

    store = CohortStore.open(store_url)
    assert store.verify() == []
    p1, p2 = pseudonym("001", KEY.encode()), pseudonym("002", KEY.encode())
    new1 = {(e.kind, e.start_date) for e in store.patient_treatments(p1)}
    assert ("chemotherapy", _shifted("2026-03-01", "001")) in new1
    assert ("surgery", _shifted("2026-06-10", "002")) in {(e.kind, e.start_date) for e in store.patient_treatments(p2)}
    before = CohortStore.open(treated["store"])
    assert len(store.patient_treatments(p1)) == len(before.patient_treatments(p1)) + 1
    assert len(store.patient_treatments(p2)) == len(before.patient_treatments(p2)) + 1
    assert store.index().equals(before.index())  # the scans are untouched


def test_bids_treatment_tables_are_checked_at_discovery(bids_copy: Path, settings):
    table = bids_copy / "sub-001" / "sub-001_treatments.tsv"
    table.write_text("\ufeffdate\ttreatment\tend_date\n"
                     "2015-02-10\tSurgery\tn/a\n"
                     "\n"  # a blank line still counts
                     "2015-03-10\tradiotherapy\t2015-04-20\n"
                     "2015-03-10\tradiation\t2015-04-20\n"
                     "yesterday\tchemotherapy\t\n"
                     "2015-03-10\tradiotherapy\t2015-04-21\n", encoding="utf-8")
    (bids_copy / "sub-002" / "sub-002_treatments.tsv").write_text("when\tdrug\n2015-01-01\tx\n")
    cohort = discover(bids_copy, settings)
    one = next(p for p in cohort.patients if p.raw_id == "001")
    two = next(p for p in cohort.patients if p.raw_id == "002")
    assert [(t.kind, t.origin) for t in one.treatments] == [
        ("surgery", "sub-001/sub-001_treatments.tsv line 2"),
        ("radiotherapy", "sub-001/sub-001_treatments.tsv line 4"),
    ]
    refused = {r.origin: " ".join(r.reasons) for r in one.refused_treatments}
    assert set(refused) == {f"sub-001/sub-001_treatments.tsv line {n}" for n in (5, 6, 7)}
    assert "unknown treatment 'radiation'" in refused["sub-001/sub-001_treatments.tsv line 5"]
    assert "unparseable date" in refused["sub-001/sub-001_treatments.tsv line 6"]
    assert "duplicate treatment" in refused["sub-001/sub-001_treatments.tsv line 7"]
    assert "2015" not in repr(one.treatments)  # real dates never show in a repr
    assert two.treatments == [] and "missing columns" in two.refused_treatments[0].reasons[0]


def test_a_new_baseline_scan_recounts_the_event_days():
    from longitudinal.ingest.patient import IngestConfig, _Entry, _merge
    from longitudinal.ingest.patient_events import PendingEvent

    grid = (4, 5, 3)

    def session(name: str, when: str, content: str) -> SessionRecord:
        return SessionRecord(name, 0.0, when, {"T1c": content}, np.eye(4).tolist(), 0.1, [3, 5, 4],
                             np.eye(4).tolist())

    stored = [session("ses-20310115", "2031-01-15T10:00:00", "a")]
    current = PatientRecord("p-000000000001", np.zeros((1, 2, *grid), np.float32), np.zeros((1, *grid), np.uint8),
                            np.zeros(1), ("T1c", "FLAIR"), (4.0, 4.0, 4.0), np.eye(4), stored,
                            [TreatmentRecord("surgery", 7.0, "2031-01-22")])
    earlier = _Entry(dt.datetime(2031, 1, 5, 9, 0), "x", session("ses-20310105", "2031-01-05T09:00:00", "b"),
                     np.zeros((2, *grid), np.float32), np.zeros(grid, np.uint8))
    course = PendingEvent("radiotherapy", dt.date(2031, 2, 1), dt.date(2031, 3, 12), "y")
    merged = _merge(current.patient_id, current, stored, [earlier], IngestConfig(), np.eye(4), (4.0, 4.0, 4.0),
                    [course])
    assert merged is not None and merged.check() == []
    assert [(t.kind, t.start_days, t.end_days) for t in merged.treatments] == [
        ("surgery", 17.0, None), ("radiotherapy", 27.0, 66.0)]
    assert dataclasses.replace(merged, treatments=[]).days.tolist()[0] == 0.0
