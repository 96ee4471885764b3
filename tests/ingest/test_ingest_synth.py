"""Ingest of the tiny synthetic BIDS cohort: registration accuracy against the known motions, exact days,
idempotence, append of a later session and of an out-of-order earlier one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from longitudinal.ingest import ingest_cohort
from longitudinal.ingest.deid import pseudonym
from longitudinal.synth import load_ground_truth
from storage.store import CohortStore

KEY = b"ingest-test-pseudonym-key"


def _brain_points(arrays) -> np.ndarray:
    """RAS mm points (N, 4) of the head voxels of the reference scan (T1c at time 0)."""
    ref = np.asarray(arrays.image[0, 0])
    zyx = np.argwhere(ref > 0.1)
    return np.c_[zyx[:, ::-1], np.ones(len(zyx))] @ arrays.affine.T


def test_registration_recovers_known_motion_and_days(tiny_bids: Path, settings, tmp_path: Path):
    store_url = str(tmp_path / "cohort.zarr")
    report = ingest_cohort(tiny_bids, store_url, settings)
    assert report.quarantined == 0 and report.stored == 9 and report.exit_code() == 0
    store = CohortStore.open(store_url)
    assert store.verify() == []
    errors = []
    for sub in ("001", "002"):
        gt = load_ground_truth(tiny_bids, sub)["sessions"]
        arrays = store.arrays(pseudonym(sub, KEY))
        assert len(arrays.sessions) == len(gt)
        np.testing.assert_allclose(arrays.days, [g["days_since_baseline"] for g in gt], atol=1e-6)
        points = _brain_points(arrays)
        base_inv = np.linalg.inv(gt[0]["motion"])
        for rec, g in zip(arrays.sessions[1:], gt[1:], strict=True):
            # reference point -> this session's native point, estimated vs true (M_s M_b^-1).
            est = points @ np.linalg.inv(np.asarray(rec.transform_to_reference)).T
            true = points @ (g["motion"] @ base_inv).T
            errors.append(np.linalg.norm(est[:, :3] - true[:, :3], axis=1))
            assert rec.registration_metric < 0.25
        assert np.allclose(arrays.sessions[0].transform_to_reference, np.eye(4))
    tre = np.concatenate(errors)
    print(f"TRE over brain voxels: mean {tre.mean():.3f} mm, max {tre.max():.3f} mm, {len(errors)} sessions")
    assert tre.mean() < 0.5 and tre.max() < 1.0


def _hold_back(bids: Path, sub: str, ses: str, aside: Path) -> None:
    """Move a session (images and label) out of the BIDS tree, to be put back later."""
    for part in (Path(f"sub-{sub}") / ses, Path("derivatives/labels") / f"sub-{sub}" / ses):
        shutil.move(str(bids / part), str(aside / part.as_posix().replace("/", "_")))


def _put_back(bids: Path, sub: str, ses: str, aside: Path) -> None:
    for part in (Path(f"sub-{sub}") / ses, Path("derivatives/labels") / f"sub-{sub}" / ses):
        shutil.move(str(aside / part.as_posix().replace("/", "_")), str(bids / part))


def test_reingest_is_a_noop_and_append_adds_exactly_the_new_sessions(bids_copy: Path, settings, tmp_path: Path):
    aside = tmp_path / "aside"
    aside.mkdir()
    _hold_back(bids_copy, "001", "ses-05", aside)  # a later visit
    _hold_back(bids_copy, "002", "ses-01", aside)  # an earlier visit: arrives out of order
    store_url = str(tmp_path / "cohort.zarr")
    first = ingest_cohort(bids_copy, store_url, settings)
    assert (first.stored, first.skipped, first.quarantined) == (7, 0, 0)
    store = CohortStore.open(store_url)
    p1, p2 = pseudonym("001", KEY), pseudonym("002", KEY)
    commits = {p: store.patient_attrs(p)["commit"] for p in (p1, p2)}
    index_before = store.index()

    again = ingest_cohort(bids_copy, store_url, settings)
    assert (again.stored, again.skipped, again.quarantined) == (0, 7, 0)
    assert not any(p.wrote for p in again.patients)
    assert {p: store.patient_attrs(p)["commit"] for p in (p1, p2)} == commits
    pd.testing.assert_frame_equal(store.index(), index_before)

    _put_back(bids_copy, "001", "ses-05", aside)
    _put_back(bids_copy, "002", "ses-01", aside)
    third = ingest_cohort(bids_copy, store_url, settings)
    assert (third.stored, third.skipped) == (2, 7)
    index = store.index()
    assert len(index) == 9 and store.verify() == []
    # Previously stored sessions are untouched (same hashes, same images); exactly the new ones were added.
    assert set(index_before["content_sha256"]) < set(index["content_sha256"])
    for sub, pid in (("001", p1), ("002", p2)):
        gt = load_ground_truth(bids_copy, sub)["sessions"]
        arrays = store.arrays(pid)
        np.testing.assert_allclose(arrays.days, [g["days_since_baseline"] for g in gt], atol=1e-6)
        assert list(index[index.patient_id == pid]["time_index"]) == list(range(len(gt)))
    # The out-of-order visit became time 0 while the stored reference grid (old baseline) was kept.
    s2 = store.sessions(p2)
    assert not np.allclose(s2[0].transform_to_reference, np.eye(4))
    assert np.allclose(s2[1].transform_to_reference, np.eye(4))
    gt2 = load_ground_truth(bids_copy, "002")["sessions"]
    arrays = store.arrays(p2)
    points = _brain_points(arrays)
    # Reference is ses-02 here: the true map reference -> ses-01 native is M_1 M_2^-1.
    est = points @ np.linalg.inv(np.asarray(s2[0].transform_to_reference)).T
    true = points @ (gt2[0]["motion"] @ np.linalg.inv(gt2[1]["motion"])).T
    assert np.linalg.norm(est[:, :3] - true[:, :3], axis=1).mean() < 0.75
