"""Patient splits: disjoint, complete, persisted, and stable under a seed."""

from __future__ import annotations

import json

import pytest
import torch

from longitudinal.data.splits import Split, make_split

IDS = [f"P{i:03d}" for i in range(23)]


@pytest.mark.parametrize(("n", "val", "test"), [(23, 0.15, 0.15), (3, 0.15, 0.15), (10, 0.2, 0.0), (1, 0.15, 0.15)])
def test_split_is_disjoint_and_complete(n, val, test):
    split = make_split(IDS[:n], seed=3, val_fraction=val, test_fraction=test)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(IDS[:n])
    assert split.train, "train keeps at least one patient"
    if n >= 3 and val > 0:
        assert split.val
    assert split.check() == []


def test_split_sizes_follow_fractions():
    split = make_split(IDS, seed=0, val_fraction=0.15, test_fraction=0.15)
    assert (len(split.train), len(split.val), len(split.test)) == (17, 3, 3)


def test_split_is_seeded():
    a, b, c = make_split(IDS, seed=1), make_split(IDS, seed=1), make_split(IDS, seed=2)
    assert a == b and a.split_id == b.split_id
    assert a.split_id != c.split_id
    # Input order never matters (ids are sorted before shuffling).
    assert make_split(list(reversed(IDS)), seed=1) == a


def test_split_round_trips_through_json_and_detects_tampering(tmp_path):
    split = make_split(IDS, seed=4)
    path = split.save(tmp_path / "split.json")
    assert Split.load(path) == split
    d = json.loads(path.read_text())
    assert set(d) == {"train", "val", "test", "seed", "split_id"}
    d["val"].append(d["train"][0])  # a patient in two splits
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="both train and val"):
        Split.load(path)


def test_bad_split_arguments_are_all_reported():
    with pytest.raises(ValueError) as exc:
        make_split(["A", "A"], val_fraction=0.7, test_fraction=0.5)
    assert "duplicates" in str(exc.value) and "fractions" in str(exc.value)


def test_order_keys_give_the_same_split_whatever_the_ids():
    """The same patients under other ids (another site's pseudonym key) split the same way when ordered by keys
    from their content; without keys the split follows the ids."""
    keys = {pid: f"content-{(i * 7) % 23:02d}" for i, pid in enumerate(IDS)}
    renamed = {pid: f"Q{(i * 5) % 23:03d}x" for i, pid in enumerate(IDS)}
    a = make_split(IDS, seed=2, order_keys=keys)
    b = make_split(list(renamed.values()), seed=2, order_keys={renamed[p]: k for p, k in keys.items()})
    for part in ("train", "val", "test"):
        assert sorted(renamed[p] for p in getattr(a, part)) == list(getattr(b, part))
    by_id = make_split(list(renamed.values()), seed=2)
    assert {renamed[p] for p in a.val} != set(by_id.val) or {renamed[p] for p in a.test} != set(by_id.test)
    with pytest.raises(ValueError, match="no order key"):
        make_split(IDS, seed=2, order_keys={IDS[0]: "x"})


def test_cohort_order_keys_come_from_the_scans_not_the_pseudonyms(tmp_path):
    import dataclasses

    from longitudinal.data.phantoms import phantom_record
    from longitudinal.data.splits import cohort_order_keys
    from storage.store import CohortStore

    records = [phantom_record(f"A{i}", [0.0, 50.0], [(8.0, 8.0, 8.0)] * 2, [3.0, 4.0], grid=(16, 16, 16), seed=i)
               for i in range(6)]
    first, second = (CohortStore.open(tmp_path / f"{n}.zarr", create=True) for n in ("a", "b"))
    for i, rec in enumerate(records):
        first.write_patient(rec)
        second.write_patient(dataclasses.replace(rec, patient_id=f"B{(i * 5) % 6}"))  # same scans, other ids
    ka, kb = cohort_order_keys(str(tmp_path / "a.zarr")), cohort_order_keys(str(tmp_path / "b.zarr"))
    assert sorted(ka.values()) == sorted(kb.values()) and len(set(ka.values())) == 6
    assert all(ka[f"A{i}"] == kb[f"B{(i * 5) % 6}"] for i in range(6))


def test_content_order_is_the_same_under_other_ids(tmp_path):
    import dataclasses

    from longitudinal.data.dataset import ForecastDataset
    from longitudinal.data.phantoms import phantom_record
    from longitudinal.data.splits import content_order
    from longitudinal.training.config import TrainConfig
    from storage.store import CohortStore

    records = [phantom_record(f"A{i}", [0.0, 50.0, 90.0], [(8.0, 8.0, 8.0)] * 3, [3.0, 3.5 + i / 4, 4.0 + i / 2],
                              grid=(16, 16, 16), seed=i) for i in range(5)]
    renamed = {f"A{i}": f"B{(i * 3) % 5}" for i in range(5)}
    for name, rename in (("a", False), ("b", True)):
        store = CohortStore.open(tmp_path / f"{name}.zarr", create=True)
        for rec in records:
            store.write_patient(dataclasses.replace(rec, patient_id=renamed[rec.patient_id]) if rename else rec)
    order_a = content_order([f"A{i}" for i in range(5)], str(tmp_path / "a.zarr"))
    order_b = content_order(sorted(renamed.values()), str(tmp_path / "b.zarr"))
    assert [renamed[p] for p in order_a] == order_b
    # The training stream (item i = the i-th patient of the order, its randomness from (seed, epoch, i)) matches.
    cfg = TrainConfig(steps=1, crop_size=(16, 16, 16)).data_config(train=True)
    da, db = (ForecastDataset(str(tmp_path / f"{n}.zarr"), o, cfg, seed=3) for n, o in (("a", order_a), ("b", order_b)))
    for i in range(5):
        assert torch.equal(da[i].context_images, db[i].context_images)
        assert torch.equal(da[i].target_images, db[i].target_images) and torch.equal(da[i].query_times, db[i].query_times)
