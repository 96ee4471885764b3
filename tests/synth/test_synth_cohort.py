"""A tiny synthetic cohort read back by independent tools (pybids, nibabel) and checked against its truth.

The module's cohort (seed 8, default treated fraction) has one untreated patient (sub-001) and two treated ones;
``test_synth_treatment.py`` checks the treatments themselves."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from longitudinal.synth import (
    apply_motion,
    generate_cohort,
    get_preset,
    label_map,
    load_ground_truth,
    render_clean,
    rigid_matrix,
    undo_motion,
)
from longitudinal.synth.anatomy import load_anatomy
from longitudinal.synth.render import Thresholds

SEED = 8  # sub-001 untreated, sub-002 and sub-003 treated
N = 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("synth") / "bids"
    calls: list[tuple[int, int]] = []
    summary = generate_cohort(root, N, SEED, "tiny", progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, N) and calls[-1] == (N, N)
    assert [p.treated for p in summary.patients] == [False, True, True]
    return root, summary


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _anat(root: Path, sub: str, ses: str, suffix: str) -> Path:
    return root / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_{suffix}.nii.gz"


def _label(root: Path, sub: str, ses: str) -> Path:
    return root / "derivatives" / "labels" / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_dseg.nii.gz"


def test_pybids_finds_every_subject_session_and_date(cohort) -> None:
    from bids import BIDSLayout

    root, summary = cohort
    layout = BIDSLayout(str(root), validate=True)
    assert sorted(layout.get_subjects()) == [p.subject for p in summary.patients]
    for p in summary.patients:
        truth = load_ground_truth(root, p.subject)
        sessions = sorted(layout.get_sessions(subject=p.subject))
        assert sessions == [s["session_id"].removeprefix("ses-") for s in truth["sessions"]]
        assert len(sessions) == p.n_visits
        assert 3 <= p.n_visits <= 5
        for ses in sessions:
            t1c = layout.get(subject=p.subject, session=ses, suffix="T1w", ceagent="gd", extension=".nii.gz")
            flair = layout.get(subject=p.subject, session=ses, suffix="FLAIR", extension=".nii.gz")
            assert len(t1c) == 1 and len(flair) == 1
        (tsv,) = layout.get(subject=p.subject, suffix="sessions", extension=".tsv")
        table = pd.read_csv(tsv.path, sep="\t")
        assert list(table.columns) == ["session_id", "acq_time"]
        dates = pd.to_datetime(table["acq_time"], format="ISO8601")
        assert dates.is_monotonic_increasing
        gaps = dates.dt.normalize().diff().dt.days.dropna()
        if p.treated:  # baseline, a post-operative scan within two weeks, follow-ups after radiotherapy
            assert gaps.iloc[0] <= 14 and gaps.iloc[1:].between(60, 180).all(), gaps.tolist()
        else:
            assert gaps.between(30, 180).all()
        days = (dates - dates.iloc[0]).dt.total_seconds() / 86400.0
        np.testing.assert_allclose(days, [s["days_since_baseline"] for s in truth["sessions"]], atol=1e-6)
        assert truth["params"]["baseline_date"] == str(dates.iloc[0].date())
    # The labels derivative is a dataset pybids indexes too.
    with_labels = BIDSLayout(str(root), derivatives=str(root / "derivatives" / "labels"))
    assert len(with_labels.get(suffix="dseg", extension=".nii.gz")) == summary.n_visits
    # Every raw file has a valid BIDS name (the validator's own rules), except what .bidsignore names: the
    # treatment tables, which BIDS does not define.
    from bids_validator import BIDSValidator

    validator = BIDSValidator()
    ignored = (root / ".bidsignore").read_text().split()
    assert ignored == ["*_treatments.tsv"]
    raw = [f for f in root.rglob("*") if f.is_file() and "derivatives" not in f.relative_to(root).parts
           and not any(f.match(pattern) for pattern in ignored) and f.name != ".bidsignore"]
    assert [f for f in raw if not validator.is_bids("/" + str(f.relative_to(root)))] == []
    assert sorted(f.parent.name for f in root.glob("sub-*/*_treatments.tsv")) == [
        f"sub-{p.subject}" for p in summary.patients if p.treated]
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    assert list(participants["participant_id"]) == [f"sub-{p.subject}" for p in summary.patients]
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["DatasetType"] == "raw"


def test_burden_grows_and_volumes_stay_in_bounds(cohort) -> None:
    root, summary = cohort
    preset = get_preset("tiny")
    voxel_ml = load_anatomy(preset.spacing_mm).voxel_ml
    volumes = pd.read_csv(root / "derivatives" / "groundtruth" / "volumes.tsv", sep="\t")
    assert len(volumes) == summary.n_visits
    assert volumes["whole_volume_ml"].max() <= 150.0
    for p in summary.patients:
        truth = load_ground_truth(root, p.subject)
        burden = [float(_load(s["density_path"]).sum(dtype=np.float64)) * voxel_ml for s in truth["sessions"]]
        np.testing.assert_allclose(burden, [s["total_burden_ml"] for s in truth["sessions"]], rtol=1e-5)
        whole = [s["whole_volume_ml"] for s in truth["sessions"]]
        assert whole[0] >= 1.0
        if p.treated:
            # Resection, then radiotherapy: the burden drops after the baseline scan, then the tumour regrows.
            assert burden[1] < burden[0] and burden[-1] > min(burden), burden
            assert whole[-1] >= preset.baseline_volume_ml[0]
        else:
            assert np.all(np.diff(burden) > 0), burden
            assert np.all(np.diff(whole) >= 0)
            assert whole[-1] > whole[0]
        params = truth["params"]
        assert params["silent_period_days"] >= preset.min_silent_days
        assert preset.d_white[0] <= params["d_white_mm2_per_day"] <= preset.d_white[1]
        assert preset.rho[0] <= params["rho_per_day"] <= preset.rho[1]
        anatomy = load_anatomy(preset.spacing_mm)
        assert anatomy.wm[tuple(params["seed_voxel"])] >= 0.9


def test_labels_are_the_thresholds_of_the_moved_density(cohort) -> None:
    root, summary = cohort
    anatomy = load_anatomy(get_preset("tiny").spacing_mm)
    for p in summary.patients:
        truth = load_ground_truth(root, p.subject)
        thr = Thresholds(**truth["params"]["thresholds"])
        for s in truth["sessions"]:
            density = _load(s["density_path"])
            # True volumes are the thresholds of the unmoved density.
            assert s["whole_volume_ml"] == pytest.approx(np.count_nonzero(density >= thr.flair) * anatomy.voxel_ml)
            assert s["enhancing_volume_ml"] == pytest.approx(
                np.count_nonzero(density >= thr.enhancing) * anatomy.voxel_ml
            )
            ses = s["session_id"].removeprefix("ses-")
            labels = _load(_label(root, p.subject, ses))
            assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
            expected = label_map(apply_motion(density, anatomy.affine, s["motion"], order=1), thr)
            np.testing.assert_array_equal(labels, expected)
            # Linear resampling shaves partial voxels off the border (much at 4 mm), never more. After surgery the
            # residual tumour is a thin shell around the cavity, which resampling may shave away almost entirely;
            # it never adds any.
            whole = np.count_nonzero(labels > 0) * anatomy.voxel_ml
            if s["cavity_path"] is None:
                assert whole == pytest.approx(s["whole_volume_ml"], rel=0.3, abs=4 * anatomy.voxel_ml)
            else:
                assert whole <= s["whole_volume_ml"] * 1.3 + 4 * anatomy.voxel_ml


def test_stored_motion_is_the_motion_applied(cohort) -> None:
    root, summary = cohort
    anatomy = load_anatomy(get_preset("tiny").spacing_mm)
    brain = anatomy.brain
    p = summary.patients[0]
    truth = load_ground_truth(root, p.subject)
    thr = Thresholds(**truth["params"]["thresholds"])

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        # Light smoothing on both sides takes out most of the Rician noise, not the misalignment.
        a, b = ndimage.gaussian_filter(a, 1.0), ndimage.gaussian_filter(b, 1.0)
        return float(np.corrcoef(a[brain], b[brain])[0, 1])

    for s in truth["sessions"]:
        ses = s["session_id"].removeprefix("ses-")
        motion = s["motion"]
        density = _load(s["density_path"])
        clean = render_clean(anatomy, density, thr)["FLAIR"]
        stored = _load(_anat(root, p.subject, ses, "FLAIR")).astype(np.float32)
        restored = corr(undo_motion(stored, anatomy.affine, motion), clean)
        as_stored = corr(stored, clean)
        # Small errors in the motion (2 mm, 2 degrees) must restore worse than the stored motion.
        nudged = [
            corr(undo_motion(stored, anatomy.affine, rigid_matrix(angles, shift, [0, 0, 0]) @ motion), clean)
            for angles, shift in (((0, 0, 0), (2, 0, 0)), ((0, 0, 0), (0, -2, 0)), ((0, 0, 2), (0, 0, 0)),
                                  ((2, 0, 0), (0, 0, 0)))
        ]
        assert restored > 0.85, restored
        assert restored > as_stored + 0.05, (restored, as_stored)
        assert restored > max(nudged), (restored, nudged)
        labels_back = undo_motion(_load(_label(root, p.subject, ses)), anatomy.affine, motion, order=0)
        true_whole = density >= thr.flair
        dice = 2 * np.count_nonzero((labels_back > 0) & true_whole) / (
            np.count_nonzero(labels_back > 0) + np.count_nonzero(true_whole)
        )
        assert dice > 0.7, dice  # 4 mm voxels: small tumours lose a border voxel shell each way
    # The header affine stays nominal: registration is genuinely needed.
    img = nib.load(str(_anat(root, p.subject, "01", "ce-gd_T1w")))
    np.testing.assert_allclose(img.affine, anatomy.affine)


def test_same_seed_same_cohort_and_different_seed_differs(cohort, tmp_path: Path) -> None:
    root, _ = cohort
    again = tmp_path / "again"
    generate_cohort(again, 2, SEED, "tiny")  # patient k does not depend on the cohort size
    for sub in ("001", "002"):
        for ses_dir in sorted((root / f"sub-{sub}").glob("ses-*")):
            ses = ses_dir.name.removeprefix("ses-")
            for suffix in ("ce-gd_T1w", "FLAIR"):
                a, b = _anat(root, sub, ses, suffix), _anat(again, sub, ses, suffix)
                np.testing.assert_array_equal(_load(a), _load(b))
                assert a.read_bytes() == b.read_bytes()  # gzip carries no timestamp
            np.testing.assert_array_equal(_load(_label(root, sub, ses)), _load(_label(again, sub, ses)))
    assert (root / "sub-001" / "sub-001_sessions.tsv").read_text() == (
        again / "sub-001" / "sub-001_sessions.tsv"
    ).read_text()

    other = tmp_path / "other"
    generate_cohort(other, 1, SEED + 1, "tiny")
    a = load_ground_truth(root, "001")["params"]
    b = load_ground_truth(other, "sub-001")["params"]
    assert (a["d_white_mm2_per_day"], a["seed_voxel"]) != (b["d_white_mm2_per_day"], b["seed_voxel"])
    assert not np.array_equal(_load(_anat(root, "001", "01", "FLAIR")), _load(_anat(other, "001", "01", "FLAIR")))


def test_channel_map_names_the_files(tmp_path: Path) -> None:
    cmap = {"T1c": {"suffix": "T1w", "acq": "post"}, "FLAIR": {"suffix": "FLAIR", "acq": "tse"}}
    generate_cohort(tmp_path / "c", 1, 0, "tiny", channel_map=cmap)
    anat = tmp_path / "c" / "sub-001" / "ses-01" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == [
        "sub-001_ses-01_acq-post_T1w.nii.gz",
        "sub-001_ses-01_acq-tse_FLAIR.nii.gz",
    ]


def test_bad_arguments_are_reported_together_and_foreign_folders_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        generate_cohort(tmp_path / "x", 0, -1, "huge", channel_map={"T1c": {"ce": "gd"}})
    text = str(err.value)
    for fragment in ("n_patients", "seed", "huge", "tiny", "FLAIR", "suffix"):
        assert fragment in text
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        generate_cohort(foreign, 1, 0, "tiny")
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_default_preset_is_the_mni_2mm_grid(tmp_path: Path) -> None:
    from nilearn.datasets import load_mni152_template

    summary = generate_cohort(tmp_path / "d", 1, 2, "default")
    mni = load_mni152_template(resolution=2)
    p = summary.patients[0]
    assert 3 <= p.n_visits <= 8
    assert 1.0 <= p.min_whole_ml <= p.max_whole_ml <= 150.0
    img = nib.load(str(_anat(tmp_path / "d", p.subject, "01", "FLAIR")))
    assert img.shape == mni.shape
    np.testing.assert_allclose(img.affine, mni.affine)
    assert img.get_data_dtype() == np.int16
    assert nib.load(str(_label(tmp_path / "d", p.subject, "01"))).shape == mni.shape
