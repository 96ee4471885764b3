"""The LUMIERE layout end to end: a tiny synthetic cohort written by ``longitudinal synth --layout lumiere``
ingests with days 7 W + N - 1, the configured channels, labels mapped from DeepBraTumIA's coding, the surgery a
``week-W-1``/``week-W-2`` pair implies and the treatments CSV merged; a one-visit patient lands; a missing
segmentation is named and the session stored without a label; auto-detection picks the layout and no other."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.ingest import detect_kind, discover, ingest_cohort
from longitudinal.ingest.deid import pseudonym
from longitudinal.ingest.lumiere import WeekFolder, parse_week
from longitudinal.ingest.validate import relabel
from longitudinal.settings import DEFAULT_LUMIERE_LABEL_MAP, DEFAULT_LUMIERE_SEGMENTATION, Settings
from longitudinal.synth import load_lumiere_ground_truth, lumiere_schedule
from storage.store import CohortStore

KEY = "ingest-test-pseudonym-key"  # the key of conftest's ``settings``
SPACING_MM = 4.0
TRUTH_MAP = np.array([DEFAULT_LUMIERE_LABEL_MAP[v] for v in range(4)], dtype=np.uint8)


def _settings(tmp: Path, **update) -> Settings:
    return Settings(home=tmp / "home", pseudonym_key=KEY, target_spacing_mm=SPACING_MM, **update)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three tiny patients written by the CLI in the LUMIERE layout (seed 0: two untreated, one treated with a
    week-000-1/-2 pair), cut to: one untreated patient with a single visit, another missing the segmentation of
    its second visit; then ingested once with the written treatments CSV."""
    tmp = tmp_path_factory.mktemp("lumiere")
    root = tmp / "lumiere"
    result = CliRunner().invoke(app, ["--home", str(tmp / "home"), "synth", str(root), "--layout", "lumiere",
                                      "--patients", "3", "--seed", "0", "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    truth = {p["patient"]: p for p in load_lumiere_ground_truth(root)["patients"]}
    treated = [n for n, p in truth.items() if any(s["folder"].endswith("-2") for s in p["sessions"])]
    untreated = [n for n, p in truth.items() if not p["treated"]]
    assert len(treated) == 1 and len(untreated) == 2, truth
    single, unlabelled = untreated
    for s in truth[single]["sessions"][1:]:
        shutil.rmtree(root / "Imaging" / single / s["folder"])
    truth[single]["sessions"] = truth[single]["sessions"][:1]
    dropped = truth[unlabelled]["sessions"][1]
    (root / "Imaging" / unlabelled / dropped["folder"] / DEFAULT_LUMIERE_SEGMENTATION).unlink()
    dropped["segmentation"] = None
    settings = _settings(tmp)
    store_url = str(tmp / "cohort.zarr")
    report = ingest_cohort(root, store_url, settings, treatments=root / "treatments.csv")
    return {"root": root, "truth": truth, "report": report, "store": store_url, "settings": settings,
            "treated": treated[0], "single": single, "unlabelled": unlabelled, "dropped": dropped["folder"]}


def _pid(patient: str) -> str:
    return pseudonym(patient, KEY.encode())


def test_week_folders_become_days_seven_per_week_then_one_per_scan():
    assert parse_week("week-044") == WeekFolder(44, None) and WeekFolder(44, None).day == 308
    assert [parse_week(n).day for n in ("week-000-1", "week-000-2", "week-001")] == [0, 1, 7]
    assert parse_week("week-1a") is None and parse_week("Week-001") is None
    # Untreated: rounded weeks since the first scan; treated: the scans around the surgery pair up in one week.
    assert lumiere_schedule([0.0, 40.2, 90.0]).folders == ["week-000", "week-006", "week-013"]
    plan = lumiere_schedule([0.0, 5.3, 80.0, 150.0], [4])
    assert plan.folders == ["week-000-1", "week-000-2", "week-011", "week-021"]
    assert plan.days == [0, 1, 77, 147] and plan.event_day(4) == 1 and plan.event_day(30) == 27


def test_auto_detection_picks_lumiere_for_that_layout_only(cohort: dict, tiny_bids: Path, tmp_path: Path):
    root = cohort["root"]
    assert detect_kind(root) == "lumiere" and detect_kind(root / "Imaging") == "lumiere"
    assert detect_kind(tiny_bids) == "bids"
    manifest = tmp_path / "m.csv"
    manifest.write_text("patient_id,date,channel,path,label_path\n")
    assert detect_kind(manifest) == "manifest"
    # A DICOM export whose folders are named after patients, but with no week-* folder, stays DICOM.
    dicom = tmp_path / "dicom"
    (dicom / "Patient-7" / "series-1").mkdir(parents=True)
    (dicom / "Patient-7" / "series-1" / "IM0001.dcm").write_bytes(b"\0" * 132 + b"DICM")
    assert detect_kind(dicom) == "dicom"
    # Explicit selection: a folder can be read as LUMIERE, a CSV cannot.
    assert detect_kind(tiny_bids, "lumiere") == "lumiere"
    with pytest.raises(ValueError, match="not a lumiere source"):
        detect_kind(manifest, "lumiere")
    forced = discover(dicom, _settings(tmp_path, source_kind="lumiere"))
    assert forced.kind == "lumiere" and "no Patient-*/week-* folders" in forced.problems[0]
    assert [p.problems for p in forced.patients] == [["no week-* folders in Patient-7"]]


def test_cohort_lands_with_week_days_channels_mapped_labels_and_the_implied_surgery(cohort: dict):
    report, truth = cohort["report"], cohort["truth"]
    store = CohortStore.open(cohort["store"])
    assert report.source_kind == "lumiere" and report.exit_code() == 0
    assert report.quarantined == 0 and report.stored == sum(len(p["sessions"]) for p in truth.values())
    assert store.verify() == []
    # The missing segmentation is named (pseudonym, week folder, file) and nothing else is a problem.
    assert report.problems == [f"missing segmentation: {_pid(cohort['unlabelled'])}/{cohort['dropped']}/"
                               f"{DEFAULT_LUMIERE_SEGMENTATION} does not exist; the session is ingested without "
                               "a label"]
    for name, p in truth.items():
        arrays = store.arrays(_pid(name))
        assert arrays.channels == ("T1c", "FLAIR")
        np.testing.assert_array_equal(arrays.days, [s["days"] for s in p["sessions"]])
        label = np.asarray(arrays.label)
        for t, (s, rec) in enumerate(zip(p["sessions"], arrays.sessions, strict=True)):
            assert rec.has_label == (s["segmentation"] is not None), (name, s["folder"])
            if s["segmentation"] is None:
                assert not label[t].any()
                continue
            counts = s["label_voxels"]  # DeepBraTumIA coding: 1 necrosis, 2 enhancing, 3 oedema
            stored = {c: int(np.count_nonzero(label[t] == c)) for c in (1, 2)}
            expected = {1: counts["1"] + counts["3"], 2: counts["2"]}
            for c in (1, 2):  # rigidly resampled with nearest neighbour: the counts barely move
                assert abs(stored[c] - expected[c]) <= max(3, 0.1 * expected[c]), (name, s["folder"], c)
        # The baseline is the reference scan: its label is the mapped segmentation itself, on the RAS grid.
        seg = nib.as_closest_canonical(nib.load(cohort["root"] / "Imaging" / name / p["sessions"][0]["folder"]
                                                / DEFAULT_LUMIERE_SEGMENTATION))
        np.testing.assert_array_equal(label[0], TRUTH_MAP[np.asarray(seg.dataobj).astype(int)].transpose(2, 1, 0))
        events = [(e.kind, e.start_days, e.end_days) for e in store.patient_treatments(_pid(name))]
        assert sorted(events) == sorted((e["kind"], e["days"], e["end_days"]) for e in p["events"])
    surgery = [e for e in truth[cohort["treated"]]["events"] if e["kind"] == "surgery"]
    assert [(e["days"], e["source"]) for e in surgery] == [(1, "implied")]
    outcome = next(o for o in report.patients if o.patient_id == _pid(cohort["treated"]))
    implied = [t for t in outcome.treatments if "implied surgery" in t.origin]
    assert [(t.status, t.kind, t.start_days) for t in implied] == [("stored", "surgery", 1.0)]
    assert cohort["treated"] not in implied[0].origin  # the raw id never leaves ingest


def test_reingest_changes_nothing(cohort: dict):
    again = ingest_cohort(cohort["root"], cohort["store"], cohort["settings"],
                          treatments=cohort["root"] / "treatments.csv")
    assert (again.stored, again.quarantined, again.treatments_stored) == (0, 0, 0)
    assert again.skipped == cohort["report"].stored and not any(p.wrote for p in again.patients)


def test_an_explicit_surgery_between_the_pair_replaces_the_implied_one(cohort: dict, tmp_path: Path):
    name = cohort["treated"]
    pre, post = (s["date"] for s in cohort["truth"][name]["sessions"][:2])
    table = tmp_path / "t.csv"
    table.write_text(f"patient_id,date,treatment\n{name},{pre},surgery\n")
    patient = discover(cohort["root"], cohort["settings"], table).patient(_pid(name))
    assert [(t.kind, t.start.isoformat(), t.origin) for t in patient.treatments] == [("surgery", pre, "t.csv line 2")]
    alone = discover(cohort["root"], cohort["settings"]).patient(_pid(name))
    assert [(t.kind, t.start.isoformat()) for t in alone.treatments] == [("surgery", post)]


def test_label_coding_and_layout_settings_are_checked(cohort: dict, tmp_path: Path):
    image = sitk.GetImageFromArray(np.array([[[0, 1], [2, 3]]] * 2, dtype=np.uint8))
    mapped, problems = relabel(image, tuple(DEFAULT_LUMIERE_LABEL_MAP.items()), "seg.nii.gz")
    assert problems == [] and sitk.GetArrayFromImage(mapped)[0].tolist() == [[0, 1], [2, 1]]
    odd = sitk.GetImageFromArray(np.array([[[0, 7], [2, 3]]] * 2, dtype=np.uint8))
    _, problems = relabel(odd, tuple(DEFAULT_LUMIERE_LABEL_MAP.items()), "seg.nii.gz")
    assert problems and "[7] in seg.nii.gz" in problems[0]
    bad = _settings(tmp_path, lumiere_label_map={1: 5}, lumiere_segmentation="../seg.nii.gz",
                    lumiere_channel_map={"CT1": "T1c"})
    with pytest.raises(ValueError) as err:
        discover(cohort["root"], bad)
    text = str(err.value)
    assert "LONGITUDINAL_LUMIERE_LABEL_MAP" in text and "without '..'" in text and "FLAIR" in text


def test_cli_reads_one_visit_with_another_segmentation_and_refuses_bad_options(cohort: dict, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LONGITUDINAL_PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("LONGITUDINAL_TARGET_SPACING_MM", str(SPACING_MM))
    source = tmp_path / "Imaging"
    shutil.copytree(cohort["root"] / "Imaging" / cohort["single"], source / cohort["single"])
    store_url = str(tmp_path / "cli.zarr")
    home = ["--home", str(tmp_path / "home")]
    result = CliRunner().invoke(app, [*home, "ingest", str(tmp_path), "--store", store_url, "--source", "lumiere",
                                      "--lumiere-segmentation", "hd-glio-auto"])
    assert result.exit_code == 0, result.output
    assert "missing segmentation" in result.output and "HD-GLIO-AUTO-segmentation" in result.output
    sessions = CohortStore.open(store_url).sessions(_pid(cohort["single"]))
    assert [(s.days, s.has_label) for s in sessions] == [(0.0, False)]
    for option, value, needle in (("--source", "nifti", "not one of"), ("--lumiere-segmentation", "../x", "'..'")):
        bad = CliRunner().invoke(app, [*home, "ingest", str(tmp_path), "--store", store_url, option, value])
        assert bad.exit_code == 1 and needle in bad.output and "Traceback" not in bad.output

