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


def test_scores_are_gap_normalised_absolute_or_signed_errors():
    args = dict(true_ml=[12.0, 8.0, 10.0], median_ml=[10.0, 10.0, 10.0], gap_days=[365.25, 0.0, 91.3125],
                offset_years=0.25)
    # (12-10)/(0.25+1) = 1.6, (8-10)/0.25 = -8, 0/(0.5) = 0 -> sorted
    cal = VolumeCalibration.fit("whole", **args)
    assert cal.form == "symmetric" and cal.scores == pytest.approx((0.0, 1.6, 8.0))
    assert cal.n == 3
    assert VolumeCalibration.fit("whole", **args, form="signed").scores == pytest.approx((-8.0, 0.0, 1.6))
    with pytest.raises(ValueError, match=">= 0"):
        VolumeCalibration("whole", (-1.0, 2.0))


def test_symmetric_quantiles_use_conservative_conformal_ranks():
    scores = np.arange(1, 100, dtype=float)  # n = 99: (n+1) p is an integer for both levels
    cal = VolumeCalibration("whole", tuple(scores), offset_years=1.0)
    q = cal.quantiles(median_ml=250.0, gap_days=365.25)  # scale = 2 -> volume = 250 -/+ 2 * score
    assert q["median"] == 250.0
    assert (q["lo80"], q["hi80"]) == (250 - 2 * 80.0, 250 + 2 * 80.0)  # ceil(100 * 0.80) = 80th smallest
    assert (q["lo95"], q["hi95"]) == (250 - 2 * 95.0, 250 + 2 * 95.0)  # ceil(100 * 0.95) = 95th
    assert cal.quantiles(median_ml=100.0, gap_days=365.25)["lo95"] == 0.0  # the lower end clipped at 0
    # The CRPS distribution: 2n equally likely volumes m -/+ scale * e, sorted, clipped at 0.
    s = cal.samples(100.0, 365.25)
    assert s.size == 198 and np.all(np.diff(s) >= 0) and s[-1] == 100 + 2 * 99 and s[0] == 0.0
    assert np.median(s) == pytest.approx(100.0)


def test_signed_quantiles_use_conservative_conformal_ranks():
    scores = np.arange(1, 100, dtype=float)  # n = 99: (n+1) p is an integer for every level
    cal = VolumeCalibration("whole", tuple(scores), offset_years=1.0, form="signed")
    q = cal.quantiles(median_ml=100.0, gap_days=0.0)  # scale = 1 -> volume = 100 + score
    assert q["lo95"] == 100 + 2.0   # floor(100 * 0.025) = 2nd smallest
    assert q["lo80"] == 100 + 10.0  # floor(100 * 0.10) = 10th
    assert q["hi80"] == 100 + 90.0  # ceil(100 * 0.90) = 90th
    assert q["hi95"] == 100 + 98.0  # ceil(100 * 0.975) = 98th
    assert q["median"] == 100 + 50.0


def test_calibrated_intervals_reach_nominal_coverage_on_exchangeable_data():
    """Errors of a biased, over-confident forecaster grow with the gap: fitted on 1000 validation targets
    (coverage then varies by about 0.013 between calibration sets at 80%), the intervals cover fresh targets at
    about the nominal rates (and the raw samples do not)."""
    rng = np.random.default_rng(0)

    def draw(n):
        gap = rng.uniform(20, 600, n)
        med = rng.uniform(5, 80, n)
        truth = med + (0.25 + gap / 365.25) * rng.normal(6.0, 4.0, n)  # biased: growth is under-forecast
        return gap, med, truth

    g, m, t = draw(1000)
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


