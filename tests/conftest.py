"""Suite-wide: tests marked `gpu` run only where CUDA is available (`pytest -m gpu` on a GPU machine).

This file also puts tests/ on sys.path (pytest's default prepend import mode), so any test module can
import the shared helpers at the tests root: serve_testing (a tiny saved model, a live server) and
browser_testing (headless Chromium).
"""

import os

# Under pytest-xdist (`-n N`, as scripts/setup.sh runs the suite) the workers share the machine's cores: each,
# and every process a test starts, gets its share of threads (set before torch loads, so OpenMP reads it).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if WORKERS:
    CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    THREADS = str(max(1, CORES // WORKERS))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = THREADS

import pytest  # noqa: E402
import torch  # noqa: E402

# Files whose tests start several processes each (torchrun): one worker runs them all, one after another.
SERIAL = {
    "tests/lora/test_lora_train.py",
    "tests/select/test_select_distributed.py",
    "tests/train/test_train_chat.py",
    "tests/train/test_train_distributed.py",
    "tests/train/test_train_muon.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:  # --dist loadgroup: a file's tests stay on one worker (its module fixtures built once)
        path = os.path.relpath(str(item.path), str(config.rootpath))
        item.add_marker(pytest.mark.xdist_group("torchrun" if path in SERIAL else path))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _worker_threads():
    """Each xdist worker's torch threads at its share of the cores, again for every test (a test may change them)."""
    if WORKERS:
        torch.set_num_threads(int(THREADS))
    yield
