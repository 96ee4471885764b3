"""The adaptive field of view: the crop's stride, block pooling, and a tumour larger than the fixed 262 ml crop
forecast at its own size through the one Predictor."""

from __future__ import annotations

import numpy as np
import pytest

from longitudinal.data.context import CropBox, PatientSeries, fov_stride, pool_box, read_box
from longitudinal.data.phantoms import sphere_patient
from longitudinal.models.base import build_model
from longitudinal.models.checkpoint import DataSettings
from longitudinal.predict import Predictor


def test_stride_is_the_smallest_that_holds_tumour_and_margin() -> None:
    size, sp = (32, 32, 32), (2.0, 2.0, 2.0)
    small = ((10, 10, 10), (26, 26, 26))  # 16 voxels = 32 mm + 2 x 16 mm margin = 64 mm: fits at stride 1
    assert fov_stride([small], size, sp, 16.0) == 1
    wide = ((0, 10, 10), (17, 26, 26))  # 17 voxels + 16 margin voxels = 33 > 32
    assert fov_stride([wide], size, sp, 16.0) == 2
    assert fov_stride([None, None], size, sp, 16.0) == 1
    huge = ((0, 0, 0), (200, 10, 10))
    assert fov_stride([huge], size, sp, 16.0) == 4  # capped
    # Anisotropic spacing: the margin is in mm, so fewer voxels along the coarse axis.
    assert fov_stride([((0, 0, 0), (20, 4, 4))], (32, 32, 32), (4.0, 1.0, 1.0), 8.0) == 1  # z 20 + 4, y 4 + 16
    assert fov_stride([((0, 0, 0), (30, 4, 4))], (32, 32, 32), (4.0, 1.0, 1.0), 8.0) == 2  # z 30 + 4


def test_pooling_keeps_means_and_the_whole_tumour() -> None:
    box = CropBox((0, 0, 0), (2, 2, 2), stride=2)
    img = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    pooled = pool_box(img, box)
    assert pooled.shape == (2, 2, 2)
    assert pooled[0, 0, 0] == pytest.approx(img[:2, :2, :2].mean())
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[:2, :2, :2].flat[:2] = 1  # 2 of 8 oedema: background
    lab[2:, :2, :2].flat[:3] = 1  # 3 oedema + 2 enhancing = 5 of 8 tumour, 2 < 3 enhancing: oedema
    lab[2:, :2, :2].flat[3:5] = 2
    lab[:2, 2:, :2].flat[:2] = 1  # 2 oedema + 2 enhancing: 4 of 8 tumour (half counts), enhancing ties up
    lab[:2, 2:, :2].flat[2:4] = 2
    out = pool_box(lab, box, labels=True)
    assert out[0, 0, 0] == 0 and out[1, 0, 0] == 1 and out[0, 1, 0] == 2
    assert out.dtype == np.uint8
    # Upsampling repeats each crop voxel over its block, onto the store voxels the box covers.
    np.testing.assert_array_equal(box.upsample(out)[2:, :2, :2], np.ones((2, 2, 2)))
    assert box.extent == (4, 4, 4) and box.spacing_mm((2.0, 2.0, 2.0)) == (4.0, 4.0, 4.0)
    assert box.volume_ml((2.0, 2.0, 2.0)) == pytest.approx(8 * 0.064)


def test_read_box_pads_outside_the_array() -> None:
    arr = np.ones((1, 6, 6, 6), np.float32)
    box = CropBox((-2, 0, 0), (2, 2, 2), stride=2)  # the first crop voxel along z lies before the array
    out = read_box(arr, (0,), box)
    assert out.shape == (2, 2, 2) and (out[0] == 0).all() and (out[1] == 1).all()


@pytest.mark.parametrize("kind", ["lci", "linear"])
def test_a_tumour_larger_than_the_fixed_crop_is_forecast_above_it(kind: str) -> None:
    arrays = sphere_patient([38.0, 41.0, 43.0], [0.0, 60.0, 120.0])
    truth_ml = float((arrays.label[-1] > 0).sum()) * 0.008
    assert truth_ml > 300.0
    series = PatientSeries(arrays)
    fixed = Predictor(build_model(kind), (32, 32, 32), DataSettings(fov="fixed"), device="cpu")
    adaptive = Predictor(build_model(kind), (32, 32, 32), DataSettings(fov="adaptive"), device="cpu")
    q_fixed = fixed.predict(series, [200.0]).queries[0]
    q = adaptive.predict(series, [200.0]).queries[0]
    assert q_fixed.max_ml == pytest.approx(262.144) and q_fixed.whole.median <= 262.144
    assert not q_fixed.field_of_view.ok
    assert q.crop.stride == 2 and q.field_of_view.ok, q.field_of_view.warnings()
    assert q.whole.median > 262.144
    if kind == "lci":  # the last scan's tumour, pooled onto 4 mm voxels: its volume within 5%
        assert q.whole.median == pytest.approx(truth_ml, rel=0.05)
    else:  # still growing: more than the last scan
        assert q.whole.median > truth_ml
