"""forecast_patient on a really ingested cohort with a registered champion: native space, JSON, plot, known
answers of the linear baseline, calendars, and the interval ordering."""

from __future__ import annotations

import datetime as dt
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from forecasthelpers import Cohort, world_centroid

from longitudinal.forecast import QUANTILE_LEVELS, ForecastRequest, Queries, VolumeInterval, forecast_patient
from longitudinal.models.base import Forecast
from longitudinal.predict import sample_volumes_ml


@pytest.fixture(scope="module")
def result(cohort: Cohort):  # noqa: ANN201
    return forecast_patient(cohort.settings, ForecastRequest(cohort.pids["sub-01"], Queries(in_days=(30, 180, 365)), store_url=cohort.store, n_samples=8))


def test_outputs_are_in_the_native_space_of_the_latest_scan(cohort: Cohort, result) -> None:  # noqa: ANN001
    latest = cohort.patients["sub-01"].latest
    native = nib.load(str(latest["T1c"]))
    assert native.shape == (36, 32, 32) and native.affine[0, 0] < 0  # the latest scan is flipped and padded
    assert result.model == "tumor-growth-forecaster@champion" and result.version == cohort.version
    assert result.native.shape == native.shape
    for q in result.queries:
        assert sorted(q.files) == ["forecast_FLAIR", "forecast_T1c", "prob_enhancing", "prob_whole"]
        for path in q.files.values():
            img = nib.load(path)
            assert img.shape == native.shape
            np.testing.assert_array_equal(img.affine, native.affine)
    # The registration was inverted, not just the header copied: the forecast tumour sits where the latest
    # scan's tumour is in physical space (concentric growth), to a fraction of a 2 mm voxel.
    truth = world_centroid(latest["label"], 0.5)
    for q in result.queries:
        assert np.linalg.norm(world_centroid(q.files["prob_whole"]) - truth) < 1.0
        assert np.linalg.norm(world_centroid(q.files["prob_enhancing"]) - truth) < 1.0
    # The forecast image carries the tumour too: brighter FLAIR inside the forecast tumour than outside it.
    flair = np.asarray(nib.load(result.queries[-1].files["forecast_FLAIR"]).dataobj)
    prob = np.asarray(nib.load(result.queries[-1].files["prob_whole"]).dataobj)
    brain = flair > 0.05
    assert flair[prob > 0.5].mean() > flair[brain & (prob < 0.01)].mean() + 0.3


def test_json_summary_and_plot(result) -> None:  # noqa: ANN001
    body = json.loads(result.summary_path.read_text())
    assert {"patient", "model", "version", "queries"} <= set(body)
    assert body["patient"] == result.patient and body["version"] == result.version
    assert [round(q["days_after_last_scan"], 6) for q in body["queries"]] == [30.0, 180.0, 365.0]
    for q in body["queries"]:
        assert {"days", "date", "volume_whole_ml", "volume_enhancing_ml"} <= set(q)
        for kind in ("volume_whole_ml", "volume_enhancing_ml"):
            v = q[kind]
            assert set(v) == {"median", "lo80", "hi80", "lo95", "hi95"}
            assert v["lo95"] <= v["lo80"] <= v["median"] <= v["hi80"] <= v["hi95"]
    # Pseudonym given: dates are in the store's shifted calendar, never the real one.
    assert {q["calendar"] for q in body["queries"]} == {"shifted"}
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.plot_path.stat().st_size > 10_000


def test_linear_champion_known_answers_and_growth(cohort: Cohort, result) -> None:  # noqa: ANN001
    obs = result.observed
    assert [o.days for o in obs] == cohort.patients["sub-01"].days
    v = [o.volume_whole_ml for o in obs]
    assert v[0] < v[1] < v[2]
    medians = [q.volume_whole_ml.median for q in result.queries]
    assert v[-1] < medians[0] < medians[1] < medians[2]  # a growing tumour keeps growing, more with the gap
    enh = [q.volume_enhancing_ml.median for q in result.queries]
    assert enh[0] < enh[1] < enh[2]
    for q in result.queries:
        # linear: volume extrapolated from the last two scans (voxel counts inside the 32^3 crop)
        expected = v[-1] + (v[-1] - v[-2]) * (q.days - obs[-1].days) / (obs[-1].days - obs[-2].days)
        assert q.volume_whole_ml.median == pytest.approx(expected, rel=0.01, abs=0.01)
        assert q.n_context == 3


