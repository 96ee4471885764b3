"""Recalibrating a finished run on more held-out patients (`longitudinal calibrate`), on a phantom store."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.data.dataset import enumerate_targets
from longitudinal.data.phantoms import make_phantom_store, phantom_record
from longitudinal.data.splits import Split
from longitudinal.models.checkpoint import Checkpoint
from longitudinal.training.config import TrainConfig
from longitudinal.training.fit import fit
from longitudinal.training.recalibrate import recalibrate_run
from storage.store import CohortStore

TINY_TFM = {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 16, "steps": 2}
NEW = ("NEW1", "NEW2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, Path]:
    """A 3-step tfm run on 8 phantom patients, then two patients ingested after training (never seen by it)."""
    root = tmp_path_factory.mktemp("recal")
    url = make_phantom_store(str(root / "c.zarr"), n_patients=8, seed=3, grid=(24, 24, 24)).url
    cfg = TrainConfig(model="tfm", model_options=TINY_TFM, crop_size=(16, 16, 16), batch_size=2, num_workers=0,
                      device="cpu", warmup_steps=0, augment=None, eval_every=1000, ckpt_every=1000, val_targets=4,
                      budget_s=None, steps=3, calib_samples=2)
    fit(cfg, url, root / "run", progress=None)
    store = CohortStore.open(url)
    for i, pid in enumerate(NEW):
        store.write_patient(phantom_record(pid, [0.0, 90.0, 250.0], [(12.0, 12.0, 12.0)] * 3,
                                           [4.0, 5.0 + i, 6.5 + i], grid=(24, 24, 24), seed=10 + i))
    return url, root / "run"


def _calibration(path: Path):  # noqa: ANN202
    ckpt = Checkpoint.load(path)
    return ckpt.calibration["whole"], ckpt.provenance["volume_calibration_fit"]


def test_recalibration_refits_both_checkpoints_on_the_given_patients(trained) -> None:  # noqa: ANN001
    url, run = trained
    split = Split.load(run / "split.json")
    before, _ = _calibration(run / "model.pt")
    assert before.n_patients == len(split.val)
    assert before.form == "scaled" and before.difficulty_ml == 10.0  # what training ships by default

    pids = [*split.val, *NEW]
    out = recalibrate_run(run, url, pids, device="cpu")
    want_targets = len(enumerate_targets(url, pids, 3, "all"))
    assert out.checkpoints == (run / "checkpoints" / "best.pt", run / "model.pt")
    for path in out.checkpoints:
        cal, key = _calibration(path)
        assert cal.n_patients == len(pids) and cal.n == want_targets > before.n
        assert key["patients"] == sorted(pids)
    assert out.whole.n == want_targets

    # --targets caps the targets, evenly spaced over the list
    capped = recalibrate_run(run, url, pids, max_targets=3, device="cpu")
    assert capped.whole.n == 3

    # --form symmetric refits with gap-normalised scores only (and the fit key says so)
    sym = recalibrate_run(run, url, pids, max_targets=3, device="cpu", form="symmetric")
    cal, key = _calibration(run / "model.pt")
    assert sym.whole.form == cal.form == "symmetric" and "symmetric" in key["form"]
    assert cal.scores != capped.whole.scores  # same 3 targets, scores no longer divided by the difficulty


def test_training_test_and_unknown_patients_are_refused_and_nothing_is_rewritten(trained) -> None:  # noqa: ANN001
    url, run = trained
    split = Split.load(run / "split.json")
    files = {p: p.read_bytes() for p in (run / "checkpoints" / "best.pt", run / "model.pt")}
    with pytest.raises(ValueError) as err:
        recalibrate_run(run, url, [split.train[0], split.test[0], "GHOST", "NEW1", "NEW1"], device="cpu",
                        form="banana")
    msg = str(err.value)
    assert "form must be 'scaled' or 'symmetric', got 'banana'" in msg
    assert f"in the run's train split, not held out: ['{split.train[0]}']" in msg
    assert f"in the run's test split, not held out: ['{split.test[0]}']" in msg
    assert "patients not in the store" in msg and "'GHOST'" in msg and "listed twice: ['NEW1']" in msg
    assert {p: p.read_bytes() for p in files} == files

    with pytest.raises(ValueError, match="no checkpoints/best.pt or model.pt"):
        recalibrate_run(run.parent / "nowhere", url, ["NEW1"], device="cpu")


def test_calibrate_from_the_cli(trained, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    url, run = trained
    monkeypatch.setenv("LONGITUDINAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "400")  # env, not console.width: setattr would pin the width for later tests
    runner = CliRunner()
    res = runner.invoke(app, ["calibrate", str(run), "--store", url, "--patients", ",".join(NEW)])
    assert res.exit_code == 0, res.output
    assert f"store  {url}" in res.output  # the locations printed are the ones used
    cal, _ = _calibration(run / "model.pt")
    assert cal.n_patients == 2 and f"of {cal.n_patients} patients" in res.output

    split = Split.load(run / "split.json")
    res = runner.invoke(app, ["calibrate", str(run), "--store", url, "--patients", split.train[0]])
    assert res.exit_code == 1 and "not held out" in res.output and "Traceback" not in res.output


def test_a_deterministic_model_is_refused_before_anything_is_written(trained, tmp_path) -> None:  # noqa: ANN001
    url, _ = trained
    cfg = TrainConfig(model="linear", crop_size=(16, 16, 16), batch_size=2, num_workers=0, device="cpu",
                      augment=None, val_targets=4, budget_s=None, steps=1)
    fit(cfg, url, tmp_path / "lin", progress=None)
    files = {p: p.read_bytes() for p in (tmp_path / "lin").rglob("*.pt")}
    assert files
    val = list(Split.load(tmp_path / "lin" / "split.json").val)
    with pytest.raises(ValueError, match="only sampled models get a volume calibration"):
        recalibrate_run(tmp_path / "lin", url, val, device="cpu")
    assert {p: p.read_bytes() for p in files} == files
