"""De-identification: DICOM series carrying a patient's identity, and a treatments CSV naming the patient by its
PatientID with real dates, are ingested by the CLI and by the flow; nothing identifying (no raw treatment date
either) is then found in the store, the workspace (reports), the Prefect home, or the Prefect API's records
(flow/task runs, parameters, artifacts, logs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from scipy.ndimage import gaussian_filter
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.ingest.deid import pseudonym
from storage.store import CohortStore

KEY = "ingest-test-pseudonym-key"
IDENTITY = {
    "PatientName": "Quinoa^Jemima^Rosalind",
    "PatientID": "MRN-77812345",
    "PatientBirthDate": "19610412",
    "InstitutionName": "Saint Elsewhere Infirmary",
    "InstitutionAddress": "12 Larkspur Lane Springfield",
    "ReferringPhysicianName": "Thackeray^Ottoline",
    "PerformingPhysicianName": "Wolsey^Barnabus",
    "OperatorsName": "Penhaligon^Ysolde",
}
STUDY_DATES = ("20240315", "20240702")
# Resection five days after the first scan, then radiotherapy with temozolomide (kind, start, end).
TREATMENTS = (("surgery", "20240320", None), ("radiotherapy", "20240415", "20240524"),
              ("chemotherapy", "20240415", "20240524"))
TREATMENT_DATES = {d for _, start, end in TREATMENTS for d in (start, end) if d}
# Strings that must appear nowhere: every identifying value, its name parts, and the real study and treatment
# dates (ISO and DICOM forms).
NEEDLES = sorted(
    {v for v in IDENTITY.values()}
    | {part for v in IDENTITY.values() for part in v.split("^") if len(part) > 4}
    | set(STUDY_DATES) | TREATMENT_DATES
    | {f"{d[:4]}-{d[4:6]}-{d[6:]}" for d in (*STUDY_DATES, *TREATMENT_DATES)}
)


def _iso(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:]}"


def _phantom(shift: tuple[int, int, int] = (0, 0, 0), flair: bool = False) -> np.ndarray:
    """(z, y, x) = (24, 64, 64) int16 textured head; ``shift`` moves the content by whole voxels."""
    rng = np.random.default_rng(7)
    z, y, x = np.meshgrid(np.arange(24.0), np.arange(64.0), np.arange(64.0), indexing="ij")
    r = np.sqrt(((z - 12) / 10) ** 2 + ((y - 32) / 26) ** 2 + ((x - 32) / 22) ** 2)
    img = (r < 1) * (600.0 if not flair else 400.0) + (r < 0.6) * (300.0 if not flair else 500.0)
    img += 500.0 * (((z - 10) ** 2 + (y - 40) ** 2 + (x - 38) ** 2) < 16)
    img *= 1 + 0.4 * gaussian_filter(rng.normal(size=img.shape), 1.5)
    img = gaussian_filter(np.clip(img, 0, None), 0.7)
    return np.roll(img, shift, axis=(0, 1, 2)).astype(np.int16)


def _write_series(folder: Path, volume: np.ndarray, description: str, study_date: str, study_uid: str,
                  number: int = 1) -> None:
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for k in range(volume.shape[0]):
        ds = template.copy()
        for tag, value in IDENTITY.items():
            setattr(ds, tag, value)
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = description
        ds.SeriesNumber = number
        ds.InstanceNumber = k + 1
        ds.PixelSpacing = [3.0, 3.0]
        ds.SliceThickness = 3.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-96.0, -96.0, -36.0 + 3.0 * k]
        ds.SliceLocation = -36.0 + 3.0 * k
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.PixelData = np.ascontiguousarray(volume[k]).tobytes()
        ds.save_as(folder / f"IM{k + 1:04d}.dcm", enforce_file_format=True)


@pytest.fixture
def dicom_source(tmp_path: Path) -> Path:
    # Exports often name a patient's folder after the patient: the name must not travel with the series.
    root = tmp_path / "dicom"
    patient = root / IDENTITY["PatientName"]
    for s, (date, shift) in enumerate(zip(STUDY_DATES, [(0, 0, 0), (1, 2, -2)], strict=True)):
        study = generate_uid()
        _write_series(patient / f"study{s}" / "series1", _phantom(shift), "AX T1 POST GD", date, study)
        _write_series(patient / f"study{s}" / "series2", _phantom(shift, flair=True), "AX FLAIR", date, study)
        _write_series(patient / f"study{s}" / "series3", _phantom(shift), "LOCALIZER", date, study)
    return root


def _search_files(folder: Path) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes().lower()
            hits += [f"{path}: {n}" for n in NEEDLES if n.lower().encode() in data]
        hits += [f"path {path}: {n}" for n in NEEDLES if n.lower() in str(path).lower()]
    return hits


def test_dicom_identity_never_leaves_ingest(dicom_source: Path, tmp_path: Path, monkeypatch):
    home = tmp_path / "home"
    prefect_home = tmp_path / "prefect-home"
    monkeypatch.setenv("LONGITUDINAL_PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("PREFECT_HOME", str(prefect_home))
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(prefect_home / "storage"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    treatments = tmp_path / "clinical" / "treatments.csv"
    treatments.parent.mkdir()
    treatments.write_text("patient_id,date,treatment,end_date\n" + "".join(
        f"{IDENTITY['PatientID']},{_iso(start)},{kind},{_iso(end) if end else ''}\n" for kind, start, end in TREATMENTS))

    cli_store = str(tmp_path / "cli.zarr")
    result = CliRunner().invoke(app, ["--home", str(home), "ingest", str(dicom_source), "--store", cli_store,
                                      "--treatments", str(treatments)])
    assert result.exit_code == 0, result.output
    for needle in NEEDLES:
        assert needle.lower() not in result.output.lower()

    store = CohortStore.open(cli_store)
    pid = pseudonym(IDENTITY["PatientID"], KEY.encode())
    assert store.patient_ids() == [pid]
    assert store.verify() == []
    sessions = store.sessions(pid)
    assert [s.days for s in sessions] == [0.0, 109.0]  # 2024-03-15 -> 2024-07-02
    assert all(s.registration_metric < 0.25 for s in sessions)
    # The content moved by (1, 2, -2) voxels of 3 mm along (z, y, x): registration finds the shift.
    shift = np.asarray(sessions[1].transform_to_reference)[:3, 3]
    np.testing.assert_allclose(np.abs(shift), [6.0, 6.0, 3.0], atol=0.5)
    # The events, matched to the patient through its pseudonym: whole days since the first scan (2024-03-15).
    events = [(e.kind, e.start_days, e.end_days) for e in store.patient_treatments(pid)]
    assert events == [("surgery", 5.0, None), ("chemotherapy", 31.0, 70.0), ("radiotherapy", 31.0, 70.0)]

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.ingest import ingest_cohort_flow

    flow_store = str(tmp_path / "flow.zarr")
    with temporary_settings(updates={PREFECT_HOME: prefect_home, PREFECT_LOCAL_STORAGE_PATH: prefect_home / "storage"}):
        with prefect_test_harness(server_startup_timeout=180):  # a loaded CI machine starts it slowly
            summary = ingest_cohort_flow(source=str(dicom_source), store=flow_store, home=str(home),
                                         treatments=str(treatments))
            assert summary["stored"] == 2 and summary["quarantined"] == 0
            assert summary["treatments_stored"] == 3 and summary["treatments_quarantined"] == 0
            with get_client(sync_client=True) as client:
                records = {
                    "flow_runs": [r.model_dump(mode="json") for r in client.read_flow_runs()],
                    "task_runs": [r.model_dump(mode="json") for r in client.read_task_runs()],
                    "artifacts": [a.model_dump(mode="json") for a in client.read_artifacts()],
                    "logs": [entry.model_dump(mode="json") for entry in client.read_logs()],
                }
    assert records["artifacts"], "the flow published no artifacts"
    api_text = json.dumps(records).lower()
    leaked = [n for n in NEEDLES if n.lower() in api_text]
    assert not leaked, leaked
    assert CohortStore.open(flow_store).index().drop(columns=["registration_metric"]).equals(
        store.index().drop(columns=["registration_metric"]))
    assert CohortStore.open(flow_store).treatments().equals(store.treatments())

    hits = _search_files(tmp_path / "cli.zarr") + _search_files(tmp_path / "flow.zarr")
    hits += _search_files(home) + _search_files(prefect_home)
    assert not hits, hits
    # Sanity: the search does find the identity where it is (the source), so an empty result means something.
    assert _search_files(dicom_source)
    assert {h.rsplit(": ", 1)[1] for h in _search_files(treatments.parent)} >= {_iso(d) for d in TREATMENT_DATES}


def test_dicom_folder_names_never_reach_reports(tmp_path: Path, monkeypatch):
    """A study folder named after the patient: reports, the CLI and the artifacts' text (the run report's rows
    and markdown) name series by session label, series number and channel, never by folder."""
    root = tmp_path / "dicom"
    person = root / "DOE^JOHN"
    good, undated = generate_uid(), generate_uid()
    _write_series(person / "MRI 2024-03-15" / "s5", _phantom(), "AX T1 POST GD", STUDY_DATES[0], good, number=5)
    _write_series(person / "MRI 2024-03-15" / "s6", _phantom(flair=True), "AX FLAIR", STUDY_DATES[0], good, number=6)
    # A second study with a T1c only and an implausible date: quarantined.
    _write_series(person / "MRI 1850" / "s7", _phantom(), "AX T1 POST GD", "18500101", undated, number=7)
    monkeypatch.setenv("LONGITUDINAL_PSEUDONYM_KEY", KEY)
    home, store_url = tmp_path / "home", str(tmp_path / "cohort.zarr")
    result = CliRunner().invoke(app, ["--home", str(home), "ingest", str(root), "--store", store_url],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    store = CohortStore.open(store_url)
    assert store.verify() == [] and len(store.index()) == 1
    pid = pseudonym(IDENTITY["PatientID"], KEY.encode())
    quarantine = json.loads((home / "reports" / "quarantine" / f"{pid}.json").read_text())
    (entry,) = quarantine["quarantined"]
    assert entry["origin"] == "undated session 1"
    reasons = " ".join(entry["reasons"])
    assert "implausible date" in reasons and "channel FLAIR missing at undated session 1" in reasons
    run_report = json.loads(sorted((home / "reports").glob("ingest-*.json"))[-1].read_text())
    stored = [s for p in run_report["patients"] for s in p["sessions"] if s["status"] == "stored"]
    assert [s["origin"] for s in stored] == [s["session"] for s in stored] == [store.index().session[0]]

    from longitudinal.ingest import discover
    from longitudinal.settings import Settings

    cohort = discover(root, Settings(home=home))
    displays = sorted(scan.display for ses in cohort.patients[0].sessions for scan in ses.scans.values())
    label = store.index().session[0]
    assert displays == [f"{label} series 5 (T1c, 24 files)", f"{label} series 6 (FLAIR, 24 files)",
                        "undated session 1 series 7 (T1c, 24 files)"]
    from longitudinal.ingest import IngestReport, PatientOutcome, SessionOutcome

    texts = [result.output, json.dumps(quarantine), json.dumps(run_report)]
    report = IngestReport("dicom", store_url, patients=[PatientOutcome(**{
        **{k: v for k, v in run_report["patients"][0].items() if k != "sessions"},
        "sessions": [SessionOutcome(**s) for s in run_report["patients"][0]["sessions"]]})])
    texts += [report.markdown(), json.dumps(report.rows())]  # what the flow publishes as artifacts
    for text in texts:
        for needle in ("DOE", "JOHN", "MRI 2024", "MRI 1850", "s5/", "s7/"):
            assert needle not in text, (needle, text)
