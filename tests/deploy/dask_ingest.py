"""Run the ingest-cohort flow with its patients on a local 2-process Dask cluster (a subprocess of a test).

    python tests/deploy/dask_ingest.py SOURCE STORE      # needs PREFECT_API_URL: Dask workers report to it

Prints the flow's summary as JSON on the last line.
"""

from __future__ import annotations

import json
import sys

from distributed import LocalCluster
from prefect_dask import DaskTaskRunner

from flows.ingest import ingest_cohort_flow

if __name__ == "__main__":
    source, store = sys.argv[1], sys.argv[2]
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        flow = ingest_cohort_flow.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        summary = flow(source=source, store=store)
        workers = sorted(cluster.scheduler_info["workers"])
    print(json.dumps({"summary": summary, "dask_workers": workers}, default=str))