def test_dates_map_through_the_patient_calendar(cohort: Cohort) -> None:
    s = cohort.settings
    # Raw id (the site holds the key): --at is a real date; 2024-11-15 is 100 days after the latest real scan.
    r = forecast_patient(s, ForecastRequest("sub-01", Queries(at=("2024-11-15",)), store_url=cohort.store, model_ref=str(cohort.checkpoint), n_samples=1, write=False))
    q = r.queries[0]
    assert r.patient == cohort.pids["sub-01"]
    assert (q.days_after_last_scan, q.date, q.calendar) == (100.0, "2024-11-15", "real")
    assert q.days == cohort.patients["sub-01"].days[-1] + 100
    assert [o.date for o in r.observed] == cohort.patients["sub-01"].dates
    # Pseudonym: --at is read in the shifted calendar the store keeps.
    from storage.store import CohortStore

    last = dt.datetime.fromisoformat(CohortStore.open(cohort.store).sessions(cohort.pids["sub-01"])[-1].shifted_date)
    shifted = (last.date() + dt.timedelta(days=100)).isoformat()
    r2 = forecast_patient(s, ForecastRequest(cohort.pids["sub-01"], Queries(at=(shifted,)), store_url=cohort.store, model_ref=str(cohort.checkpoint), n_samples=1, write=False))
    assert (r2.queries[0].days_after_last_scan, r2.queries[0].date, r2.queries[0].calendar) == (100.0, shifted,
                                                                                                 "shifted")
    assert shifted != "2024-11-15"
    assert r2.queries[0].volume_whole_ml == q.volume_whole_ml


def test_retrospective_query_uses_only_earlier_scans(cohort: Cohort) -> None:
    days = cohort.patients["sub-01"].days
    r = forecast_patient(cohort.settings, ForecastRequest(cohort.pids["sub-01"], Queries(days_since_baseline=(days[1],)), store_url=cohort.store, model_ref=str(cohort.checkpoint), n_samples=2, write=False))
    q = r.queries[0]
    # one context scan -> linear is LCI: the baseline's volume, whatever came later
    assert q.n_context == 1 and q.days_after_last_scan == days[1] - days[2]
    assert q.volume_whole_ml.median == pytest.approx(r.observed[0].volume_whole_ml)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 32, 100])
@pytest.mark.parametrize("dist", ["normal", "ties", "heavy", "constant"])
def test_interval_ordering_always_holds(n: int, dist: str) -> None:
    rng = np.random.default_rng(n)
    for _ in range(50):
        x = {"normal": rng.normal(10, 3, n), "ties": rng.integers(0, 3, n).astype(float) * 0.008,
             "heavy": rng.standard_cauchy(n) * 1e6, "constant": np.full(n, 4.2)}[dist]
        iv = VolumeInterval.from_samples(x)
        assert iv.ordered(), iv
        assert iv.lo95 >= x.min() and iv.hi95 <= x.max()
    assert VolumeInterval.from_samples(np.arange(1, 102, dtype=float)) == VolumeInterval(
        median=51.0, lo80=11.0, hi80=91.0, lo95=3.5, hi95=98.5)
    assert list(QUANTILE_LEVELS.values()) == sorted(QUANTILE_LEVELS.values())


