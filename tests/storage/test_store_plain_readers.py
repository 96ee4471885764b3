"""The store is readable by the ecosystem without our code: xarray, zarr, pandas, nibabel only."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from storerecords import make_record

from storage.store import CohortStore


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "cohort.zarr"
    store = CohortStore.open(path, create=True, created_by="tests")
    records = [make_record("p001"), make_record("p002", days=(0.0, 61.25), seed=4)]
    for rec in records:
        store.write_patient(rec)
    return str(path), records


def test_xarray_labels_dims_and_time_in_days(written):
    path, (rec, _) = written
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented call is warning-free
        ds = xr.open_zarr(path, group="patients/p001", consolidated=False)
    assert ds["image"].dims == ("time", "channel", "z", "y", "x")
    assert ds["label"].dims == ("time", "z", "y", "x")
    assert "time" in ds.coords and ds["time"].dtype == np.float64
    np.testing.assert_array_equal(ds["time"].values, [0.0, 45.5, 120.0])
    assert ds["image"].dtype == np.float32 and ds["label"].dtype == np.uint8
    # Exact zeros survive: the zarr fill value is not used as a missing-value mask.
    np.testing.assert_array_equal(ds["image"].values, rec.image)
    np.testing.assert_array_equal(ds["label"].values, rec.label)
    assert ds.attrs["channels"] == ["T1c", "FLAIR"]
    assert ds.sel(time=45.5)["image"].shape == (2, *rec.image.shape[2:])


def test_xarray_default_consolidated_still_opens(written):
    path, _ = written
    # No consolidated metadata on purpose (see storage.store docstring): xarray falls back with a warning.
    with pytest.warns(RuntimeWarning, match="consolidated"):
        ds = xr.open_zarr(path, group="patients/p002")
    np.testing.assert_array_equal(ds["time"].values, [0.0, 61.25])


def test_zarr_sees_dimension_names_and_attrs(written):
    path, (rec, _) = written
    root = zarr.open_group(path, mode="r")
    assert root.attrs["schema_version"] == 2 and root.attrs["created_by"] == "tests"
    image = zarr.open_array(path, path="patients/p001/image", mode="r")
    assert image.metadata.dimension_names == ("time", "channel", "z", "y", "x")
    np.testing.assert_array_equal(image[1], rec.image[1])
    group = zarr.open_group(path, path="patients/p001", mode="r")
    assert group.attrs["commit"]["data_sha256"]


def test_pandas_reads_the_whole_index(written):
    path, _ = written
    df = pd.read_parquet(f"{path}/index")
    assert len(df) == 5
    assert sorted(df["patient_id"].unique()) == ["p001", "p002"]
    assert sorted(df.loc[df.patient_id == "p002", "days"]) == [0.0, 61.25]


def test_reference_grid_writes_as_nifti(written, tmp_path):
    path, (rec, _) = written
    attrs = zarr.open_group(path, path="patients/p001", mode="r").attrs
    hdr = attrs["reference_nifti"]
    vol = np.asarray(zarr.open_array(path, path="patients/p001/image", mode="r")[0, 0]).T  # (x, y, z)
    img = nib.Nifti1Image(vol, np.asarray(hdr["affine"]))
    nib.save(img, tmp_path / "t0.nii.gz")
    back = nib.load(tmp_path / "t0.nii.gz")
    assert list(back.shape) == hdr["shape_xyz"]
    np.testing.assert_allclose(back.header.get_zooms(), hdr["pixdim_mm_xyz"])
    np.testing.assert_array_equal(np.asarray(back.dataobj), rec.image[0, 0].T)
