"""Suite-wide: tests marked `gpu` run only where CUDA is available (`pytest -m gpu` on a GPU machine).

This file also puts tests/ on sys.path (pytest's default prepend import mode), so any test module can
import the shared helpers at the tests root: serve_testing (a tiny saved model, a live server) and
browser_testing (headless Chromium).
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
