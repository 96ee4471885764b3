"""The evaluation protocol on a phantom store: every later scan is a target, LCI and linear are in every table,
LCI's errors equal the known volume changes, bins partition the targets, skill is relative to LCI, and sampled
models get interval / CRPS columns."""

from __future__ import annotations

import json
import math

import pytest
import torch

from longitudinal.data.phantoms import make_phantom_store
from longitudinal.evaluation.harness import EvalConfig, evaluate_models, evaluate_ref
from longitudinal.models.base import build_model

# A fixed field of view: these tests compare against exact voxel counts of the store grid.
CFG = EvalConfig(crop_size=(16, 16, 16), max_context=2, n_samples=3, device="cpu", fov="fixed")
TINY_TFM = {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 16, "steps": 2}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    # Gaps of 40-400 days so targets fall in several horizon bins.
    return make_phantom_store(str(tmp_path_factory.mktemp("eval") / "c.zarr"), n_patients=4, seed=3,
                              grid=(24, 24, 24), n_times=(3, 4), gap_days=(40.0, 400.0))


@pytest.fixture(scope="module")
def report(cohort):
    torch.manual_seed(0)
    tfm = build_model("tfm", TINY_TFM, in_channels=2)
    return evaluate_models({"tfm": tfm}, cohort.url, config=CFG)