@pytest.mark.parametrize("form", ["symmetric", "signed"])
def test_quantiles_are_ordered_and_never_negative(form):
    scores = (-50.0, -3.0, 0.0, 2.0, 9.0)
    cal = VolumeCalibration("whole", tuple(sorted(abs(s) for s in scores)) if form == "symmetric" else scores,
                            offset_years=0.25, form=form)
    for med in (0.0, 1.0, 30.0):
        for gap in (0.0, 100.0, 900.0):
            q = volume_quantiles([med], gap, cal)
            vals = [q[k] for k in LEVELS]
            assert vals == sorted(vals) and vals[0] >= 0.0


def test_symmetric_scores_survive_a_bias_that_flips_between_validation_and_test():
    """Few validation patients: the forecaster over-forecasts them (errors N(-5, 5) ml) and under-forecasts
    the test patients (N(+3, 5) ml). Signed scores shift the interval the wrong way (80% interval covers
    P(-11.4 < e < 1.4) = 0.37 of the test targets); absolute scores give |e| <= 9.3 ml, covering P(|e| < 9.3) = 0.89."""
    rng = np.random.default_rng(2)
    gap, med = np.full(4000, 45.0), np.full(4000, 30.0)
    truth_val = med + rng.normal(-5.0, 5.0, 4000)
    truth_test = med + rng.normal(3.0, 5.0, 4000)
    cover = {}
    for form in ("symmetric", "signed"):
        cal = VolumeCalibration.fit("whole", truth_val, med, gap, form=form)
        q = cal.quantiles(30.0, 45.0)
        cover[form] = float(np.mean((q["lo80"] <= truth_test) & (truth_test <= q["hi80"])))
    assert cover["signed"] == pytest.approx(0.37, abs=0.03)
    assert cover["symmetric"] == pytest.approx(0.89, abs=0.03)


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


def test_small_horizon_bins_merge_into_their_smaller_neighbour():
    # 30 targets in 0-90, 25 in 90-180, 5 in 180-365, 12 beyond: the 5 join the 12 (the smaller neighbour),
    # and the 17 left beyond 180 d join 90-180.
    gaps = np.concatenate([np.full(30, 45.0), np.full(25, 120.0), np.full(5, 200.0), np.full(12, 400.0)])
    cal = VolumeCalibration.fit("whole", gaps * 0 + 1.0, gaps * 0, gaps, edges_days=(90, 180, 365))
    assert cal.edges_days == (90.0,) and cal.bin_sizes() == [30, 42]
    cal = VolumeCalibration.fit("whole", gaps * 0 + 1.0, gaps * 0, gaps, edges_days=(90, 180, 365), min_per_bin=5)
    assert cal.edges_days == (90.0, 180.0, 365.0) and cal.bin_sizes() == [30, 25, 5, 12]
    few = VolumeCalibration.fit("whole", [1.0] * 10, [0.0] * 10, np.linspace(10, 500, 10), edges_days=(90, 180))
    assert few.edges_days == () and few.bin_sizes() == [10] and few.bin_scores == ()


def test_per_horizon_scores_cover_every_bin_where_pooled_scores_do_not():
    """Errors that do not grow like offset + gap (constant at short gaps, biased beyond a year): pooled
    scores miss the nominal rate in some bin, per-bin scores hold it in every bin."""
    rng = np.random.default_rng(1)
    edges = (90.0, 180.0, 365.0)

    def draw(n):
        gap = rng.uniform(10, 700, n)
        med = rng.uniform(10, 80, n)
        err = np.where(gap < 365, rng.normal(0.0, 6.0, n), rng.normal(-8.0, 3.0, n))
        return gap, med, med + err

    g, m, t = draw(600)
    binned = VolumeCalibration.fit("whole", t, m, g, edges_days=edges)
    pooled = VolumeCalibration.fit("whole", t, m, g)
    assert binned.edges_days == edges and min(binned.bin_sizes()) >= 20
    g2, m2, t2 = draw(4000)
    which = np.searchsorted(np.asarray(edges), g2, side="right")
    worst = {}
    for name, cal in (("binned", binned), ("pooled", pooled)):
        q = [cal.quantiles(mi, gi) for mi, gi in zip(m2, g2, strict=True)]
        c80 = np.array([a["lo80"] <= ti <= a["hi80"] for a, ti in zip(q, t2, strict=True)])
        c95 = np.array([a["lo95"] <= ti <= a["hi95"] for a, ti in zip(q, t2, strict=True)])
        worst[name] = max(max(abs(c80[which == i].mean() - 0.80), abs(c95[which == i].mean() - 0.95))
                          for i in range(4))
    # The tolerance (10 points of nominal in every bin); 60-300 scores per bin leave a few points of
    # finite-sample spread. Pooled scores are off by far more (0.47 here, at 0-90 days).
    assert worst["binned"] < 0.10
    assert worst["pooled"] > 0.25


