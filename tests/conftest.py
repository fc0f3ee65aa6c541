"""Settings for the whole test session."""

import os

# The README runs the suite in one pytest-xdist worker per core. torch would give each worker a thread per core as
# well, and the oversubscribed threads slow each other down (a quarter of the time of the modeling and training
# tests on 2 cores). One thread per worker, and per subprocess a test starts; a value the user set is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The longest files on a 2-core CI machine (Triton's interpreter in a subprocess, several-process launches), longest
# first: xdist hands out files in collection order, and collected late they ran on one worker after the other had
# finished everything else (`.ci/run` took about a minute longer).
# Measured on 2 cores (2026-12-07), longest first: with the rest after them, two workers finish close together.
LONGEST_FILES = (
    "test_triton_interpreter.py", "test_afd.py", "test_serve.py", "test_quotient_timm_conformance.py",
    "test_model_common.py", "test_training.py", "test_quotient_train.py", "test_launch_count.py",
    "test_parallel_decode.py", "test_request_validation.py", "test_inspect_checkpoint.py", "test_modeling.py",
)  # fmt: skip


def pytest_configure(config):
    # ... unless xdist reorders the files itself: `--dist loadfile` sorts them by their number of tests by default
    # (`--loadscope-reorder`), which put the one-test interpreter file last, alone on one worker for its 200 s.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: the rest keep their order
