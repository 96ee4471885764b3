"""The served model (what the pyfunc runs) puts a difficulty-scaled calibration's intervals around the median with
the linear baseline's forecast of the same query, caps them at the crop volume, and names its params as the CLI
does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from trackinghelpers import baseline_checkpoint, write_native_series

from longitudinal.models.calibration import VolumeCalibration, calibrations_to_meta
from longitudinal.settings import Settings
from longitudinal.tracking.served import ServedForecaster


def test_scaled_intervals_use_the_linear_forecast_of_the_query(tmp_path: Path) -> None:
    frame, _ = write_native_series(tmp_path / "scans", radii_mm=(5.0, 6.5, 8.0), shift_mm=0.0)
    settings = Settings(home=tmp_path / "home")
    params = {"days_since_baseline": [200.0, 400.0], "n_samples": 1}
    lin = ServedForecaster(baseline_checkpoint(tmp_path / "lin.pt", "linear", crop=16)).predict(frame, params, settings)
    # an untrained np checkpoint carrying a scaled calibration: every score 0.4 per year, c = 10 ml
    ckpt = baseline_checkpoint(tmp_path / "np.pt", "np", crop=16)
    gaps = np.linspace(30, 600, 30)
    cal = VolumeCalibration.fit("whole", np.full(30, 50.0) + 4.0 * (0.25 + gaps / 365.25), np.full(30, 50.0), gaps,
                                form="scaled", reference_ml=np.full(30, 50.0), difficulty_ml=10.0)
    data = torch.load(ckpt, weights_only=False)
    data["meta"]["volume_calibration"] = calibrations_to_meta({"whole": cal})
    torch.save(data, ckpt)
    out = ServedForecaster(ckpt).predict(frame, {**params, "n_samples": 4}, settings)
    last = float(frame["days"].max())
    for (_, row), (_, ref) in zip(out.iterrows(), lin.iterrows(), strict=True):
        m, v_lin = row["volume_whole_ml_median"], ref["volume_whole_ml_median"]
        half = (0.25 + (row["days_since_baseline"] - last) / 365.25) * (10.0 + abs(m - v_lin)) * 0.4
        assert row["volume_whole_ml_hi80"] - m == pytest.approx(half)
        assert row["volume_whole_ml_lo80"] == pytest.approx(max(m - half, 0.0))


def test_intervals_never_pass_the_crop_volume(tmp_path: Path) -> None:
    """Scores far above any error would put the upper ends at thousands of ml; the model's 16^3 crop at 2 mm
    holds 32.768 ml, and no end may pass it (the median and lower ends are the model's)."""
    frame, _ = write_native_series(tmp_path / "scans", shift_mm=0.0)
    ckpt = baseline_checkpoint(tmp_path / "np.pt", "np", crop=16)
    gaps = np.linspace(30, 600, 30)
    cal = VolumeCalibration.fit("whole", np.full(30, 5000.0), np.full(30, 50.0), gaps, form="scaled",
                                reference_ml=np.full(30, 50.0))
    data = torch.load(ckpt, weights_only=False)
    data["meta"]["volume_calibration"] = calibrations_to_meta({"whole": cal})
    torch.save(data, ckpt)
    out = ServedForecaster(ckpt).predict(frame, {"days_since_baseline": [200.0, 400.0], "n_samples": 4},
                                         Settings(home=tmp_path / "home"))
    crop_ml = 16**3 * 2.0**3 / 1000.0
    assert out["volume_whole_ml_hi95"].tolist() == pytest.approx([crop_ml] * 2)
    assert out["volume_whole_ml_hi80"].tolist() == pytest.approx([crop_ml] * 2)


def test_params_name_the_queries_as_the_cli_does(tmp_path: Path) -> None:
    frame, _ = write_native_series(tmp_path / "scans", shift_mm=0.0)
    served = ServedForecaster(baseline_checkpoint(tmp_path / "lin.pt", "linear", crop=16))
    settings = Settings(home=tmp_path / "home")
    with pytest.raises(ValueError, match="'query_days' is gone"):
        served.predict(frame, {"query_days": [90.0]}, settings)
    with pytest.raises(ValueError, match="no query"):
        served.predict(frame, {}, settings)
    with pytest.raises(ValueError, match="'at' and 'plan' dates need a 'date' column"):
        served.predict(frame, {"at": ["2024-05-01"]}, settings)
    out = served.predict(frame, {"in_days": [30.0], "days_since_baseline": [150.0]}, settings)
    assert out["days_since_baseline"].tolist() == [150.0] and out["days_after_last_scan"].tolist() == [30.0]
