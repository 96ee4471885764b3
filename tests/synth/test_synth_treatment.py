"""Treated synthetic patients: resection leaves a cavity, radiotherapy kills by the linear-quadratic law over its
fractions, temozolomide slows proliferation; a treated tiny patient's table, images and truth agree."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.synth import FisherKolmogorov, get_preset, load_ground_truth, undo_motion
from longitudinal.synth.anatomy import load_anatomy
from longitudinal.synth.patients import is_treated
from longitudinal.synth.render import Thresholds
from longitudinal.synth.treatment import TreatmentPlan, run_course

THR = Thresholds(flair=0.2, enhancing=0.6, necrosis=0.95)
PLAN = TreatmentPlan(surgery_day=5, resection_margin_mm=2.0, rt_start_day=30, rt_fractions=30, rt_dose_gy=2.0,
                     alpha=0.05, beta=0.005, rt_margin_mm=4.0, chemo_courses=((30, 69),), chemo_effect=0.5)


def _ball(shape=(24, 24, 24), radius=6.0) -> np.ndarray:
    """A dense ball (c 0.9 in the middle, falling off over a few voxels)."""
    grid = np.indices(shape).astype(np.float64)
    r = np.sqrt(sum((g - (n - 1) / 2) ** 2 for g, n in zip(grid, shape, strict=True)))
    return (0.9 / (1.0 + np.exp(r - radius))).astype(np.float32)


def test_course_resects_irradiates_and_slows_growth_as_planned():
    domain = np.ones((24, 24, 24), dtype=bool)
    c0 = _ball()

    def frozen(dom: np.ndarray) -> FisherKolmogorov:  # no diffusion and almost no growth: only treatment acts
        return FisherKolmogorov(np.zeros(dom.shape), dom, 1.0, rho=1e-9)

    course = run_course(c0.copy(), domain, frozen, PLAN, [0.0, 7.0, 80.0], THR, spacing_mm=1.0)
    assert [(e.kind, e.start_day, e.end_day) for e in course.events] == [
        ("surgery", 5, None), ("chemotherapy", 30, 69), ("radiotherapy", 30, 69)]
    surgery, chemo, radio = course.events
    (c_base, cav_base), (c_post, cavity), (c_late, cav_late) = course.visits
    assert not cav_base.any() and cavity.any() and np.array_equal(cavity, cav_late)
    # The core (c >= enhancing) and a 2 mm margin are removed; the cavity holds no cells from then on.
    core = c0 >= THR.enhancing
    assert cavity[core].all() and not cavity[c0 < 0.05].any()
    assert np.all(c_post[cavity] == 0) and np.all(c_late[cavity] == 0)
    np.testing.assert_array_equal(surgery.before, c0)
    assert (surgery.after >= THR.flair).sum() < (surgery.before >= THR.flair).sum()
    # 30 fractions of 2 Gy: c falls by SF^30 inside the field, SF = exp(-(alpha d + beta d^2)).
    sf = math.exp(-(0.05 * 2 + 0.005 * 4))
    assert radio.params["surviving_fraction"] == pytest.approx(sf)
    # The field: the visible tumour and the cavity at the first fraction, plus the 4 mm margin; outside it
    # nothing changes.
    field = ndimage.distance_transform_edt(~((radio.before >= THR.flair) | cavity)) <= 4.0
    alive = radio.before > 1e-3
    np.testing.assert_allclose(radio.after[alive & field] / radio.before[alive & field], sf**30, rtol=1e-3)
    np.testing.assert_allclose(radio.after[alive & ~field], radio.before[alive & ~field], rtol=1e-5)
    assert (alive & ~field).any() and (alive & field).any()
    assert PLAN.fraction_days()[:6] == [30, 31, 32, 33, 34, 37] and PLAN.rt_end_day == 69
    assert chemo.params["rho_factor_on_drug"] == 0.5


def test_chemotherapy_halves_proliferation_while_on_drug():
    dom = np.ones((4, 4, 4), dtype=bool)
    solver = FisherKolmogorov(np.zeros(dom.shape), dom, 1.0, rho=0.1)
    on, off = np.full(dom.shape, 0.01, np.float32), np.full(dom.shape, 0.01, np.float32)
    solver.advance(on, 20.0, rho_scale=0.5)
    solver.advance(off, 10.0)

    def logistic(t: float, r: float = 0.1, c0: float = 0.01) -> float:
        return c0 * math.exp(r * t) / (1 + c0 * (math.exp(r * t) - 1))

    np.testing.assert_allclose(on, logistic(10.0), rtol=1e-4)  # 20 days at rho/2 = 10 days at rho
    np.testing.assert_allclose(off, logistic(10.0), rtol=1e-4)


def test_treated_share_is_drawn_per_patient():
    assert not any(is_treated(3, i, 0.0) for i in range(50))
    assert all(is_treated(3, i, 1.0) for i in range(50))
    assert 0.4 < np.mean([is_treated(3, i, 0.5) for i in range(400)]) < 0.6


def test_treated_patient_table_images_and_truth_agree(tmp_path: Path):
    root = tmp_path / "bids"
    result = CliRunner().invoke(app, ["synth", str(root), "--patients", "1", "--seed", "5", "--preset", "tiny",
                                      "--treated-fraction", "1"])
    assert result.exit_code == 0, result.output
    truth = load_ground_truth(root, "001")
    assert truth["params"]["treated"] and truth["treatments"]
    baseline = dt.date.fromisoformat(truth["params"]["baseline_date"])
    table = pd.read_csv(root / "sub-001" / "sub-001_treatments.tsv", sep="\t", keep_default_na=False)
    assert list(table.columns) == ["date", "treatment", "end_date"]
    assert table["treatment"].tolist() == [t["kind"] for t in truth["treatments"]]
    for (_, row), t in zip(table.iterrows(), truth["treatments"], strict=True):
        assert row["date"] == (baseline + dt.timedelta(days=t["days_since_baseline"])).isoformat() == t["date"]
        assert row["end_date"] == (t["end_date"] or "n/a")
    kinds = [t["kind"] for t in truth["treatments"]]
    assert kinds[0] == "surgery" and "radiotherapy" in kinds and "chemotherapy" in kinds

    # The density before and after each event: surgery and radiotherapy lower the burden.
    for t in truth["treatments"]:
        before = np.asarray(nib.load(str(t["density_before_path"])).dataobj)
        after = np.asarray(nib.load(str(t["density_after_path"])).dataobj)
        assert before.shape == after.shape
        if t["kind"] in ("surgery", "radiotherapy"):
            assert after.sum() < before.sum() and t["total_burden_after_ml"] < t["total_burden_before_ml"]

    # The cavity shows in the post-operative images: dark on T1c and FLAIR where the tumour was.
    anatomy = load_anatomy(get_preset("tiny").spacing_mm)
    base, post = truth["sessions"][0], truth["sessions"][1]
    cavity = np.asarray(nib.load(str(post["cavity_path"])).dataobj) > 0
    assert base["cavity_path"] is None and cavity.sum() * anatomy.voxel_ml == pytest.approx(post["cavity_ml"])
    for suffix in ("ce-gd_T1w", "FLAIR"):
        def image(s: dict, suffix: str = suffix) -> np.ndarray:
            ses = s["session_id"]
            path = root / "sub-001" / ses / "anat" / f"sub-001_{ses}_{suffix}.nii.gz"
            return undo_motion(np.asarray(nib.load(str(path)).dataobj, np.float32), anatomy.affine, s["motion"])

        inner = ndimage.binary_erosion(cavity)  # away from the edge that resampling blurs
        inner = inner if inner.any() else cavity
        assert image(post)[inner].mean() < 0.6 * image(base)[inner].mean(), suffix
