"""Settings for the whole test session."""

import os

# The README runs the suite in one pytest-xdist worker per core. torch would give each worker a thread per core as
# well, and the oversubscribed threads slow each other down (a quarter of the time of the modeling and training
# tests on 2 cores). One thread per worker, and per subprocess a test starts; a value the user set is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The longest files first: under `--dist loadfile` a worker takes a whole file at a time, in collection order, and a
# long file taken last sets the wall time while the other workers idle. The interpreter run of the kernel files takes
# about 4 minutes of a 2-core CI machine, the AFD launches about 3.
_FIRST = ("test_triton_interpreter.py", "test_afd.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: _FIRST.index(item.path.name) if item.path.name in _FIRST else len(_FIRST))