def test_fast_sample_volumes_match_the_forecast_masks() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (1, 2, 5, 3, 6, 6, 6), generator=g).float()  # many exact ties
    probs = logits / logits.sum(3, keepdim=True).clamp_min(1)
    probs[:, :, :, 0] += (logits.sum(3) == 0).float()
    fc = Forecast(images=torch.zeros(1, 2, 5, 1, 6, 6, 6), probs=probs)
    want = fc.volumes_ml(0.008)[0].double().numpy()
    np.testing.assert_allclose(sample_volumes_ml(probs[0], 0.008), want, rtol=1e-6)


def test_sampled_model_intervals_are_ordered_through_the_api(cohort: Cohort, tmp_path) -> None:  # noqa: ANN001
    from forecasthelpers import baseline_checkpoint

    # An untrained neural process is a sampled model (its latent differs per sample); 16^3 crops keep it fast.
    ckpt = baseline_checkpoint(tmp_path / "np.pt", kind="np", crop=16)
    r = forecast_patient(cohort.settings, ForecastRequest(cohort.pids["sub-01"], Queries(in_days=(30, 365)), store_url=cohort.store, model_ref=str(ckpt), n_samples=6, write=False, seed=1))
    assert r.model_kind == "np" and len(r.queries) == 2
    for q in r.queries:
        assert q.volume_whole_ml.ordered() and q.volume_enhancing_ml.ordered()
    again = forecast_patient(cohort.settings, ForecastRequest(cohort.pids["sub-01"], Queries(in_days=(30, 365)), store_url=cohort.store, model_ref=str(ckpt), n_samples=6, write=False, seed=1))
    assert [q.volume_whole_ml for q in again.queries] == [q.volume_whole_ml for q in r.queries]  # seeded


def test_the_result_says_what_its_intervals_rest_on(cohort: Cohort, tmp_path) -> None:  # noqa: ANN001
    from forecasthelpers import SPACING, baseline_checkpoint

    from longitudinal.models.calibration import VolumeCalibration, calibrations_to_meta

    ckpt = baseline_checkpoint(tmp_path / "np.pt", kind="np", crop=16)
    raw = forecast_patient(cohort.settings, ForecastRequest(cohort.pids["sub-01"], Queries(in_days=(365.25,)), store_url=cohort.store, model_ref=str(ckpt), n_samples=4, write=False, seed=1))
    assert raw.intervals["whole"]["calibrated"] is False and "uncalibrated" in raw.intervals["whole"]["note"]
    assert raw.to_json()["intervals"] == raw.intervals

    # 30 validation targets of 7 patients, every absolute error 10 ml per year of scale: at a one-year gap the
    # scale is 0.25 + 1 years, so every interval is the median -/+ 12.5 ml.
    gaps = np.linspace(400, 700, 30)
    cal = VolumeCalibration.fit("whole", np.full(30, 50.0) + 10.0 * (0.25 + gaps / 365.25), np.full(30, 50.0),
                                gaps, n_patients=7)
    data = torch.load(ckpt, weights_only=False)
    data["meta"]["volume_calibration"] = calibrations_to_meta({"whole": cal})
    torch.save(data, tmp_path / "np_cal.pt")
    r = forecast_patient(cohort.settings, ForecastRequest(cohort.pids["sub-01"], Queries(in_days=(365.25,)), store_url=cohort.store, model_ref=str(tmp_path / "np_cal.pt"), n_samples=4, write=False, seed=1))
    basis = r.intervals["whole"]
    assert basis["calibrated"] is True and basis["calibration_patients"] == 7 and basis["calibration_targets"] == 30
    assert r.intervals["enhancing"]["calibrated"] is False  # only the whole tumour was calibrated here
    v = r.queries[0].volume_whole_ml
    assert v.median == raw.queries[0].volume_whole_ml.median  # same samples, same median
    assert v.hi80 - v.median == pytest.approx(12.5) and v.hi95 - v.median == pytest.approx(12.5)

    # Difficulty-scaled: every score 0.4 per year with c = 10 ml, so at a one-year gap the half-width is
    # 1.25 * (10 + |median - linear forecast|) * 0.4 ml; the linear forecast is that of the linear baseline.
    lin = forecast_patient(cohort.settings, ForecastRequest(cohort.pids["sub-01"], Queries(in_days=(365.25,)), store_url=cohort.store, model_ref=str(baseline_checkpoint(tmp_path / "lin.pt", crop=16)), n_samples=1, write=False)).queries[0].volume_whole_ml.median
    cal = VolumeCalibration.fit("whole", np.full(30, 50.0) + 0.4 * 10.0 * (0.25 + gaps / 365.25), np.full(30, 50.0),
                                gaps, n_patients=7, form="scaled", reference_ml=np.full(30, 50.0), difficulty_ml=10.0)
    data["meta"]["volume_calibration"] = calibrations_to_meta({"whole": cal})
    torch.save(data, tmp_path / "np_scaled.pt")
    r = forecast_patient(cohort.settings, ForecastRequest(cohort.pids["sub-01"], Queries(in_days=(365.25,)), store_url=cohort.store, model_ref=str(tmp_path / "np_scaled.pt"), n_samples=4, write=False, seed=1))
    assert "difficulty-scaled scores, c = 10 ml" in r.intervals["whole"]["method"]
    v = r.queries[0].volume_whole_ml
    assert v.median == raw.queries[0].volume_whole_ml.median
    assert v.hi80 - v.median == pytest.approx(1.25 * (10.0 + abs(v.median - lin)) * 0.4)

    # no end passes the largest volume the model can forecast: its 16^3 crop (scores far above any error)
    cal = VolumeCalibration.fit("whole", np.full(30, 5000.0), np.full(30, 50.0), gaps, n_patients=7, form="scaled",
                                reference_ml=np.full(30, 50.0))
    data["meta"]["volume_calibration"] = calibrations_to_meta({"whole": cal})
    torch.save(data, tmp_path / "np_huge.pt")
    r = forecast_patient(cohort.settings, ForecastRequest(cohort.pids["sub-01"], Queries(in_days=(365.25,)), store_url=cohort.store, model_ref=str(tmp_path / "np_huge.pt"), n_samples=4, write=False, seed=1))
    v = r.queries[0].volume_whole_ml
    crop_ml = 16**3 * SPACING**3 / 1000.0  # the store's voxels
    assert v.hi95 == v.hi80 == pytest.approx(crop_ml) and v.median == raw.queries[0].volume_whole_ml.median


