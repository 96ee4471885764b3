"""`longitudinal forecast` end to end: a stored patient by raw id with a real date, and a patient in no store
given as NIfTI files (ingested on the fly, outputs in the native space of its latest file)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from forecasthelpers import KEY, Cohort, world_centroid, write_native_patient
from typer.testing import CliRunner

from longitudinal.cli import app


def _cli(cohort: Cohort, *args: str) -> object:
    return CliRunner().invoke(app, ["--home", str(cohort.settings.home), "forecast", *args],
                              env={"LONGITUDINAL_PSEUDONYM_KEY": KEY,
                                   "LONGITUDINAL_MLFLOW_TRACKING_URI": cohort.settings.tracking_uri})


def test_cli_stored_patient_real_date(cohort: Cohort, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _cli(cohort, "sub-01", "--store", cohort.store, "--at", "2024-11-15", "--in", "200", "--samples", "4",
               "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "2024-11-15" in res.output and "+100" in res.output and "+200" in res.output
    assert "dates: real calendar" in res.output
    pid = cohort.pids["sub-01"]
    body = json.loads((out / f"{pid}_forecast.json").read_text())
    assert body["patient"] == pid and body["model"] == "tumor-growth-forecaster@champion"
    assert [q["date"] for q in body["queries"]] == ["2024-11-15", "2025-02-23"]
    assert "sub-01" not in json.dumps(body)  # the raw id stays on the command line
    assert (out / f"{pid}_volumes.png").is_file()
    assert len(list(out.glob("*.nii.gz"))) == 2 * 4


def test_cli_patient_in_no_store_from_scan_files(cohort: Cohort, tmp_path: Path) -> None:
    p = write_native_patient(tmp_path / "raw", "new-patient", ["2025-01-06", "2025-03-17", "2025-06-02"],
                             [4.5, 6.0, 7.5], [(0.0, 0.0, 0.0), (-4.0, 0.0, 2.0), (3.0, -2.0, 0.0)])
    specs = []
    for date, files in zip(p.dates, p.files, strict=True):
        specs += [f"--scan={date}:{ch}={files[ch]}" for ch in ("T1c", "FLAIR", "label")]
    out = tmp_path / "out"
    res = _cli(cohort, "new-patient", *specs, "--in", "90", "--in", "180", "--samples", "2", "--out", str(out),
               "--model", str(cohort.checkpoint))
    assert res.exit_code == 0, res.output
    body = json.loads(next(out.glob("*_forecast.json")).read_text())
    assert body["patient"].startswith("p-") and "new-patient" not in json.dumps(body)
    assert [q["date"] for q in body["queries"]] == ["2025-08-31", "2025-11-29"]
    assert {q["calendar"] for q in body["queries"]} == {"real"}
    latest = nib.load(str(p.latest["T1c"]))
    truth = world_centroid(p.latest["label"])
    whole = [q["volume_whole_ml"]["median"] for q in body["queries"]]
    observed = [o["volume_whole_ml"] for o in body["observed"]]
    assert observed[0] < observed[1] < observed[2] < whole[0] < whole[1]
    for q in body["queries"]:
        img = nib.load(q["files"]["prob_whole"])
        assert img.shape == latest.shape
        np.testing.assert_array_equal(img.affine, latest.affine)
        assert np.linalg.norm(world_centroid(Path(q["files"]["prob_whole"])) - truth) < 1.0
    # the temporary store of the ingested files is gone; nothing was added to the cohort store
    from storage.store import CohortStore

    assert body["patient"] not in CohortStore.open(cohort.store).patient_ids()
