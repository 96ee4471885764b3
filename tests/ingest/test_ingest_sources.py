"""Source discovery, de-identification primitives, validation and normalisation on small generated files."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from longitudinal.ingest.deid import (
    date_shift_days,
    hostile_id_problems,
    is_pseudonym,
    pseudonym,
    redact,
    session_label,
    shift_date,
)
from longitudinal.ingest.preprocess import normalise
from longitudinal.ingest.sources import detect_kind, discover, parse_date
from longitudinal.ingest.validate import duplicate_date_problems, validate_session
from longitudinal.settings import Settings


def test_pseudonyms_are_keyed_stable_and_store_safe():
    a = pseudonym("sub-001", b"key-1")
    assert a == pseudonym("sub-001", b"key-1")
    assert a != pseudonym("sub-001", b"key-2") and a != pseudonym("sub-002", b"key-1")
    assert is_pseudonym(a) and len(a) == 14
    assert "001" not in a[2:] or a != "p-001"


def test_date_shift_is_per_patient_and_keeps_intervals():
    d1, d2 = dt.datetime(2024, 3, 15, 10, 0), dt.datetime(2024, 7, 2, 16, 0)
    s1, s2 = shift_date(d1, "X", b"k"), shift_date(d2, "X", b"k")
    assert s2 - s1 == d2 - d1
    assert -3650 <= date_shift_days("X", b"k") <= -365
    assert date_shift_days("X", b"k") != date_shift_days("Y", b"k")
    assert session_label(s1) == f"ses-{s1:%Y%m%d}" and "20240315" not in session_label(s1)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("P001", []),
        ("../up", ["path separator", "'..'"]),
        ("a\\b", ["path separator"]),
        ("x\x00y", ["control characters"]),
        ("  ", ["empty"]),
    ],
)
def test_hostile_ids(raw, expected):
    problems = " ".join(hostile_id_problems(raw))
    for word in expected:
        assert word in problems
    if not expected:
        assert problems == ""
    assert raw.strip() == "" or raw not in problems  # the id itself is never echoed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-01", dt.datetime(2024, 3, 1)),
        ("2024-03-01T10:30:00", dt.datetime(2024, 3, 1, 10, 30)),
        ("20240301", dt.datetime(2024, 3, 1)),
        ("2024-03-01T10:30:00+02:00", dt.datetime(2024, 3, 1, 8, 30)),
        ("2024-13-01", None),
        ("n/a", None),
        ("", None),
    ],
)
def test_parse_date(text, expected):
    assert parse_date(text) == expected


def test_redact_replaces_whole_tokens_only():
    assert redact("sub-007/ses-01/anat/sub-007_ses-01_T1w.nii.gz", "007", "p-x") == (
        "sub-p-x/ses-01/anat/sub-p-x_ses-01_T1w.nii.gz"
    )


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path)
    return path


def _bids(root: Path) -> Path:
    (root).mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    rng = np.random.default_rng(0)
    vol = rng.uniform(1, 2, size=(10, 10, 10)).astype(np.float32)
    sub = root / "sub-abc"
    (sub).mkdir()
    (sub / "sub-abc_sessions.tsv").write_text("session_id\tacq_time\nses-1\t2020-01-01T08:00:00\nses-2\tgarbage\n")
    for ses in ("ses-1", "ses-2", "ses-3"):
        _nifti(sub / ses / "anat" / f"sub-abc_{ses}_ce-gd_T1w.nii.gz", vol)
        _nifti(sub / ses / "anat" / f"sub-abc_{ses}_T1w.nii.gz", vol)  # pre-contrast: not a project channel
        if ses != "ses-3":
            _nifti(sub / ses / "anat" / f"sub-abc_{ses}_FLAIR.nii.gz", vol)
    _nifti(root / "derivatives" / "labels" / "sub-abc" / "ses-1" / "anat" / "sub-abc_ses-1_dseg.nii.gz",
           np.zeros((10, 10, 10), np.uint8))
    return root


def test_bids_discovery_maps_channels_dates_and_labels(tmp_path: Path):
    root = _bids(tmp_path / "ds")
    settings = Settings(home=tmp_path / "home", pseudonym_key="sources-test-pseudonym-key")
    assert detect_kind(root) == "bids"
    cohort = discover(root, settings)
    (patient,) = cohort.patients
    assert patient.patient_id == pseudonym("abc", b"sources-test-pseudonym-key") and "raw_id" not in repr(patient)
    s1, s2, s3 = patient.sessions
    assert s1.date == dt.datetime(2020, 1, 1, 8) and set(s1.scans) == {"T1c", "FLAIR"}
    assert s1.scans["T1c"].display == "sub-abc/ses-1/anat/sub-abc_ses-1_ce-gd_T1w.nii.gz"
    assert s1.label is not None and s2.label is None
    assert s2.date is None and any("unparseable date" in p for p in s2.problems)
    assert any("missing date" in p for p in s3.problems)
    scans = validate_session(s3, ("T1c", "FLAIR"), "T1c")
    assert any("channel FLAIR missing" in p for p in scans.problems)
    ok = validate_session(s1, ("T1c", "FLAIR"), "T1c")
    assert ok.problems == [] and set(ok.sha256) == {"T1c", "FLAIR", "label"}


def test_manifest_missing_columns_is_a_source_problem(tmp_path: Path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("patient_id,date,path\nA,2020-01-01,x.nii.gz\n")
    cohort = discover(manifest, Settings(home=tmp_path / "home", pseudonym_key="sources-test-pseudonym-key"))
    assert cohort.patients == [] and "missing columns" in cohort.problems[0]


def test_duplicate_dates_refuse_every_session_of_that_day():
    d = dt.datetime(2020, 1, 1, 9)
    problems = duplicate_date_problems(
        {0: d, 1: d.replace(hour=15), 2: dt.datetime(2020, 2, 1)},
        {0: "a", 1: "b", 2: "c"},
        stored={dt.date(2020, 2, 1): "ses-x"},
    )
    assert set(problems) == {0, 1, 2}
    assert "same date as b" in problems[0][0] and "stored session ses-x" in problems[2][0]


def test_normalise_scales_head_to_unit_range():
    rng = np.random.default_rng(0)
    data = np.zeros((20, 20, 20), np.float32)
    data[5:15, 5:15, 5:15] = rng.uniform(100, 200, size=(10, 10, 10))
    out = normalise(data)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert (out[:5] == 0).all()
    inside = out[5:15, 5:15, 5:15]
    assert 0.45 < float(np.median(inside)) < 0.55
    assert (normalise(np.zeros((4, 4, 4))) == 0).all()


def test_redact_leaves_other_digits_alone():
    assert redact("manifest.csv lines 1,12 sub-1/x", "1", "p-a") == "manifest.csv lines p-a,12 sub-p-a/x"


def test_public_text_cuts_absolute_paths_and_raw_ids():
    from longitudinal.ingest.deid import public_text

    text = "missing file: /data/Smith_John/scans/t1.nii.gz; sub-007/ses-01 ok"
    assert public_text(text, "007", "p-a") == "missing file: .../t1.nii.gz; sub-p-a/ses-01 ok"


def test_check_file_refuses_devices_pipes_loops_large_files_and_paths_outside_the_root(tmp_path: Path):
    from longitudinal.ingest.files import FileLimits, RefusedFile, check_file, open_checked

    limits = FileLimits(max_file_bytes=100)
    ok = tmp_path / "ok.bin"
    ok.write_bytes(b"x" * 100)
    assert check_file(ok, limits) == ok.resolve()
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "big.bin").write_bytes(b"x" * 101)
    for name, reason, detail in [("pipe", "not a regular file", "a named pipe"),
                                 ("zero", "not a regular file", "a character device"),
                                 ("loop", "unresolvable path", "symlink loop"),
                                 ("big.bin", "file too large", "101 bytes on disk > max_file_bytes 100")]:
        with pytest.raises(RefusedFile) as err:
            check_file(tmp_path / name, limits)
        assert (err.value.reason, err.value.detail) == (reason, detail)
        # Opening goes through the same check: nothing blocks on the pipe or streams from the device.
        with pytest.raises(RefusedFile), open_checked(tmp_path / name, limits):
            pass
    with pytest.raises(FileNotFoundError):
        check_file(tmp_path / "absent", limits)
    confined = FileLimits(allowed_root=tmp_path / "inner")
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "out").symlink_to(ok)
    with pytest.raises(RefusedFile, match="outside the allowed root"):
        check_file(tmp_path / "inner" / "out", confined)
    with pytest.raises(RefusedFile, match="outside the allowed root"):
        check_file(tmp_path / "inner" / ".." / "ok.bin", confined)


def test_date_window_refuses_implausible_dates_in_sessions_tables(tmp_path: Path):
    root = _bids(tmp_path / "ds")
    tsv = root / "sub-abc" / "sub-abc_sessions.tsv"
    tsv.write_text("session_id\tacq_time\nses-1\t2020-01-01\nses-2\t1850-01-01\nses-3\t0001-01-01\n",
                   encoding="utf-8-sig")
    settings = Settings(home=tmp_path / "home", pseudonym_key="sources-test-pseudonym-key",
                        earliest_date=dt.date(1900, 1, 1), latest_date=dt.date(2030, 1, 1))
    s1, s2, s3 = discover(root, settings).patients[0].sessions
    assert s1.date == dt.datetime(2020, 1, 1) and s1.problems == []
    assert s2.date is None and s2.problems == [
        "implausible date in acq_time of ses-2 in sub-abc/sub-abc_sessions.tsv line 3: outside 1900-01-01 to 2030-01-01"]
    assert s3.date is None and "sessions.tsv line 4" in s3.problems[0]