def test_binned_calibration_round_trips_and_old_dicts_still_load():
    gaps = np.concatenate([np.full(25, 30.0), np.full(25, 300.0)])
    cal = VolumeCalibration.fit("whole", np.arange(50.0), np.zeros(50), gaps, edges_days=(90,))
    again = VolumeCalibration.from_dict(cal.to_dict())
    assert again == cal and again.scores_for(10.0) == cal.bin_scores[0] and again.scores_for(90.0) == cal.bin_scores[1]
    # Dicts written before the symmetric form (no "form" key, no bins) held signed scores.
    old = {"structure": "whole", "scores": [-1.0, 2.0], "offset_years": 0.5, "n_patients": 3}
    back = VolumeCalibration.from_dict(old)
    assert back.form == "signed" and back.scores_for(400.0) == (-1.0, 2.0)
    assert VolumeCalibration.from_dict({**old, "form": "signed"}) == back
    with pytest.raises(ValueError, match="bins"):
        VolumeCalibration("whole", (1.0, 2.0), edges_days=(90.0,), bin_scores=((1.0,),))


def test_scaled_scores_divide_by_difficulty_as_well():
    # gap 0.75 years -> horizon scale 1; c = 10 ml; |median - linear| = 10 and 0 ml -> difficulty 20 and 10.
    gap = 0.75 * 365.25
    cal = VolumeCalibration.fit("whole", true_ml=[70.0, 45.0], median_ml=[50.0, 50.0], gap_days=[gap, gap],
                                form="scaled", reference_ml=[40.0, 50.0], difficulty_ml=10.0)
    assert cal.form == "scaled" and cal.difficulty_ml == 10.0
    assert cal.scores == pytest.approx((0.5, 1.0))  # |45 - 50| / 10, |70 - 50| / 20
    # a query whose median is 30 ml from the linear forecast gets 4x the half-width of one where they agree
    near, far = cal.quantiles(100.0, gap, reference_ml=100.0), cal.quantiles(100.0, gap, reference_ml=130.0)
    assert near["hi80"] - 100.0 == pytest.approx(10.0 * 1.0)  # rank ceil(3 * 0.8) = 3 > n: the largest score
    assert far["hi80"] - 100.0 == pytest.approx(40.0 * 1.0) and far["lo80"] == pytest.approx(60.0)
    s = cal.samples(100.0, gap, reference_ml=130.0)
    assert s.tolist() == pytest.approx([60.0, 80.0, 120.0, 140.0])


def test_a_scaled_calibration_refuses_queries_without_the_linear_forecast():
    cal = VolumeCalibration.fit("whole", [60.0], [50.0], [100.0], form="scaled", reference_ml=[50.0])
    assert cal.needs_reference
    with pytest.raises(ValueError, match="reference_ml"):
        cal.quantiles(50.0, 100.0)
    with pytest.raises(ValueError, match="reference_ml"):
        volume_quantiles([50.0, 51.0], 100.0, cal)
    with pytest.raises(ValueError, match="finite"):
        cal.quantiles(50.0, 100.0, reference_ml=float("nan"))
    with pytest.raises(ValueError, match="needs reference_ml"):
        VolumeCalibration.fit("whole", [60.0], [50.0], [100.0], form="scaled")
    with pytest.raises(ValueError, match="need 1 reference"):
        VolumeCalibration.fit("whole", [60.0], [50.0], [100.0], form="scaled", reference_ml=[1.0, 2.0])
    with pytest.raises(ValueError, match="difficulty_ml > 0"):
        VolumeCalibration("whole", (1.0,), form="scaled", difficulty_ml=0.0)
    with pytest.raises(ValueError, match="form must be one of"):
        VolumeCalibration.fit("whole", [60.0], [50.0], [100.0], form="banana")
    # symmetric calibrations never needed it and still do not
    assert not VolumeCalibration.fit("whole", [60.0], [50.0], [100.0]).needs_reference


