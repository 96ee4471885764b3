"""Tissue maps from the MNI152 templates shipped in nilearn: registered to a moved head they land on that head's
own white and grey matter, a scan that is no head is refused rather than given tissue, and ``attach_tissue``
keeps what is committed, registers what is new and never stops an ingest."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from longitudinal.data.phantoms import phantom_record
from longitudinal.registration.tissue import TissueError, attach_tissue, register_tissue, templates
from longitudinal.synth.anatomy import load_anatomy
from longitudinal.synth.motion import apply_motion, rigid_matrix
from storage.schema import PatientRecord


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


@pytest.fixture(scope="module")
def moved_head() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 2 mm MNI152 head turned by 6 degrees and shifted by 7 mm: (image, white, grey), each (Z, Y, X) as the
    store holds them, and the grid's affine."""
    anatomy = load_anatomy(2.0)
    centre = (anatomy.affine @ np.array([*(np.array(anatomy.shape) - 1) / 2.0, 1.0]))[:3]
    motion = rigid_matrix((6.0, -4.0, 3.0), (7.0, -5.0, 4.0), centre)
    image, white, grey = (apply_motion(m, anatomy.affine, motion, order=1).T
                          for m in (anatomy.t1, anatomy.wm, anatomy.gm))
    return image, np.stack([white, grey]), anatomy.affine


def test_the_templates_land_on_the_moved_heads_tissue(moved_head) -> None:
    image, truth, affine = moved_head
    templates()  # read once per process (about 0.2-0.6 s), not part of the per-patient time
    t0 = time.perf_counter()
    maps = register_tissue(image, (2.0, 2.0, 2.0), affine)
    seconds = time.perf_counter() - t0
    assert maps.shape == (2, *image.shape) and maps.dtype == np.float32
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    # Measured 0.96-0.98 for white and grey matter, 0.99 for the parenchyma (white + grey >= 0.3).
    assert _dice(maps[0] > 0.5, truth[0] > 0.5) > 0.93
    assert _dice(maps[1] > 0.5, truth[1] > 0.5) > 0.93
    assert _dice(maps.sum(0) >= 0.3, truth.sum(0) >= 0.3) > 0.97
    assert float(np.abs(maps - truth).mean()) < 0.02
    assert seconds < 10.0  # about 0.7 s on 2 idle cores; generous for a shared machine


def test_a_scan_that_is_no_head_is_refused() -> None:
    rec = phantom_record("p1", [0.0], [(15.5, 15.5, 15.5)], [5.0], grid=(32, 32, 32))
    with pytest.raises(TissueError, match="implausible"):
        register_tissue(rec.image[0, 0], rec.spacing_mm, rec.reference_affine)
    with pytest.raises(TissueError):
        register_tissue(np.ones((3, 3)), (2.0, 2.0, 2.0), np.eye(4))


def _record(image: np.ndarray, affine: np.ndarray) -> PatientRecord:
    rec = phantom_record("p1", [0.0, 30.0], [(15.5, 15.5, 15.5)] * 2, [5.0, 6.0], grid=(32, 32, 32))
    stack = np.stack([image, image]).astype(np.float32)
    return dataclasses.replace(rec, image=np.stack([stack, stack], axis=1), label=np.zeros((2, *image.shape), np.uint8),
                               reference_affine=affine)


def test_attach_tissue_registers_new_patients_and_keeps_committed_maps(moved_head) -> None:
    image, _, affine = moved_head
    record = _record(image, affine)
    attached = attach_tissue(record)
    assert attached is not None and attached.tissue is not None and attached.tissue.shape == (2, *image.shape)
    kept = np.full_like(attached.tissue, 0.25)
    # An append on the same grid keeps the committed maps (no registration).
    again = attach_tissue(record, dataclasses.replace(record, tissue=kept))
    assert again is not None and again.tissue is kept
    assert attach_tissue(None) is None
    # A scan that is no head: the patient is stored without tissue, never refused.
    phantom = phantom_record("p2", [0.0], [(15.5, 15.5, 15.5)], [5.0], grid=(32, 32, 32))
    assert attach_tissue(phantom).tissue is None