def test_missing_native_geometry_falls_back_to_the_store_grid(tmp_path) -> None:  # noqa: ANN001
    import dataclasses

    from forecasthelpers import baseline_checkpoint

    from longitudinal.data.phantoms import phantom_record
    from longitudinal.settings import Settings
    from storage.store import CohortStore

    rec = phantom_record("P9", [0.0, 100.0], [(15.5, 15.5, 15.5)] * 2, [5.0, 6.0], grid=(32, 32, 30))
    rec.sessions[-1] = dataclasses.replace(rec.sessions[-1], native_shape=[], native_affine=[])
    url = str(tmp_path / "c.zarr")
    CohortStore.open(url, create=True).write_patient(rec)
    r = forecast_patient(Settings(home=tmp_path / "home"), ForecastRequest("P9", Queries(in_days=(50,)), store_url=url, n_samples=1, model_ref=str(baseline_checkpoint(tmp_path / "l.pt")), out_dir=tmp_path / "out"))
    assert r.native.grid == "reference" and r.native.shape == (30, 32, 32)
    img = nib.load(r.queries[0].files["prob_whole"])
    assert img.shape == (30, 32, 32)
    np.testing.assert_array_equal(img.affine, rec.reference_affine)
    assert json.loads(r.summary_path.read_text())["native_space"]["grid"] == "reference"


