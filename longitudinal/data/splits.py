"""Patient-level splits, persisted as JSON beside a run. Never split by scan: every scan of a patient lives in
exactly one of train / val / test, so evaluation targets are always from unseen patients."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Split:
    """train / val / test patient ids, the seed that drew them and ``split_id`` (hash of the three lists)."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int
    split_id: str

    def check(self) -> list[str]:
        """Every problem with this split (a patient in two parts, duplicates, a stale id)."""
        problems = []
        parts = {"train": self.train, "val": self.val, "test": self.test}
        for name, ids in parts.items():
            if len(set(ids)) != len(ids):
                problems.append(f"{name} lists a patient twice")
        names = list(parts)
        for a in range(3):
            for b in range(a + 1, 3):
                both = set(parts[names[a]]) & set(parts[names[b]])
                if both:
                    problems.append(f"patients in both {names[a]} and {names[b]}: {sorted(both)}")
        if split_hash(self.train, self.val, self.test) != self.split_id:
            problems.append("split_id does not match the patient lists")
        return problems

    def save(self, path: Path) -> Path:
        """Write JSON (atomic via a temporary file) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()},
                                  indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> Split:
        d = json.loads(Path(path).read_text())
        split = cls(train=tuple(d["train"]), val=tuple(d["val"]), test=tuple(d["test"]), seed=int(d["seed"]),
                    split_id=str(d["split_id"]))
        problems = split.check()
        if problems:
            raise ValueError(f"invalid split file {path}: " + "; ".join(problems))
        return split


def split_hash(train: Sequence[str], val: Sequence[str], test: Sequence[str]) -> str:
    """Short stable id of a split: sha256 over the sorted lists (first 12 hex digits)."""
    payload = json.dumps([sorted(train), sorted(val), sorted(test)]).encode()
    return hashlib.sha256(payload).hexdigest()[:12]


def make_split(
    patient_ids: Sequence[str], seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
    order_keys: Mapping[str, str] | None = None,
) -> Split:
    """Shuffle patients with ``seed`` and cut them into train / val / test.

    The shuffle starts from the patients sorted by ``order_keys`` (patient id -> key; ``cohort_order_keys``
    gives keys from the scans' content, which do not depend on the site's pseudonym key) or, without them, by
    id. With at least 3 patients val and test get at least one patient each (when their fraction is > 0) and
    train keeps at least one; ids are sorted inside each part so the JSON is easy to diff.
    """
    problems = []
    if len(set(patient_ids)) != len(patient_ids):
        problems.append("patient_ids has duplicates")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        problems.append(f"fractions must be in [0, 1) and sum below 1, got val={val_fraction}, "
                        f"test={test_fraction}")
    if not patient_ids:
        problems.append("no patients to split")
    if order_keys is not None and set(patient_ids) - set(order_keys):
        problems.append(f"no order key for {sorted(set(patient_ids) - set(order_keys))}")
    if problems:
        raise ValueError("cannot split: " + "; ".join(problems))
    ids = sorted(patient_ids) if order_keys is None else sorted(patient_ids, key=lambda p: (order_keys[p], p))
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    n = len(ids)
    n_val = int(round(n * val_fraction))
    n_test = int(round(n * test_fraction))
    if n >= 3:
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
    while n_val + n_test >= n and (n_val or n_test):
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    val = tuple(sorted(shuffled[:n_val]))
    test = tuple(sorted(shuffled[n_val:n_val + n_test]))
    train = tuple(sorted(shuffled[n_val + n_test:]))
    return Split(train=train, val=val, test=test, seed=seed, split_id=split_hash(train, val, test))


def cohort_order_keys(store_url: str, patient_ids: Sequence[str] | None = None) -> dict[str, str]:
    """Patient id -> a key from the content of its stored scans (sha256 over its sessions' source-file hashes),
    for ``patient_ids`` (default: every patient of the store; an id not in the store gets the key of no scans).

    Pseudonyms come from the site's secret key, so the same cohort gets different ids at every site; splitting
    in the order of these keys gives it the same split everywhere (a figure can be reproduced from the cohort
    alone). Patients with identical scans (never in practice) fall back to their id order."""
    from storage.store import CohortStore

    store = CohortStore.open(store_url)
    pids = store.patient_ids() if patient_ids is None else patient_ids
    return {pid: hashlib.sha256("\n".join(sorted(store.content_hashes(pid))).encode()).hexdigest() for pid in pids}


def content_order(patient_ids: Sequence[str], store_url: str) -> list[str]:
    """``patient_ids`` sorted by ``cohort_order_keys`` (then by id): an order of the patients that is the same
    under any pseudonym key, for whatever consumes them in order (the training sample stream)."""
    keys = cohort_order_keys(store_url, patient_ids)  # only the patients asked for: no scan of the whole store
    return sorted(patient_ids, key=lambda pid: (keys[pid], pid))
