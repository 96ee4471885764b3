"""How one patient is encoded as a Zarr v3 group (arrays, chunking, codecs, attributes, commit marker).

:mod:`storage._commit` writes it under ``.staging/`` (step 1 of the commit) before swapping it into place.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from storage._records import (
    CHECKSUM_DEFINITION,
    TISSUE_CHECKSUM_DEFINITION,
    TREATMENTS_CHECKSUM_DEFINITION,
    data_checksum,
    json_safe,
    reference_nifti,
    tissue_checksum,
    treatments_attr,
    treatments_checksum,
)
from storage.schema import (
    IMAGE_CHUNKS,
    IMAGE_DIMS,
    LABEL_CHUNKS,
    LABEL_DIMS,
    LABEL_VALUES,
    SCHEMA_VERSION,
    TIME_DIMS,
    TISSUE_CHANNELS,
    TISSUE_CHUNKS,
    TISSUE_DIMS,
    TISSUE_DTYPE,
    PatientRecord,
)

ZSTD_LEVEL = 3


def write_patient_group(zarr_store: Any, record: PatientRecord, uid: str) -> str:
    """Write ``record`` as a complete patient group into ``zarr_store`` (replacing what is there); returns
    the data checksum (see CHECKSUM_DEFINITION).

    Chunks: one time point and channel per chunk, spatial chunks of at most IMAGE_CHUNKS voxels, zstd. The
    group attribute ``commit`` (generation ``uid``, data and treatments checksums, staging time in Unix
    seconds) is written last. Treatment events go to the attribute ``treatments`` (plain JSON, stored order).
    Tissue maps, when the record has them, go to the array ``tissue`` (TISSUE_DTYPE) with their own checksum
    ``tissue_sha256`` in ``commit``, so a patient without them keeps exactly the attributes it had before.
    """
    import zarr
    from zarr.codecs import ZstdCodec

    image = np.asarray(record.image, dtype=np.float32)
    label = np.asarray(record.label, dtype=np.uint8)
    days = np.asarray(record.days, dtype=np.float64)
    t, c, z, y, x = image.shape
    group = zarr.open_group(zarr_store, mode="w", zarr_format=3)
    img = group.create_array(
        "image",
        shape=image.shape,
        dtype="float32",
        # Never larger than the grid: a 64^3 chunk on a 32^3 grid would only store padding.
        chunks=(1, 1, *(min(a, b) for a, b in zip(IMAGE_CHUNKS[2:], (z, y, x), strict=True))),
        compressors=ZstdCodec(level=ZSTD_LEVEL),
        fill_value=0.0,
        dimension_names=IMAGE_DIMS,
        attributes={
            "long_name": "image intensity (normalised per channel)",
            "channels": list(record.channels),
        },
    )
    lab = group.create_array(
        "label",
        shape=label.shape,
        dtype="uint8",
        chunks=(1, *(min(a, b) for a, b in zip(LABEL_CHUNKS[1:], (z, y, x), strict=True))),
        compressors=ZstdCodec(level=ZSTD_LEVEL),
        fill_value=0,
        dimension_names=LABEL_DIMS,
        attributes={
            "long_name": "tumour label",
            "flag_values": {str(k): v for k, v in LABEL_VALUES.items()},
        },
    )
    tim = group.create_array(
        "time",
        shape=days.shape,
        dtype="float64",
        chunks=(max(t, 1),),
        compressors=None,
        fill_value=0.0,
        dimension_names=TIME_DIMS,
        # No CF "units" on purpose: xarray would decode "days" into timedelta64.
        attributes={"long_name": "days since the patient's baseline scan", "unit_name": "day"},
    )
    for i in range(t):
        img[i] = image[i]
        lab[i] = label[i]
    tim[:] = days
    extra_commit = _write_tissue(group, record.tissue, (z, y, x))
    checksum = data_checksum(image, label, days)
    sessions = list(record.sessions)
    treatments = treatments_attr(list(record.treatments))
    # One metadata write for all attributes (attrs.update would rewrite zarr.json once per key).
    group.update_attributes(
        {
            "schema_version": SCHEMA_VERSION,
            "patient_id": record.patient_id,
            "channels": list(record.channels),
            "spacing_mm": [float(v) for v in record.spacing_mm],
            "reference_affine": np.asarray(record.reference_affine, dtype=float).tolist(),
            "reference_nifti": reference_nifti(record.reference_affine, (z, y, x), record.spacing_mm),
            "days": [float(d) for d in days],
            "acquisition_dates": [s.shifted_date for s in sessions],
            "sessions": [json_safe(s.to_dict()) for s in sessions],
            "treatments": treatments,
            # Written last: the staged group is complete once this attribute exists.
            "commit": {
                "generation": uid,
                "data_sha256": checksum,
                "checksum_definition": CHECKSUM_DEFINITION,
                "treatments_sha256": treatments_checksum(treatments),
                "treatments_checksum_definition": TREATMENTS_CHECKSUM_DEFINITION,
                "committed_at": datetime.now(UTC).isoformat(timespec="seconds"),
                # Orders generations when recovery finds an abandoned commit (see _finish_commit).
                "staged_unix": time.time(),
                **extra_commit,
            },
        }
    )
    return checksum


def _write_tissue(group: Any, tissue: np.ndarray | None, grid: tuple[int, int, int]) -> dict[str, str]:
    """The array ``tissue`` (2, Z, Y, X) when given; returns its entries of the ``commit`` attribute."""
    if tissue is None:
        return {}
    from zarr.codecs import ZstdCodec

    data = np.asarray(tissue).astype(TISSUE_DTYPE)
    arr = group.create_array(
        "tissue",
        shape=data.shape,
        dtype=TISSUE_DTYPE,
        chunks=(1, *(min(a, b) for a, b in zip(TISSUE_CHUNKS[1:], grid, strict=True))),
        compressors=ZstdCodec(level=ZSTD_LEVEL),
        fill_value=0.0,
        dimension_names=TISSUE_DIMS,
        attributes={"long_name": "tissue probability", "channels": list(TISSUE_CHANNELS)},
    )
    arr[...] = data
    return {"tissue_sha256": tissue_checksum(data), "tissue_checksum_definition": TISSUE_CHECKSUM_DEFINITION}