def test_scaled_form_round_trips_through_checkpoint_meta():
    rng = np.random.default_rng(2)
    g = rng.uniform(10, 600, 80)
    cal = VolumeCalibration.fit("whole", rng.uniform(5, 90, 80), rng.uniform(5, 90, 80), g, n_patients=9,
                                edges_days=(90, 180, 365), form="scaled", reference_ml=rng.uniform(5, 90, 80),
                                difficulty_ml=7.5)
    back = calibrations_from_meta({"volume_calibration": calibrations_to_meta({"whole": cal})})["whole"]
    assert back == cal
    assert "difficulty-scaled scores, c = 7.5 ml" in back.method()


def test_scaled_scores_cover_hard_and_easy_queries_alike():
    """Errors whose spread grows with |median - linear| (fast growers, where model and extrapolation
    disagree): the symmetric form's one width over-covers the easy half and under-covers the hard half, the
    scaled form covers both near nominal. Known noise: error ~ N(0, (10 + d)^2) ml with d the disagreement."""
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, ...]:
        d = np.where(rng.random(n) < 0.5, 0.0, 60.0)  # half easy (agree), half hard (disagree by 60 ml)
        m = rng.uniform(250, 300, n)  # large enough that no interval or truth reaches 0 ml
        gap = np.full(n, 0.75 * 365.25)  # horizon scale 1
        return m + rng.normal(0, 10 + d), m, gap, m + d * rng.choice([-1, 1], n), d

    cal_args, test = draw(4000), draw(4000)
    t, m, gap, ref, d = test
    cover = {}
    for form in ("symmetric", "scaled"):
        cal = VolumeCalibration.fit("whole", *cal_args[:3], form=form,
                                    reference_ml=cal_args[3] if form == "scaled" else None)
        q = [cal.quantiles(mi, gi, ri) for mi, gi, ri in zip(m, gap, ref, strict=True)]
        inside = np.array([qi["lo80"] <= ti <= qi["hi80"] for qi, ti in zip(q, t, strict=True)])
        cover[form] = (inside[d == 0].mean(), inside[d > 0].mean())
    easy, hard = cover["symmetric"]
    assert easy > 0.97 and hard < 0.72  # one width for all: wrong for both halves
    easy, hard = cover["scaled"]
    assert abs(easy - 0.80) < 0.04 and abs(hard - 0.80) < 0.04  # ~2000 targets a half: sd ~0.01


def test_every_end_is_capped_at_the_largest_volume_the_model_can_forecast():
    cal = VolumeCalibration.fit("whole", [500.0] * 30, [50.0] * 30, np.linspace(10, 80, 30), form="scaled",
                                reference_ml=[50.0] * 30)
    free = volume_quantiles([50.0, 52.0], 60.0, cal, reference_ml=200.0)
    capped = volume_quantiles([50.0, 52.0], 60.0, cal, reference_ml=200.0, max_ml=262.144)
    assert free["hi95"] > 1000.0  # a far-off linear forecast times a large score
    assert capped["hi95"] == capped["hi80"] == 262.144 and capped["median"] == free["median"] == 51.0
    assert capped["lo95"] <= capped["lo80"] <= capped["median"] <= capped["hi80"] <= capped["hi95"]
