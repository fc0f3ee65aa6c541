"""Settings for the whole test session."""

import os

# The README runs the suite in one pytest-xdist worker per core. torch would give each worker a thread per core as
# well, and the oversubscribed threads slow each other down (a quarter of the time of the modeling and training
# tests on 2 cores). One thread per worker, and per subprocess a test starts; a value the user set is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
