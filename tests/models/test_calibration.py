"""Volume-interval calibration: conformal ranks, coverage on exchangeable data, ordering, round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from longitudinal.models.calibration import (
    LEVELS,
    VolumeCalibration,
    calibrations_from_meta,
    calibrations_to_meta,
    volume_quantiles,
)


def test_scores_are_gap_normalised_signed_errors():
    cal = VolumeCalibration.fit("whole", true_ml=[12.0, 8.0, 10.0], median_ml=[10.0, 10.0, 10.0],
                                gap_days=[365.25, 0.0, 91.3125], offset_years=0.25)
    # (12-10)/(0.25+1) = 1.6, (8-10)/0.25 = -8, 0/(0.5) = 0 -> sorted
    assert cal.scores == pytest.approx((-8.0, 0.0, 1.6))
    assert cal.n == 3


def test_quantiles_use_conservative_conformal_ranks():
    scores = np.arange(1, 100, dtype=float)  # n = 99: (n+1) p is an integer for every level
    cal = VolumeCalibration("whole", tuple(scores), offset_years=1.0)
    q = cal.quantiles(median_ml=100.0, gap_days=0.0)  # scale = 1 -> volume = 100 + score
    assert q["lo95"] == 100 + 2.0   # floor(100 * 0.025) = 2nd smallest
    assert q["lo80"] == 100 + 10.0  # floor(100 * 0.10) = 10th
    assert q["hi80"] == 100 + 90.0  # ceil(100 * 0.90) = 90th
    assert q["hi95"] == 100 + 98.0  # ceil(100 * 0.975) = 98th
    assert q["median"] == 100 + 50.0


def test_calibrated_intervals_reach_nominal_coverage_on_exchangeable_data():
    """Errors of a biased, over-confident forecaster grow with the gap: fitted on 300 validation targets, the
    intervals cover fresh targets at about the nominal rates (and the raw samples do not)."""
    rng = np.random.default_rng(0)

    def draw(n):
        gap = rng.uniform(20, 600, n)
        med = rng.uniform(5, 80, n)
        truth = med + (0.25 + gap / 365.25) * rng.normal(6.0, 4.0, n)  # biased: growth is under-forecast
        return gap, med, truth

    g, m, t = draw(300)
    cal = VolumeCalibration.fit("whole", t, m, g)
    g2, m2, t2 = draw(3000)
    cov = {80: [], 95: [], "raw80": []}
    for gi, mi, ti in zip(g2, m2, t2, strict=True):
        samples = mi + rng.normal(0, 0.5, 8)  # over-confident raw samples
        q = volume_quantiles(samples, gi, cal)
        cov[80].append(q["lo80"] <= ti <= q["hi80"])
        cov[95].append(q["lo95"] <= ti <= q["hi95"])
        r = volume_quantiles(samples, gi, None)
        cov["raw80"].append(r["lo80"] <= ti <= r["hi80"])
    assert abs(np.mean(cov[80]) - 0.80) < 0.04
    assert abs(np.mean(cov[95]) - 0.95) < 0.03
    assert np.mean(cov["raw80"]) < 0.2


def test_quantiles_are_ordered_and_never_negative():
    cal = VolumeCalibration("whole", (-50.0, -3.0, 0.0, 2.0, 9.0), offset_years=0.25)
    for med in (0.0, 1.0, 30.0):
        for gap in (0.0, 100.0, 900.0):
            q = volume_quantiles([med], gap, cal)
            vals = [q[k] for k in LEVELS]
            assert vals == sorted(vals) and vals[0] >= 0.0


def test_raw_quantiles_match_numpy():
    x = np.random.default_rng(1).gamma(3.0, 5.0, 64)
    q = volume_quantiles(x)
    for k, p in LEVELS.items():
        assert q[k] == pytest.approx(float(np.quantile(x, p)))


def test_meta_round_trip_and_bad_input():
    cals = {"whole": VolumeCalibration("whole", (1.0, 2.0), 0.5, 3)}
    back = calibrations_from_meta({"volume_calibration": calibrations_to_meta(cals)})
    assert back == cals
    assert calibrations_from_meta({}) == {}
    with pytest.raises(ValueError) as err:
        VolumeCalibration("tumour", (math.nan,), offset_years=0.0)
    assert "structure" in str(err.value) and "finite" in str(err.value) and "offset_years" in str(err.value)
    with pytest.raises(ValueError):
        volume_quantiles([])
