"""Fixtures shared by the serving tests."""

import openai
import pytest
from serve_testing import save_tiny_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A tiny saved model (random weights, GPT-2's tokenizer), shared by the serving tests (none writes to it)."""
    directory = str(tmp_path_factory.mktemp("tiny"))
    save_tiny_model(directory)
    return directory


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    """The `openai` client of the module's live server (each module's `live` fixture starts its own)."""
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key="none", max_retries=0, timeout=60)
