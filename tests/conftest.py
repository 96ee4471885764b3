"""Settings for every test process."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two test processes on the machine's cores: one torch thread each (and in the
    # subprocesses they start), since two processes of two threads on two cores spend their time waiting.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
