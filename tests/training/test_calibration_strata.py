"""Volume calibration per treatment stratum: fitted beside the pooled one when a stratum has enough validation
targets (else the pooled one serves it, and the log says so), carried through the checkpoint, and chosen by the
Predictor per query by whether a treatment event lies between the last context scan and the query."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from longitudinal.data.context import PatientSeries, treatment_in_gap
from longitudinal.data.phantoms import phantom_record
from longitudinal.evaluation.strata import calibrations_by_stratum
from longitudinal.models.base import build_model
from longitudinal.models.calibration import MIN_PER_STRATUM, VolumeCalibration, select_calibration
from longitudinal.models.checkpoint import Checkpoint, DataSettings
from longitudinal.predict import Predictor
from longitudinal.predict.result import VolumeInterval, interval_basis
from longitudinal.training.config import TrainConfig
from longitudinal.training.validation import calibrate_checkpoint
from storage.schema import TreatmentRecord
from storage.store import CohortStore

TINY_TFM = {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 16, "steps": 2}
GRID = (24, 24, 24)
SURGERY = TreatmentRecord("surgery", 250.0, "2030-09-08")


def _write(store: CohortStore, pid: str, days: list[float], events: list[TreatmentRecord], seed: int) -> None:
    radii = [4.0 + 0.008 * d for d in days]
    rec = phantom_record(pid, days, [(12.0, 12.0, 12.0)] * len(days), radii, grid=GRID, seed=seed)
    store.write_patient(dataclasses.replace(rec, treatments=events))


def _records(n: int, treated: bool, err: float) -> list[dict]:
    """Synthetic evaluation records of a sampled model whose median misses the truth by ``err`` ml."""
    return [{"patient_id": f"{'T' if treated else 'U'}{i % 4}", "treated_gap": treated, "horizon_days": 30.0 + i,
             "volume_true_ml": 10.0 + err, "volume_median_ml": 10.0, "volume_linear_ml": 10.0,
             "volume_enh_true_ml": 2.0, "volume_enh_median_ml": 2.0, "volume_enh_linear_ml": 2.0}
            for i in range(n)]


def test_a_stratum_below_the_minimum_falls_back_to_the_pooled_calibration():
    recs = _records(30, False, 1.0) + _records(5, True, 4.0)
    fit = calibrations_by_stratum(recs, form="symmetric")
    assert set(fit.calibrations) == {"whole", "enhancing", "whole:untreated", "enhancing:untreated"}
    assert fit.calibrations["whole"].n == 35 and fit.calibrations["whole:untreated"].n == 30
    own = {f.stratum: (f.own, f.n_targets, f.n_patients) for f in fit.strata}
    assert own == {"untreated": (True, 30, 4), "treated": (False, 5, 4)}
    lines = fit.log_lines()
    assert any("treatment in gap" in line and f"fewer than {MIN_PER_STRATUM}" in line and "pooled" in line
               for line in lines)
    # A treated query takes the pooled calibration; an untreated one its stratum's.
    assert select_calibration(fit.calibrations, "whole", True) is fit.calibrations["whole"]
    assert select_calibration(fit.calibrations, "whole", False) is fit.calibrations["whole:untreated"]
    # With a lower minimum the treated stratum gets its own, wider one (its errors are larger).
    fit = calibrations_by_stratum(recs, form="symmetric", min_targets=5)
    treated, untreated = fit.calibrations["whole:treated"], fit.calibrations["whole:untreated"]
    assert treated.n == 5 and treated.quantiles(10.0, 90.0)["hi80"] > untreated.quantiles(10.0, 90.0)["hi80"]


def test_held_out_coverage_is_logged_per_stratum_and_bin():
    from longitudinal.evaluation.strata import leave_one_patient_out

    recs = _records(30, False, 1.0) + _records(24, True, 4.0)
    fit = dataclasses.replace(calibrations_by_stratum(recs, form="symmetric"),
                              held_out=tuple(leave_one_patient_out(recs, form="symmetric")))
    held = [line for line in fit.log_lines() if "leave-one-patient-out" in line]
    assert len(held) == 3  # all targets, untreated gap, treatment in gap: one bin each (gaps 30-59 days)
    assert "all targets: 0-90 d" in held[0] and "(54 targets, 8 patients)" in held[0]
    assert "untreated gap" in held[1] and "(30 targets, 4 patients)" in held[1]
    assert "treatment in gap" in held[2] and "(24 targets, 4 patients)" in held[2]


def test_stratum_calibrations_round_trip_and_the_predictor_picks_them_per_query(tmp_path):
    """Same scans for a treated and an untreated patient, a deterministic model (so the same samples): the
    treated query's interval comes from the treated calibration, the others from the untreated one, and a
    structure without stratum calibrations (enhancing) or an older checkpoint uses the pooled one."""
    store = CohortStore.open(tmp_path / "c.zarr", create=True)
    _write(store, "T", [0.0, 100.0], [SURGERY], seed=0)
    _write(store, "U", [0.0, 100.0], [], seed=0)
    cals = {"whole": VolumeCalibration("whole", (2.0,) * 30),
            "enhancing": VolumeCalibration("enhancing", (1.0,) * 30),
            "whole:treated": VolumeCalibration("whole", (5.0,) * 30),
            "whole:untreated": VolumeCalibration("whole", (0.5,) * 30)}
    base = Checkpoint.of_model(build_model("linear"), ["T1c", "FLAIR"], (2.0, 2.0, 2.0), (16, 16, 16),
                               DataSettings(max_context=2))
    base.with_calibration(cals).save(tmp_path / "strata.pt")
    base.with_calibration({k: cals[k] for k in ("whole", "enhancing")}).save(tmp_path / "pooled.pt")
    back = Checkpoint.load(tmp_path / "strata.pt")
    assert set(back.calibration) == set(cals)
    assert all(back.calibration[k].to_dict() == c.to_dict() for k, c in cals.items())

    predictor = Predictor.from_checkpoint(back, device="cpu")
    treated, untreated = (PatientSeries(store.arrays(p)) for p in ("T", "U"))
    assert treatment_in_gap(treated.events, 100.0, 300.0) and not treatment_in_gap(treated.events, 100.0, 200.0)
    t200, t300 = predictor.predict(treated, [200.0, 300.0]).queries
    (u300,) = predictor.predict(untreated, [300.0]).queries
    assert np.array_equal(t300.volumes_ml, u300.volumes_ml)  # the same samples ...

    def interval(q, structure, cal):  # noqa: ANN001, ANN202
        col = 0 if structure == "whole" else 1
        return VolumeInterval.from_samples(q.volumes_ml[:, col], q.gap_days, cal, float(q.linear_ml[col]), q.max_ml)

    assert t300.whole == interval(t300, "whole", cals["whole:treated"])  # ... different intervals
    assert u300.whole == interval(u300, "whole", cals["whole:untreated"])
    assert t200.whole == interval(t200, "whole", cals["whole:untreated"])  # surgery on day 250: not in the gap
    assert t300.whole.hi80 > u300.whole.hi80
    assert t300.enhancing == interval(t300, "enhancing", cals["enhancing"]) == u300.enhancing
    # Each query names the calibration behind its whole-tumour interval, and the forecast's interval basis
    # describes every calibration a query can name.
    assert (t300.calibration, u300.calibration, t200.calibration) == ("whole:treated", "whole:untreated",
                                                                       "whole:untreated")
    basis = interval_basis(back.calibration, 32)
    assert {"whole", "whole:treated", "whole:untreated", "enhancing"} <= set(basis)
    assert basis["whole:treated"]["calibrated"] and basis["whole:treated"]["calibration_targets"] == 30

    # A checkpoint with the pooled keys only (as written before strata) serves the pooled calibration.
    old = Predictor.from_checkpoint(Checkpoint.load(tmp_path / "pooled.pt"), device="cpu")
    (o300,) = old.predict(treated, [300.0]).queries
    assert o300.whole == interval(o300, "whole", cals["whole"]) and o300.calibration == "whole"
    assert "whole:treated" not in interval_basis(old.calibration, 32)

    # A key that is neither a structure nor structure:stratum is refused when the checkpoint is read.
    buf = io.BytesIO()
    bad = base.to_dict()
    bad["meta"]["volume_calibration"] = {"whole:banana": cals["whole"].to_dict()}
    torch.save(bad, buf)
    buf.seek(0)
    with pytest.raises(ValueError, match="whole:banana"):
        Checkpoint.load(buf)


def test_calibrate_checkpoint_fits_each_stratum_with_enough_targets(tmp_path):
    """One validation patient with 9 scans 100 days apart (every (cut, later scan) pair a target: 36), operated
    on day 350: the 4 x 5 gaps from scans 0-3 to scans 4-8 hold the surgery (20 treated targets, enough for a
    calibration of their own), the other 16 do not (too few: the pooled calibration serves them, and the log
    says so). The checkpoint carries the pooled and the treated calibrations."""
    url = str(tmp_path / "c.zarr")
    store = CohortStore.open(url, create=True)
    _write(store, "V0", [100.0 * i for i in range(9)], [TreatmentRecord("surgery", 350.0, "2030-12-17")], seed=0)
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    Checkpoint.of_model(build_model("tfm", TINY_TFM, in_channels=2), ["T1c", "FLAIR"], (2.0, 2.0, 2.0),
                        (16, 16, 16), DataSettings(max_context=2)).save(path)
    cfg = TrainConfig(model="tfm", model_options=TINY_TFM, crop_size=(16, 16, 16), max_context=2, device="cpu",
                      calib_samples=2, num_workers=0, steps=1)
    lines: list[str] = []
    cals = calibrate_checkpoint(path, url, ["V0"], cfg, torch.device("cpu"), lines.append)
    assert MIN_PER_STRATUM == 20  # the counts below sit on either side of it
    keys = {"whole", "enhancing", "whole:treated", "enhancing:treated"}
    assert set(cals) == set(Checkpoint.load(path).calibration) == keys
    assert (cals["whole"].n, cals["whole:treated"].n, cals["enhancing:treated"].n) == (36, 20, 20)
    assert cals["whole:treated"].n_patients == 1
    assert sum("own calibration on 20 targets" in line for line in lines) == 1
    assert any("untreated gap" in line and "only 16 validation targets" in line and "pooled calibration" in line
               for line in lines)
    assert not any("leave-one-patient-out" in line for line in lines)  # one patient: none to hold out
    # Calibrated again with the same settings: the checkpoint is left as it is.
    before = path.read_bytes()
    assert set(calibrate_checkpoint(path, url, ["V0"], cfg, torch.device("cpu"))) == keys
    assert path.read_bytes() == before
