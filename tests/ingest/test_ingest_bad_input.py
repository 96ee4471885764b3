"""Every bad-input case mixed into a good manifest cohort: good sessions stored, each bad one quarantined with
its file and reason (JSON report and CLI), the store verifies; and a source with nothing usable exits 1."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
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



# --- hostile input: devices, pipes, bombs, dates, byte-order marks, paths outside an allowed root -------------

REPO = Path(__file__).resolve().parents[2]
# Seconds an ingest subprocess may take: a blocked read (a pipe, /dev/zero) fails the test instead of hanging it.
HANG_TIMEOUT_S = 60
MiB = 1 << 20


def _ingest_subprocess(source: Path, store: Path, home: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``longitudinal ingest`` in a child process under HANG_TIMEOUT_S (killed when it runs over)."""
    cmd = [sys.executable, "-m", "longitudinal", "--home", str(home), "ingest", str(source), "--store", str(store),
           "--spacing", "4"]
    full_env = {**os.environ, "LONGITUDINAL_PSEUDONYM_KEY": KEY.decode(), "PYTHONPATH": str(REPO),
                "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}
    try:
        out = subprocess.run(cmd, env=full_env, cwd=home.parent, capture_output=True, text=True,
                             timeout=HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ingest of {source.name} did not finish in {HANG_TIMEOUT_S} s: an input blocked the cohort")
    return out.returncode, out.stdout + out.stderr


def _gzip_nifti(path: Path, shape: tuple[int, ...], dtype: type, zeros: int) -> Path:
    """A .nii.gz whose header claims ``shape`` of ``dtype`` at 1 mm, followed by ``zeros`` zero bytes (a header
    with no data, or a stream of zeros that gzip shrinks about 1000-fold)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_zooms((1.0,) * len(shape))
    hdr.set_qform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    with gzip.open(path, "wb", compresslevel=6) as fh:
        fh.write(hdr.binaryblock + b"\0" * 4)
        for _ in range(zeros // MiB):
            fh.write(b"\0" * MiB)
    return path


def _entries(report_path: Path) -> list[str]:
    """Each quarantined session of a quarantine report as one line: origin and reasons."""
    report = json.loads(report_path.read_text())
    return [" ".join([q["origin"], *q["reasons"]]) for q in report["quarantined"]]


@pytest.fixture(scope="module")
def hostile_manifest(tiny_bids: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A manifest cohort ingested by the CLI in a subprocess: KEEP-A (2 good sessions), MIXED-B (1 good session
    and one session per hostile case). Returns the run's outcome and, per case, (file, manifest line, reason)."""
    b = tiny_bids
    tmp = tmp_path_factory.mktemp("hostile")
    src = tmp / "src"
    src.mkdir()
    os.mkfifo(src / "pipe.nii.gz")
    (src / "zero-link.nii.gz").symlink_to("/dev/zero")
    # A two-file image whose data half is a pipe: readers open "pair.img" by name beside "pair.hdr".
    nib.save(nib.Nifti1Pair(np.ones((8, 8, 8), np.float32), np.eye(4)), src / "pair.hdr")
    (src / "pair.img").unlink()
    os.mkfifo(src / "pair.img")
    _gzip_nifti(src / "header_bomb.nii.gz", (1000, 1000, 1000), np.float32, 0)
    # 128 Mi voxels, all zero: about 130 kB on disk, 128 MiB decoded.
    _gzip_nifti(src / "gzip_bomb.nii.gz", (1024, 1024, 128), np.uint8, 128 * MiB)
    (src / "big.nii.gz").write_bytes(os.urandom(5 * MiB))  # above the 4 MiB cap set below
    rows: list = []
    for k, date in enumerate(["2020-01-10", "2020-05-02"], start=1):
        rows += _session("KEEP-A", date, _anat(b, "001", f"ses-0{k}", "T1c"), _anat(b, "001", f"ses-0{k}", "FLAIR"))
    rows += _session("MIXED-B", "2021-02-01", _anat(b, "002", "ses-01", "T1c"), _anat(b, "002", "ses-01", "FLAIR"))
    cases: dict[str, tuple[str, str, str]] = {}

    def add(case: str, date: str, t1c: Path | str, flair: Path, name: str, reason: str) -> None:
        line = len(rows) + 2  # the header is line 1
        rows.extend(_session("MIXED-B", date, t1c, flair))
        cases[case] = (name, f"manifest.csv lines {line},{line + 1}", reason)

    flair = _anat(b, "002", "ses-03", "FLAIR")
    add("dev-zero", "2022-01-01", "/dev/zero", flair, "zero", "not a regular file")
    add("fifo", "2022-01-02", src / "pipe.nii.gz", flair, "pipe.nii.gz", "not a regular file")
    add("symlink-to-dev-zero", "2022-01-03", src / "zero-link.nii.gz", flair, "zero-link.nii.gz",
        "not a regular file")
    add("fifo-beside-header", "2022-01-07", src / "pair.hdr", flair, "pair.img beside pair.hdr",
        "not a regular file")
    add("header-bomb", "2022-01-04", src / "header_bomb.nii.gz", flair, "header_bomb.nii.gz", "image too large")
    add("gzip-bomb", "2022-01-05", src / "gzip_bomb.nii.gz", flair, "gzip_bomb.nii.gz", "image too large")
    add("oversized-file", "2022-01-06", src / "big.nii.gz", flair, "big.nii.gz", "file too large")
    for case, date, ses in (("year-1", "0001-01-01", "ses-02"), ("year-1850", "1850-06-01", "ses-03"),
                            ("year-2150", "2150-06-01", "ses-04")):
        add(case, date, _anat(b, "002", ses, "T1c"), _anat(b, "002", ses, "FLAIR"), "manifest.csv", "implausible date")
    manifest = src / "manifest.csv"
    _write_manifest(manifest, rows)
    home, store = tmp / "home", tmp / "cohort.zarr"
    code, output = _ingest_subprocess(manifest, store, home, {"LONGITUDINAL_MAX_FILE_BYTES": str(4 * MiB)})
    return {"code": code, "output": output, "store": store, "reports": home / "reports", "cases": cases}


def test_hostile_manifest_finishes_and_stores_the_rest(hostile_manifest: dict):
    run = hostile_manifest
    assert run["code"] == 0, run["output"]
    store = CohortStore.open(str(run["store"]))
    assert store.verify() == []
    a, b = pseudonym("KEEP-A", KEY), pseudonym("MIXED-B", KEY)
    counts = store.index().groupby("patient_id").size().to_dict()
    # MIXED-B's one valid session is stored although another of its sessions is dated year 1.
    assert counts == {a: 2, b: 1}
    assert len(_entries(run["reports"] / "quarantine" / f"{b}.json")) == len(run["cases"])


@pytest.mark.parametrize("case", ["dev-zero", "fifo", "symlink-to-dev-zero", "fifo-beside-header", "header-bomb",
                                  "gzip-bomb",
                                  "oversized-file", "year-1", "year-1850", "year-2150"])
def test_hostile_manifest_case_is_quarantined_with_file_line_and_reason(hostile_manifest: dict, case: str):
    run = hostile_manifest
    name, lines, reason = run["cases"][case]
    entries = _entries(run["reports"] / "quarantine" / f"{pseudonym('MIXED-B', KEY)}.json")
    hits = [e for e in entries if e.startswith(lines + " ") and name in e and reason in e]
    assert len(hits) == 1, (case, name, lines, reason, entries)
    # The run report (what artifacts show) names the same file and reason.
    run_report = json.loads(sorted(run["reports"].glob("ingest-*.json"))[-1].read_text())
    reasons = [" ".join(s["reasons"]) for p in run_report["patients"] for s in p["sessions"]]
    assert any(name in r and reason in r for r in reasons), (case, reasons)


@pytest.fixture(scope="module")
def hostile_bids(tiny_bids: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny BIDS cohort (sub-002 cut to 2 sessions) with, in sub-001: ses-02's T1c a symlink to /dev/zero,
    ses-03's FLAIR a named pipe, ses-04 dated year 1, and the sessions table saved with a byte-order mark."""
    root = tmp_path_factory.mktemp("hostile-bids") / "bids"
    shutil.copytree(tiny_bids, root)
    for ses in ("ses-03", "ses-04"):
        shutil.rmtree(root / "sub-002" / ses)
    t1c = _anat(root, "001", "ses-02", "T1c")
    t1c.unlink()
    t1c.symlink_to("/dev/zero")
    flair = _anat(root, "001", "ses-03", "FLAIR")
    flair.unlink()
    os.mkfifo(flair)
    tsv = root / "sub-001" / "sub-001_sessions.tsv"
    lines = tsv.read_text().splitlines()
    assert lines[4].startswith("ses-04\t")
    lines[4] = "ses-04\t0001-01-01T10:00:00"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    home, store = root.parent / "home", root.parent / "cohort.zarr"
    code, output = _ingest_subprocess(root, store, home)
    return {"code": code, "output": output, "store": store, "reports": home / "reports"}


def test_hostile_bids_finishes_and_stores_the_valid_sessions(hostile_bids: dict):
    run = hostile_bids
    assert run["code"] == 0, run["output"]
    store = CohortStore.open(str(run["store"]))
    assert store.verify() == []
    one, two = pseudonym("001", KEY), pseudonym("002", KEY)
    assert store.index().groupby("patient_id").size().to_dict() == {one: 2, two: 2}
    # ses-01 and ses-05 of sub-001 (dates read through the byte-order mark): 2015-01-31T14:09 -> 2015-11-06T17:58
    np.testing.assert_allclose(store.arrays(one).days, [0.0, 279 + (3 * 60 + 49) / 1440], atol=1e-6)


@pytest.mark.parametrize(("origin", "name", "reason"), [
    ("sub-001/ses-02", "sub-001/ses-02/anat/sub-001_ses-02_ce-gd_T1w.nii.gz", "not a regular file"),
    ("sub-001/ses-03", "sub-001/ses-03/anat/sub-001_ses-03_FLAIR.nii.gz", "not a regular file"),
    ("sub-001/ses-04", "sub-001/sub-001_sessions.tsv line 5", "implausible date"),
])
def test_hostile_bids_case_is_quarantined_with_file_and_reason(hostile_bids: dict, origin: str, name: str,
                                                               reason: str):
    entries = _entries(hostile_bids["reports"] / "quarantine" / f"{pseudonym('001', KEY)}.json")
    assert len(entries) == 3, entries
    assert any(e.startswith(origin + " ") and name in e and reason in e for e in entries), entries


def test_manifest_with_byte_order_mark_is_read(tiny_bids: Path, settings, tmp_path: Path):
    manifest = tmp_path / "excel.csv"
    _write_manifest(manifest, _session("BOM-A", "2020-01-10", _anat(tiny_bids, "001", "ses-01", "T1c"),
                                       _anat(tiny_bids, "001", "ses-01", "FLAIR")))
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())  # what Excel's "CSV UTF-8" writes
    report = ingest_cohort(manifest, str(tmp_path / "cohort.zarr"), settings)
    assert report.problems == [] and report.stored == 1, report.to_dict()
    assert CohortStore.open(str(tmp_path / "cohort.zarr")).verify() == []


def test_allowed_root_confines_every_manifest_path(tiny_bids: Path, settings, tmp_path: Path):
    root = tmp_path / "root"
    (root / "scans").mkdir(parents=True)
    inside = {}
    for ses in ("ses-01", "ses-02"):
        for kind in ("T1c", "FLAIR"):
            inside[ses, kind] = root / "scans" / _anat(tiny_bids, "001", ses, kind).name
            shutil.copy(_anat(tiny_bids, "001", ses, kind), inside[ses, kind])
    outside = tmp_path / "elsewhere.nii.gz"
    shutil.copy(_anat(tiny_bids, "001", "ses-03", "T1c"), outside)
    (root / "scans" / "link.nii.gz").symlink_to(outside)
    rows = _session("CONF-A", "2020-01-10", inside["ses-01", "T1c"], inside["ses-01", "FLAIR"])
    rows += _session("CONF-A", "2020-02-10", outside, inside["ses-02", "FLAIR"])  # line 4: absolute, outside
    rows += _session("CONF-A", "2020-03-10", "scans/link.nii.gz", inside["ses-02", "FLAIR"])  # line 6: a symlink out
    rows += _session("CONF-A", "2020-04-10", inside["ses-02", "T1c"], "../elsewhere.nii.gz")  # line 9: '..'
    manifest = root / "manifest.csv"
    _write_manifest(manifest, rows)
    store_url = str(tmp_path / "cohort.zarr")
    result = CliRunner().invoke(
        app, ["--home", str(settings.home), "ingest", str(manifest), "--store", store_url, "--spacing", "4",
              "--allowed-root", str(root)],
        env={"LONGITUDINAL_PSEUDONYM_KEY": KEY.decode(), "COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    store = CohortStore.open(store_url)
    assert store.verify() == [] and len(store.index()) == 1
    entries = _entries(settings.reports_path / "quarantine" / f"{pseudonym('CONF-A', KEY)}.json")
    assert len(entries) == 3, entries
    for line in ("line 4", "line 6", "line 9"):
        assert any(f"{line} " in e + " " and "outside the allowed root" in e for e in entries), (line, entries)


def test_date_that_cannot_be_shifted_is_quarantined_with_a_window_down_to_year_1(tiny_bids: Path, settings,
                                                                                 tmp_path: Path):
    import datetime as dt

    manifest = tmp_path / "m.csv"
    rows = _session("WIDE-A", "2020-01-10", _anat(tiny_bids, "001", "ses-01", "T1c"),
                    _anat(tiny_bids, "001", "ses-01", "FLAIR"))
    rows += _session("WIDE-A", "0001-01-01", _anat(tiny_bids, "001", "ses-02", "T1c"),
                     _anat(tiny_bids, "001", "ses-02", "FLAIR"))
    _write_manifest(manifest, rows)
    wide = settings.model_copy(update={"earliest_date": dt.date(1, 1, 1)})
    report = ingest_cohort(manifest, str(tmp_path / "cohort.zarr"), wide)
    (patient,) = report.patients
    assert patient.error is None and report.stored == 1
    (refused,) = [s for s in patient.sessions if s.status == "quarantined"]
    assert refused.reasons == ["date out of range in m.csv lines 4,5: it cannot be shifted"]
    assert CohortStore.open(str(tmp_path / "cohort.zarr")).verify() == []
