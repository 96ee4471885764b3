"""`longitudinal ingest --dask-address` on a real 2-process Dask cluster (loopback) gives the same store as a
serial ingest, with the pseudonym key sent by the client (the workers' own workspace holds a different one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from longitudinal.cli import app

REPO = Path(__file__).resolve().parents[2]
N_PATIENTS = 2  # tiny preset: 5 + 4 visits
SPACING_MM = 4.0  # the tiny preset's grid


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from longitudinal.synth import generate_cohort

    root = tmp_path_factory.mktemp("dask-cli")
    generate_cohort(root / "bids", N_PATIENTS, 0, "tiny")
    return {"root": root, "bids": root / "bids"}


@pytest.fixture(scope="module")
def cluster(cohort: dict[str, Path]):
    """A local 2-process cluster whose workers see another workspace than the CLI (and no key in their env)."""
    from distributed import LocalCluster

    worker_home = cohort["root"] / "worker-home"
    with pytest.MonkeyPatch.context() as mp:
        # Spawned worker processes inherit this environment.
        for name in [k for k in os.environ if k.startswith(("LONGITUDINAL_", "MLFLOW_", "PREFECT_"))]:
            mp.delenv(name)
        mp.setenv("LONGITUDINAL_HOME", str(worker_home))
        with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                          host="127.0.0.1") as lc:
            yield {"cluster": lc, "worker_home": worker_home}


def _index(url: str):
    from storage.store import CohortStore

    store = CohortStore.open(url, recover=False)
    assert store.verify() == []
    frame = store.index().sort_values(["patient_id", "time_index"]).reset_index(drop=True)
    sources = {(pid, s.session): s.source_sha256 for pid in store.patient_ids() for s in store.sessions(pid)}
    return store, frame, sources


@pytest.mark.slow
def test_cli_dask_address_matches_serial_ingest(cohort, cluster) -> None:
    from distributed import Client

    from longitudinal.ingest import ingest_cohort
    from longitudinal.settings import Settings

    root, bids = cohort["root"], cohort["bids"]
    home = root / "home"
    serial_url, dask_url = str(root / "serial.zarr"), str(root / "dask.zarr")
    # The serial run creates the site's random key under `home`; the CLI below reads the same one.
    serial = ingest_cohort(bids, serial_url, Settings(home=home, target_spacing_mm=SPACING_MM), workers=1)
    assert serial.failed_patients == [] and serial.stored >= N_PATIENTS * 2

    address = cluster["cluster"].scheduler_address
    assert address.startswith("tcp://127.0.0.1:")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LONGITUDINAL_", "MLFLOW_", "PREFECT_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "longitudinal", "--home", str(home), "ingest", str(bids), "--store", dask_url,
         "--spacing", str(SPACING_MM), "--dask-address", address],
        env=env, cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"patients run on the cluster at {address}" in proc.stdout

    # The run's report is the thread path's IngestReport: same counts as the serial run.
    reports = sorted((home / "reports").glob("ingest-*.json"))
    summary = json.loads(reports[-1].read_text())["summary"]
    assert (summary["patients"], summary["stored"], summary["failed_patients"]) == (N_PATIENTS, serial.stored, 0)

    # The patients really ran on the two worker processes, which never resolved a key of their own.
    with Client(cluster["cluster"], set_as_default=False) as client:
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert len(executed) == 2 and sum(executed.values()) == N_PATIENTS, executed
    assert not (cluster["worker_home"] / "secrets" / "pseudonym.key").exists()

    ser, ser_index, ser_sources = _index(serial_url)
    dsk, dsk_index, dsk_sources = _index(dask_url)
    assert len(ser_index) == serial.stored
    exact = [c for c in ser_index.columns if c != "registration_metric"]  # patients, sessions, days, hashes
    assert ser_index[exact].equals(dsk_index[exact])
    assert ser_sources == dsk_sources
    # Registration is not bit-reproducible across processes (ITK's threaded metric sums in a load-dependent
    # order): metrics and arrays agree within registration jitter.
    assert np.allclose(ser_index["registration_metric"], dsk_index["registration_metric"], rtol=0.05, atol=1e-3)
    for pid in ser.patient_ids():
        a, b = ser.arrays(pid), dsk.arrays(pid)
        img_a, img_b = np.asarray(a.image[:]), np.asarray(b.image[:])
        assert img_a.shape == img_b.shape
        assert np.abs(img_a - img_b).mean() < 1e-3 * max(1.0, float(np.abs(img_a).max()))

    # Rerun through the library on the cluster: idempotent (everything skipped), same progress protocol.
    calls: list[tuple[int, int, str]] = []
    again = ingest_cohort(bids, dask_url, Settings(home=home, target_spacing_mm=SPACING_MM),
                          progress=lambda d, t, out: calls.append((d, t, out.patient_id)),
                          dask_address=address)
    assert (again.stored, again.skipped, again.failed_patients) == (0, serial.stored, [])
    assert [(d, t) for d, t, _ in calls] == [(1, N_PATIENTS), (2, N_PATIENTS)]
    assert sorted(p for _, _, p in calls) == sorted(dsk.patient_ids())
    assert [p.patient_id for p in again.patients] == [p.patient_id for p in serial.patients]


def test_cli_dask_address_refuses_bad_combinations(tmp_path: Path) -> None:
    runner = CliRunner()
    src = tmp_path / "src"
    src.mkdir()
    both = runner.invoke(app, ["--home", str(tmp_path / "h"), "ingest", str(src), "--workers", "2",
                               "--dask-address", "tcp://127.0.0.1:8786"])
    assert both.exit_code == 1 and "--workers" in both.output
    bad = runner.invoke(app, ["--home", str(tmp_path / "h"), "ingest", str(src), "--dask-address", "127.0.0.1"])
    assert bad.exit_code == 1 and "scheduler address" in bad.output