def test_bids_subject_labels_resolve_with_or_without_the_sub_prefix(tmp_path) -> None:  # noqa: ANN001
    from types import SimpleNamespace

    from forecasthelpers import KEY

    from longitudinal.forecast import resolve_patient
    from longitudinal.ingest.deid import pseudonym
    from longitudinal.settings import Settings

    pid = pseudonym("007", KEY.encode())  # BIDS discovery keys sub-007 by its label "007"
    store = SimpleNamespace(url="mem://", patient_ids=lambda: [pid, "p-000000000000"])
    s = Settings(home=tmp_path, pseudonym_key=KEY)
    assert resolve_patient(s, store, "sub-007") == (pid, "007")
    assert resolve_patient(s, store, "007") == (pid, "007")
    assert resolve_patient(s, store, pid) == (pid, None)


def test_native_session_puts_a_retrospective_forecast_on_that_visits_own_grid(cohort: Cohort, tmp_path) -> None:  # noqa: ANN001
    from longitudinal.forecast import InvalidQueryError, open_store

    p = cohort.patients["sub-01"]
    pid = cohort.pids["sub-01"]
    sessions = [s.session for s in open_store(cohort.store).arrays(pid).sessions]
    r = forecast_patient(cohort.settings, ForecastRequest(pid, Queries(days_since_baseline=(p.days[1],)), store_url=cohort.store, model_ref=str(cohort.checkpoint), n_samples=1, out_dir=tmp_path, native_session=sessions[1]))
    visit = nib.load(str(p.files[1]["label"]))  # scan 1 as acquired: moved 4 mm in x
    assert r.native.session == sessions[1] and r.queries[0].n_context == 1
    prob = nib.load(r.queries[0].files["prob_whole"])
    assert prob.shape == visit.shape
    np.testing.assert_array_equal(prob.affine, visit.affine)
    # One context scan: linear is LCI, the baseline's 5 mm sphere, pulled onto scan 1's grid where the tumour
    # (now 6.5 mm, concentric) sits: same physical centre, Dice of nested spheres 2*5^3/(5^3+6.5^3) = 0.63.
    assert np.linalg.norm(world_centroid(r.queries[0].files["prob_whole"]) - world_centroid(p.files[1]["label"])) < 1.0
    pred, truth = np.asarray(prob.dataobj) > 0.5, np.asarray(visit.dataobj) > 0
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert 0.5 < dice < 0.75, dice
    assert pred.sum() * 8e-3 == pytest.approx(r.observed[0].volume_whole_ml, rel=0.15)
    with pytest.raises(InvalidQueryError, match="not a session") as err:
        forecast_patient(cohort.settings, ForecastRequest(pid, Queries(days_since_baseline=(p.days[1],)), store_url=cohort.store, model_ref=str(cohort.checkpoint), n_samples=1, write=False, native_session="ses-nope"))
    assert sessions[0] in str(err.value)


def test_a_query_at_a_scans_own_fractional_day_does_not_see_that_scan(tmp_path) -> None:  # noqa: ANN001
    from forecasthelpers import baseline_checkpoint

    from longitudinal.data.phantoms import phantom_record
    from longitudinal.settings import Settings
    from storage.store import CohortStore

    # Acquisition times make days fractional; the query day is rounded to 6 decimals, here upwards.
    days = [0.0, 122.76180555555555, 247.83194444444445]
    rec = phantom_record("P8", days, [(15.5, 15.5, 15.5)] * 3, [4.0, 6.0, 8.0], grid=(32, 32, 32))
    url = str(tmp_path / "c.zarr")
    CohortStore.open(url, create=True).write_patient(rec)
    lci = baseline_checkpoint(tmp_path / "lci.pt", kind="lci")
    r = forecast_patient(Settings(home=tmp_path / "home"), ForecastRequest("P8", Queries(days_since_baseline=(days[1], days[2])), store_url=url, model_ref=str(lci), n_samples=1, write=False))
    assert [q.n_context for q in r.queries] == [1, 2]
    # LCI at visit j is visit j-1's volume, never visit j's own
    for q, prev in zip(r.queries, r.observed[:2], strict=True):
        assert q.volume_whole_ml.median == pytest.approx(prev.volume_whole_ml)