def test_every_table_has_lci_and_linear_beside_the_model(report, cohort):
    assert report.models == ["lci", "linear", "tfm"]
    # Every (earlier cut, later scan) pair: T (T - 1) / 2 targets per patient.
    n_targets = sum(len(p.days) * (len(p.days) - 1) // 2 for p in cohort.patients.values())
    assert report.n_targets == n_targets and len(report.records) == 3 * n_targets
    horizons = {r["horizon"] for r in report.rows}
    assert horizons == {"0-90", "90-180", "180-365", ">365", "all"}
    for h in horizons:
        assert [r["model"] for r in report.rows if r["horizon"] == h] == ["lci", "linear", "tfm"]
    # Bins partition the targets and every model is scored on the same ones.
    for model in report.models:
        rows = [r for r in report.rows if r["model"] == model]
        assert sum(r["n"] for r in rows if r["horizon"] != "all") == next(r["n"] for r in rows
                                                                          if r["horizon"] == "all")
    keys = lambda m: sorted((r["patient_id"], r["target_idx"], r["last_context_idx"])  # noqa: E731
                            for r in report.records if r["model"] == m)
    assert keys("lci") == keys("linear") == keys("tfm")


def test_lci_errors_equal_the_known_volume_changes(report, cohort):
    for rec in (r for r in report.records if r["model"] == "lci"):
        truth = cohort.patients[rec["patient_id"]]
        assert rec["volume_true_ml"] == pytest.approx(truth.whole_ml[rec["target_idx"]])
        assert rec["volume_error_ml"] == pytest.approx(
            abs(truth.whole_ml[rec["last_context_idx"]] - truth.whole_ml[rec["target_idx"]]))
        days = truth.days
        assert rec["horizon_days"] == pytest.approx(days[rec["target_idx"]] - days[rec["last_context_idx"]],
                                                    abs=1e-3)
        # Concentric growth: LCI's mask sits inside the target, so Dice = 2 V_last / (V_last + V_target).
        v0, v1 = truth.whole_ml[rec["last_context_idx"]], truth.whole_ml[rec["target_idx"]]
        assert rec["dice_whole"] == pytest.approx(2 * v0 / (v0 + v1), abs=1e-9)
        assert rec["hd95_mm"] > 0


def test_skill_is_relative_to_lci(report):
    for row in report.rows:
        lci = next(r for r in report.rows if r["horizon"] == row["horizon"] and r["model"] == "lci")
        if row["n"] == 0:
            continue
        assert row["skill_volume_error_ml"] == pytest.approx(1 - row["volume_error_ml"] / lci["volume_error_ml"])
        assert row["skill_dice_whole"] == pytest.approx(1 - (1 - row["dice_whole"]) / (1 - lci["dice_whole"]))
        if row["model"] == "lci":
            assert row["skill_dice_whole"] == pytest.approx(0.0)
    # Linear extrapolation of a steadily growing sphere beats persistence on volume over all targets.
    all_rows = {r["model"]: r for r in report.rows if r["horizon"] == "all"}
    assert all_rows["linear"]["volume_error_ml"] < all_rows["lci"]["volume_error_ml"]


def test_sampled_models_get_interval_and_crps_columns(report):
    for row in report.rows:
        sampled = row["model"] == "tfm"
        for key in ("coverage80", "coverage95", "crps_ml", "ged"):
            assert (key in row) == sampled
        if sampled and row["n"]:
            assert 0 <= row["coverage80"] <= row["coverage95"] <= 1
            assert row["crps_ml"] >= 0


def test_json_rows_have_the_documented_keys(report, tmp_path):
    rows = json.loads(report.to_json(tmp_path / "rows.json").read_text())
    need = {"model", "horizon", "horizon_lo", "horizon_hi", "n", "dice_whole", "dice_enhancing", "hd95_mm",
            "volume_error_ml"}
    assert all(need <= set(r) for r in rows)
    assert all({"coverage80", "coverage95", "crps_ml"} <= set(r) for r in rows if r["model"] == "tfm")
    open_bin = next(r for r in rows if r["horizon"] == ">365")
    assert open_bin["horizon_lo"] == 365 and open_bin["horizon_hi"] is None
    assert all(not (isinstance(v, float) and math.isnan(v)) for r in rows for v in r.values())


def test_evaluate_a_baseline_reference_on_chosen_patients(cohort):
    pids = sorted(cohort.patients)[:2]
    rep = evaluate_ref("linear", cohort.url, pids, config=CFG)
    assert rep.models == ["lci", "linear"] and rep.patients == pids
    with pytest.raises(ValueError, match="neither a checkpoint"):
        evaluate_ref("no-such-model", cohort.url, config=CFG)


def test_a_models_calibration_sets_its_interval_metrics(cohort, report):
    """With huge absolute scores, every interval covers the truth; with signed scores far above any error, none
    does; the raw-sample columns are the same either way."""
    from longitudinal.models.calibration import VolumeCalibration

    torch.manual_seed(0)
    tfm = build_model("tfm", TINY_TFM, in_channels=2)
    raw = {(r["model"], r["horizon"]): r for r in report.rows}
    for form, expected in (("symmetric", 1.0), ("signed", 0.0)):
        tfm.volume_calibration = {"whole": VolumeCalibration("whole", (1e6,) * 100, form=form)}
        rows = evaluate_models({"tfm": tfm}, cohort.url, config=CFG).rows
        for row in (r for r in rows if r["model"] == "tfm" and r["n"]):
            assert row["coverage80"] == row["coverage95"] == expected
            ref = raw[("tfm", row["horizon"])]
            assert row["coverage80_raw"] == ref["coverage80"] and row["crps_raw_ml"] == pytest.approx(ref["crps_ml"])


def test_sampled_records_carry_the_linear_forecast_that_scaled_intervals_use(cohort, report):
    """Every sampled-model record holds the linear baseline's volume forecast of its target, and a
    difficulty-scaled calibration's interval is median -/+ (0.25 + gap years) * (c + |median - linear|) * e."""
    from longitudinal.models.calibration import VolumeCalibration

    def key(r):
        return r["patient_id"], r["target_idx"], r["last_context_idx"]

    lin = {key(r): r["volume_pred_ml"] for r in report.records if r["model"] == "linear"}
    sampled = [r for r in report.records if r["model"] == "tfm"]
    assert sampled and all(r["volume_linear_ml"] == pytest.approx(lin[key(r)]) for r in sampled)
    torch.manual_seed(0)
    tfm = build_model("tfm", TINY_TFM, in_channels=2)
    tfm.volume_calibration = {"whole": VolumeCalibration("whole", (0.5,) * 50, form="scaled", difficulty_ml=10.0)}
    recs = [r for r in evaluate_models({"tfm": tfm}, cohort.url, config=CFG).records if r["model"] == "tfm"]
    assert len(recs) == len(sampled)
    for r in recs:
        m, v = r["volume_median_ml"], r["volume_true_ml"]
        half = (0.25 + r["horizon_days"] / 365.25) * (10.0 + abs(m - r["volume_linear_ml"])) * 0.5
        assert r["coverage80"] == float(max(m - half, 0.0) <= v <= m + half)
