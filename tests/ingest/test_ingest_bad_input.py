"""Every bad-input case mixed into a good manifest cohort: good sessions stored, each bad one quarantined with
its file and reason (JSON report and CLI), the store verifies; and a source with nothing usable exits 1."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.ingest import ingest_cohort
from longitudinal.ingest.deid import pseudonym
from storage.store import CohortStore

KEY = b"ingest-test-pseudonym-key"


def _anat(bids: Path, sub: str, ses: str, kind: str) -> Path:
    name = {"T1c": "ce-gd_T1w", "FLAIR": "FLAIR"}[kind]
    return bids / f"sub-{sub}" / ses / "anat" / f"sub-{sub}_{ses}_{name}.nii.gz"


def _dseg(bids: Path, sub: str, ses: str) -> Path:
    return bids / "derivatives" / "labels" / f"sub-{sub}" / ses / "anat" / f"sub-{sub}_{ses}_dseg.nii.gz"


def _bad_files(folder: Path, good: Path) -> dict[str, Path]:
    """One broken T1c-like file per failure mode, built from a good NIfTI."""
    folder.mkdir()
    img = nib.load(good)
    data = np.asarray(img.dataobj, dtype=np.float32)
    out = {}
    raw = good.read_bytes()
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    out["truncated"] = folder / "truncated.nii.gz"
    (folder / "garbage.nii.gz").write_bytes(b"this is not a nifti file at all" * 10)
    out["garbage"] = folder / "garbage.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine), folder / "fourd.nii.gz")
    out["fourd"] = folder / "fourd.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros_like(data), img.affine), folder / "empty.nii.gz")
    out["empty"] = folder / "empty.nii.gz"
    nan = data.copy()
    nan[10:12, 10:12, 10:12] = np.nan
    nib.save(nib.Nifti1Image(nan, img.affine), folder / "nan.nii.gz")
    out["nan"] = folder / "nan.nii.gz"
    wide = img.affine.copy()
    wide[:3, :3] *= 12.5  # 50 mm voxels
    nib.save(nib.Nifti1Image(data, wide), folder / "spacing.nii.gz")
    out["spacing"] = folder / "spacing.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.uint8), img.affine), folder / "smalllabel.nii.gz")
    out["smalllabel"] = folder / "smalllabel.nii.gz"
    return out


def _write_manifest(path: Path, rows: list[tuple[str, str, str, str, str]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "date", "channel", "path", "label_path"])
        w.writerows(rows)


def _session(pid: str, date: str, t1c: Path | str, flair: Path | str, label: Path | str = "") -> list:
    return [(pid, date, "T1c", str(t1c), str(label)), (pid, date, "FLAIR", str(flair), "")]


@pytest.fixture
def mixed_manifest(tiny_bids: Path, tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """Patient GOOD-A (3 good sessions), GOOD-B (2 good sessions + every bad case), and hostile ids.

    Returns the manifest and, per bad case, (text that must name the file, reason keyword).
    """
    b = tiny_bids
    bad = _bad_files(tmp_path / "bad", _anat(b, "002", "ses-03", "T1c"))
    flair = _anat(b, "002", "ses-03", "FLAIR")
    rows: list = []
    for k, date in enumerate(["2020-01-10", "2020-05-02", "2020-09-15"], start=1):
        ses = f"ses-0{k}"
        rows += _session("GOOD-A", date, _anat(b, "001", ses, "T1c"), _anat(b, "001", ses, "FLAIR"), _dseg(b, "001", ses))
    rows += _session("GOOD-B", "2021-02-01", _anat(b, "002", "ses-01", "T1c"), _anat(b, "002", "ses-01", "FLAIR"),
                     _dseg(b, "002", "ses-01"))
    rows += _session("GOOD-B", "2021-06-01T09:30:00", _anat(b, "002", "ses-02", "T1c"),
                     _anat(b, "002", "ses-02", "FLAIR"))
    expected: dict[str, tuple[str, str]] = {}

    def add(case: str, date: str, t1c, label="", must_name: str | None = None, reason: str = "") -> None:
        rows.extend(_session("GOOD-B", date, t1c, flair, label))
        expected[case] = (must_name if must_name is not None else Path(str(t1c)).name, reason)

    add("missing", "2022-01-01", tmp_path / "bad" / "does-not-exist.nii.gz", reason="missing file")
    add("truncated", "2022-01-02", bad["truncated"], reason="unreadable or truncated")
    add("garbage", "2022-01-03", bad["garbage"], reason="unreadable or truncated")
    add("fourd", "2022-01-04", bad["fourd"], reason="wrong dimensionality")
    add("empty", "2022-01-05", bad["empty"], reason="empty image")
    add("nan", "2022-01-06", bad["nan"], reason="non-finite voxels")
    add("spacing", "2022-01-07", bad["spacing"], reason="implausible spacing")
    add("label", "2022-01-08", _anat(b, "002", "ses-03", "T1c"), label=bad["smalllabel"],
        must_name="smalllabel.nii.gz", reason="label grid does not match")
    # Two sessions on the same calendar day (written differently): both refused.
    add("dup1", "2022-01-09", _anat(b, "002", "ses-04", "T1c"), must_name="line", reason="duplicate session date")
    add("dup2", "2022-01-09T15:00:00", _anat(b, "002", "ses-03", "T1c"), must_name="line",
        reason="duplicate session date")
    add("baddate", "2022-13-45", _anat(b, "002", "ses-04", "T1c"), must_name="line", reason="unparseable date")
    add("nodate", "", _anat(b, "002", "ses-04", "T1c"), must_name="line", reason="missing date")
    # The very files of GOOD-B's first session listed again under another date.
    rows += _session("GOOD-B", "2022-01-21", _anat(b, "002", "ses-01", "T1c"), _anat(b, "002", "ses-01", "FLAIR"),
                     _dseg(b, "002", "ses-01"))
    expected["dupcontent"] = ("line", "duplicate content")
    rows.append(("GOOD-B", "2022-01-20", "T1c", str(_anat(b, "002", "ses-04", "T1c")), ""))
    expected["nochannel"] = ("line", "channel FLAIR missing")
    for k, hostile in enumerate(["../escape", "a/b", "ctl\x07id"]):
        rows += _session(hostile, f"2023-01-0{k + 1}", _anat(b, "001", "ses-04", "T1c"), _anat(b, "001", "ses-04", "FLAIR"))
    manifest = tmp_path / "manifest.csv"
    _write_manifest(manifest, rows)
    return manifest, expected


def test_bad_input_is_quarantined_and_good_sessions_are_stored(mixed_manifest, settings, tmp_path: Path):
    manifest, expected = mixed_manifest
    store_url = str(tmp_path / "cohort.zarr")
    result = CliRunner().invoke(
        app, ["--home", str(settings.home), "ingest", str(manifest), "--store", store_url, "--spacing", "4"],
        env={"LONGITUDINAL_PSEUDONYM_KEY": KEY.decode(), "COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "quarantined" in result.output

    store = CohortStore.open(store_url)
    assert store.verify() == []
    a, b = pseudonym("GOOD-A", KEY), pseudonym("GOOD-B", KEY)
    index = store.index()
    assert sorted(store.patient_ids()) == sorted([a, b])
    assert (index.patient_id == a).sum() == 3 and (index.patient_id == b).sum() == 2
    np.testing.assert_allclose(store.arrays(b).days, [0.0, 120.0 + 9.5 / 24], atol=1e-9)
    assert store.sessions(a)[0].has_label and not store.sessions(b)[1].has_label

    # The operator's quarantine report names every bad file with its reason.
    report = json.loads((settings.reports_path / "quarantine" / f"{b}.json").read_text())
    entries = [" ".join([q["origin"], *q["reasons"]]) for q in report["quarantined"]]
    assert len(entries) == len(expected)
    for case, (name, reason) in expected.items():
        assert any(name in e and reason in e for e in entries), (case, name, reason, entries)
    hostile = [p for p in (settings.reports_path / "quarantine").glob("*.json") if p.stem not in (a, b)]
    reasons = " ".join(" ".join(json.loads(p.read_text())["quarantined"][0]["reasons"]) for p in hostile)
    assert len(hostile) == 3
    for why in ("path separator", "'..'", "control characters"):
        assert why in reasons
    # The run's report carries the same rows; hostile ids are never echoed anywhere.
    run_reports = sorted(settings.reports_path.glob("ingest-*.json"))
    text = run_reports[-1].read_text()
    assert json.loads(text)["summary"]["quarantined"] == len(expected) + 3
    for raw in ("../escape", "a/b", "ctl"):
        assert raw not in text


def test_nothing_ingestible_exits_nonzero(tiny_bids: Path, settings, tmp_path: Path):
    manifest = tmp_path / "only-bad.csv"
    _write_manifest(manifest, _session("X", "2020-01-01", tmp_path / "nope.nii.gz", tmp_path / "nope2.nii.gz"))
    result = CliRunner().invoke(
        app, ["--home", str(settings.home), "ingest", str(manifest), "--store", str(tmp_path / "s.zarr")],
        env={"LONGITUDINAL_PSEUDONYM_KEY": KEY.decode()},
    )
    assert result.exit_code == 1
    report = ingest_cohort(manifest, str(tmp_path / "s.zarr"), settings)
    assert report.exit_code() == 1 and report.quarantined == 1


def test_unwritable_store_exits_nonzero(tiny_bids: Path, settings, tmp_path: Path):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    result = CliRunner().invoke(
        app, ["--home", str(settings.home), "ingest", str(tiny_bids), "--store", str(blocker / "cohort.zarr")],
        env={"LONGITUDINAL_PSEUDONYM_KEY": KEY.decode()},
    )
    assert result.exit_code == 2, result.output


def test_gzip_helper_sanity(tmp_path: Path):
    # The truncated fixture must really be a broken gzip stream, or the test above proves nothing.
    good = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), good)
    cut = good.read_bytes()[: good.stat().st_size // 2]
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(cut)

