"""The serving policy: per horizon bin the model, or the baseline that beat it on validation, with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from longitudinal.data.context import PatientSeries
from longitudinal.data.phantoms import sphere_patient
from longitudinal.models.base import build_model
from longitudinal.models.checkpoint import Checkpoint, DataSettings
from longitudinal.predict import Predictor
from longitudinal.predict.serving import ServingPolicy, fit_serving_policy


def _records(model: str, per_bin: dict[float, tuple[float, float]], n: int = 4) -> list[dict]:
    return [{"model": model, "horizon_days": h + i, "dice_whole": d, "volume_error_ml": e}
            for h, (d, e) in per_bin.items() for i in range(n)]


def test_policy_serves_the_model_only_where_it_is_no_worse_than_both_baselines() -> None:
    records = (
        _records("model", {10: (0.70, 5.0), 100: (0.80, 3.0), 200: (0.60, 9.0)})
        + _records("lci", {10: (0.75, 6.0), 100: (0.70, 6.0), 200: (0.65, 12.0)})
        + _records("linear", {10: (0.72, 4.0), 100: (0.75, 3.5), 200: (0.50, 7.0)})
    )
    policy = fit_serving_policy(records, {"model": "model", "lci": "lci", "linear": "linear"}, [90, 180, 365])
    # 0-90: lci best Dice (0.75), linear best error (4.0): the model (0.70, 5.0) loses both; least regret: lci
    # (0 + 0.5) vs linear (0.04 + 0) -> linear. 90-180: the model wins both. 180-365: nobody dominates, the
    # least regret is lci (0 + 0.71) vs model (0.077 + 0.29) vs linear (0.23 + 0) -> linear.
    assert policy.sources[:3] == ("linear", "model", "linear")
    assert policy.sources[3] == "linear"  # no targets beyond 365 d: the nearest bin's choice
    assert policy.evidence["0-90"]["n"] == 4 and policy.evidence[">365"]["from_neighbour"]
    assert policy.source_for(89.9) == "linear" and policy.source_for(90.0) == "model"
    again = ServingPolicy.from_meta(policy.to_meta())
    assert again == policy
    with pytest.raises(ValueError, match="unknown sources"):
        ServingPolicy((90.0,), ("model", "fk"))


def test_predictor_hands_the_chosen_horizons_to_the_baseline(tmp_path) -> None:
    series = PatientSeries(sphere_patient([10.0, 14.0, 16.0], [0.0, 60.0, 120.0], grid=40))
    policy = ServingPolicy((90.0,), ("lci", "model"))
    served = Predictor(build_model("linear"), (16, 16, 16), DataSettings(), device="cpu", serving=policy)
    plain = Predictor(build_model("linear"), (16, 16, 16), DataSettings(), device="cpu")
    lci = Predictor(build_model("lci"), (16, 16, 16), DataSettings(), device="cpu")
    days = [150.0, 300.0]
    got, lin, last = (p.predict(series, days).queries for p in (served, plain, lci))
    assert [q.served_by for q in got] == ["lci", "model"]
    np.testing.assert_array_equal(got[0].volumes_ml, last[0].volumes_ml)
    np.testing.assert_array_equal(got[1].volumes_ml, lin[1].volumes_ml)
    assert got[1].whole.median > got[0].whole.median  # linear keeps growing, lci does not
    # The policy travels in the checkpoint.
    ckpt = Checkpoint.of_model(build_model("linear"), ("T1c",), (2.0, 2.0, 2.0), (16, 16, 16), DataSettings(),
                               {"serving": policy.to_meta()})
    ckpt.save(tmp_path / "m.pt")
    loaded = Predictor.from_checkpoint(Checkpoint.load(tmp_path / "m.pt"), device="cpu")
    assert loaded.serving == policy


def _stratum_records(model: str, treated: dict[float, tuple[float, float]],
                     untreated: dict[float, tuple[float, float]], n: int) -> list[dict]:
    return [{**r, "treated_gap": flag} for flag, figs in ((True, treated), (False, untreated))
            for r in _records(model, figs, n)]


def test_each_treatment_stratum_gets_its_own_choice_where_it_has_enough_targets() -> None:
    names = {"model": "model", "lci": "lci", "linear": "linear"}
    # 0-90 d: linear wins untreated growth, the model wins after a treatment; pooled, linear wins (more
    # untreated targets). 90-180 d: the treated cell has too few targets for a choice of its own.
    records = (
        _stratum_records("model", {10: (0.80, 2.0)}, {10: (0.60, 9.0)}, 12)
        + _stratum_records("lci", {10: (0.50, 6.0)}, {10: (0.62, 8.0)}, 12)
        + _stratum_records("linear", {10: (0.55, 5.0)}, {10: (0.75, 3.0)}, 12)
        + _records("model", {100: (0.5, 8.0)}, 20) + _records("lci", {100: (0.4, 9.0)}, 20)
        + _records("linear", {100: (0.6, 4.0)}, 20)
    )
    for r in records[-60:]:
        r["treated_gap"] = r["horizon_days"] < 105  # 6 of each source's 20 targets are treated
    policy = fit_serving_policy(records, names, [90, 180])
    # Pooled 0-90: model (0.70, 5.5), lci (0.56, 7.0), linear (0.65, 4.0): least regret linear (0.07 vs 0.375).
    assert policy.sources == ("linear", "linear", "linear")
    assert policy.by_stratum == {"untreated": ("linear", "linear", "linear"),
                                 "treated": ("model", "linear", "linear")}
    assert policy.evidence["strata"]["treated"]["90-180"]["from_pooled"]
    assert policy.evidence["strata"]["treated"]["0-90"]["n"] == 12
    assert policy.source_for(30, treated=True) == "model"
    assert policy.source_for(30, treated=False) == "linear"
    assert policy.source_for(30) == "linear"  # stratum unknown: the pooled choice
    assert ServingPolicy.from_meta(policy.to_meta()) == policy
    assert "0-90 d: linear (treated model)" in policy.describe()
    # Records without a treatment flag give the pooled policy only.
    plain = fit_serving_policy([{k: v for k, v in r.items() if k != "treated_gap"} for r in records], names,
                               [90, 180])
    assert plain.by_stratum == {} and plain.sources == policy.sources
    with pytest.raises(ValueError, match="unknown stratum"):
        ServingPolicy((90.0,), ("model", "model"), by_stratum={"resected": ("lci", "lci")})


def test_predictor_routes_a_query_by_the_treatment_in_its_gap() -> None:
    """The same horizon is served by lci with no treatment in the gap, by the model once a plan puts one there."""
    series = PatientSeries(sphere_patient([10.0, 14.0, 16.0], [0.0, 60.0, 120.0], grid=40))
    policy = ServingPolicy((90.0,), ("model", "model"), by_stratum={"untreated": ("lci", "model"),
                                                                    "treated": ("model", "model")})
    served = Predictor(build_model("linear"), (16, 16, 16), DataSettings(), device="cpu", serving=policy)
    plain = served.predict(series, [150.0]).queries[0]
    planned = served.predict(series.with_plan([(130.0, 130.0, "surgery")]), [150.0]).queries[0]
    later = served.predict(series.with_plan([(160.0, 160.0, "surgery")]), [150.0]).queries[0]
    assert (plain.served_by, planned.served_by, later.served_by) == ("lci", "model", "lci")
