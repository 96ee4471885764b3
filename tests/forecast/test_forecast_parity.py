"""One prediction path: the same native scans, query and seed give the same median volumes and interval ends
through (a) ``longitudinal forecast --scan``, (b) the registered MLflow model loaded with
``mlflow.pyfunc.load_model``, (c) ``forecast_patient`` on the ingested store and (d) the evaluation harness; and
(a) and (b) write the same files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from forecasthelpers import KEY, baseline_checkpoint, register_champion, write_manifest, write_native_patient
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.evaluation.harness import EvalConfig, evaluate_models
from longitudinal.forecast import ForecastRequest, Queries, forecast_patient
from longitudinal.ingest.deid import pseudonym
from longitudinal.models.calibration import VolumeCalibration, calibrations_to_meta
from longitudinal.models.checkpoint import Checkpoint
from longitudinal.predict import Predictor
from longitudinal.settings import Settings

DATES = ["2024-01-10", "2024-04-19", "2024-08-07", "2024-12-02"]
SAMPLES = 4
SEED = 3
ENDS = ("median", "lo80", "hi80", "lo95", "hi95")


def _np_checkpoint(path: Path) -> Path:
    """An untrained (random-weight, seeded) np checkpoint carrying a difficulty-scaled calibration, so its samples
    differ and its intervals depend on the linear forecast of the query."""
    torch.manual_seed(0)
    baseline_checkpoint(path, "np", crop=16)
    ckpt = torch.load(path, weights_only=True)
    gaps = np.linspace(30, 600, 30)
    cal = VolumeCalibration.fit("whole", np.full(30, 50.0) + 4.0 * (0.25 + gaps / 365.25), np.full(30, 50.0),
                                gaps, form="scaled", reference_ml=np.full(30, 50.0), difficulty_ml=10.0)
    ckpt["meta"]["volume_calibration"] = calibrations_to_meta({"whole": cal, "enhancing": cal})
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("parity")
    patient = write_native_patient(root / "raw", "sub-07", DATES, [5.0, 6.5, 8.0, 9.0],
                                   [(0.0, 0.0, 0.0), (4.0, 0.0, 0.0), (-3.0, 2.0, 0.0), (2.0, -2.0, 0.0)])
    return {"root": root, "patient": patient, "checkpoint": _np_checkpoint(root / "np.pt")}


def _intervals(q: dict) -> dict[str, float]:
    return {f"{kind}_{e}": q[f"volume_{kind}_ml"][e] for kind in ("whole", "enhancing") for e in ENDS}


def test_cli_pyfunc_forecast_and_evaluation_agree(parity: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    root, patient, ckpt = parity["root"], parity["patient"], parity["checkpoint"]
    home = root / "home"
    monkeypatch.setenv("LONGITUDINAL_HOME", str(home))
    monkeypatch.setenv("LONGITUDINAL_PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("COLUMNS", "200")
    settings = Settings(home=home, pseudonym_key=KEY, mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    pid = pseudonym(patient.raw_id, KEY.encode())
    gap = patient.days[3] - patient.days[2]

    # (c) the full series ingested into a store; a retrospective query at the last scan's day sees scans 0..2
    from longitudinal.ingest import ingest_cohort

    store = str(root / "cohort.zarr")
    report = ingest_cohort(write_manifest(root / "raw" / "manifest.csv", [patient]), store, settings)
    assert (report.stored, report.quarantined) == (4, 0), report.to_dict()
    c = forecast_patient(settings, ForecastRequest(
        pid, Queries(days_since_baseline=(patient.days[3],)), store_url=store, model_ref=str(ckpt),
        n_samples=SAMPLES, seed=SEED, write=False))
    assert c.queries[0].n_context == 3
    results = {"forecast_patient": _intervals(c.to_json()["queries"][0])}

    # (d) the evaluation harness on that store: the target scan 3 from scans 0..2
    ev = evaluate_models({"np": Predictor.from_checkpoint(Checkpoint.load(ckpt), "cpu")}, store, [pid],
                         EvalConfig(n_samples=SAMPLES, seed=SEED, device="cpu"), baselines=False)
    rec = next(r for r in ev.records if r["target_idx"] == 3 and r["last_context_idx"] == 2)
    assert rec["n_context"] == 3 and rec["horizon_days"] == pytest.approx(gap)
    results["evaluation"] = {f"whole_{e}": rec[f"interval_{e}_ml"] for e in ENDS}
    results["evaluation"].update({f"enhancing_{e}": rec[f"interval_enh_{e}_ml"] for e in ENDS})

    # (a) the CLI given the native files of scans 0..2 and "--in gap"
    scans = [f"{d}:{ch}={patient.files[t][ch]}" for t, d in enumerate(DATES[:3]) for ch in ("T1c", "FLAIR", "label")]
    out_cli = root / "out-cli"
    args = ["forecast", patient.raw_id, "--in", f"{gap:g}", "--model", str(ckpt), "--samples", str(SAMPLES),
            "--seed", str(SEED), "--out", str(out_cli)]
    for s in scans:
        args += ["--scan", s]
    run = CliRunner().invoke(app, args, catch_exceptions=False)
    assert run.exit_code == 0, run.output
    cli_json = json.loads((out_cli / f"{pid}_forecast.json").read_text())
    results["cli"] = _intervals(cli_json["queries"][0])

    # (b) the registered MLflow model, loaded as a consumer does, given the same files and dates
    version = register_champion(settings, ckpt)
    mlflow.set_tracking_uri(settings.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{settings.registered_model_name}/{version}")
    frame = pd.DataFrame([{"patient_id": patient.raw_id, "date": d, "T1c": str(patient.files[t]["T1c"]),
                           "FLAIR": str(patient.files[t]["FLAIR"]), "label": str(patient.files[t]["label"])}
                          for t, d in enumerate(DATES[:3])])
    out_pyfunc = root / "out-pyfunc"
    rows = model.predict(frame, params={"in_days": [gap], "n_samples": SAMPLES, "seed": SEED,
                                        "out_dir": str(out_pyfunc)})
    row = rows.iloc[0]
    results["pyfunc"] = {f"{kind}_{e}": float(row[f"volume_{kind}_ml_{e}"]) for kind in ("whole", "enhancing")
                         for e in ENDS}
    assert row["pseudonym"] == pid and row["days_since_baseline"] == pytest.approx(patient.days[3])

    reference = results["forecast_patient"]
    assert reference["whole_hi95"] > reference["whole_median"] > 0  # a real interval, not a degenerate one
    for path, values in results.items():
        assert values == pytest.approx(reference, rel=1e-6, abs=1e-6), (path, values, reference)

    # (a) and (b) write the same files with the same contents
    cli_files = sorted(p.name for p in out_cli.iterdir())
    pyfunc_dir = out_pyfunc / pid
    assert cli_files == sorted(p.name for p in pyfunc_dir.iterdir())
    assert {f"{pid}_forecast.json", f"{pid}_volumes.png"} < set(cli_files) and len(cli_files) == 6
    for name in cli_files:
        if name.endswith(".nii.gz"):
            a, b = nib.load(out_cli / name), nib.load(pyfunc_dir / name)
            np.testing.assert_allclose(a.affine, b.affine)
            np.testing.assert_allclose(np.asarray(a.dataobj), np.asarray(b.dataobj), atol=1e-6)
    pyfunc_json = json.loads((pyfunc_dir / f"{pid}_forecast.json").read_text())
    assert pyfunc_json["queries"] == [{**q, "files": {k: str(pyfunc_dir / Path(v).name) for k, v in q["files"].items()}}
                                      for q in cli_json["queries"]]
