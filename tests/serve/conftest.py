"""Fixtures shared by the serving tests."""

import pytest
from serve_testing import save_tiny_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A tiny saved model (random weights, GPT-2's tokenizer), shared by the serving tests (none writes to it)."""
    directory = str(tmp_path_factory.mktemp("tiny"))
    save_tiny_model(directory)
    return directory
