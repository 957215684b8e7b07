"""Helpers for the tests that serve a model (tests/serve, tests/detect, tests/bench): a tiny random GPT-2
saved to disk, and a live uvicorn server on 127.0.0.1. Importable from any test module: pytest puts
tests/ on sys.path for tests/conftest.py."""

from __future__ import annotations

import threading
import time

import torch
import uvicorn

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.serve import BatchEngine, create_app
from gptwo.serve.app import bind_socket
from gptwo.serve.connection import uvicorn_config
from gptwo.weights import save_pretrained


def tiny_model(block_size: int = 512, vocab_size: int = 50257) -> GPT:
    """A 2-layer GPT-2 (GPT-2's vocabulary by default) with wide random weights, so greedy text varies and has
    clear winners."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))
    for param in model.parameters():
        if param.dim() >= 2:
            torch.nn.init.normal_(param, std=0.5)
    return model.eval()


def save_tiny_model(directory: str) -> None:
    save_pretrained(tiny_model(), directory, tokenizer=Tokenizer.gpt2())


class LiveServer:
    """uvicorn serving `app` in a thread on a free port of 127.0.0.1, on the connections `gptwo serve` uses
    (`lifespan="off"` leaves the engine stopped; `connection` goes to gptwo.serve.connection.uvicorn_config)."""

    def __init__(self, app, lifespan: str = "on", **connection):
        sock = bind_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, log_level="warning", lifespan=lifespan, **connection))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve_in_thread(
    model_dir: str,
    name: str = "tiny",
    lifespan: str = "on",
    app_kwargs: dict | None = None,
    dtype=None,
    quantize=None,
    connection: dict | None = None,
    **engine_kwargs,
) -> tuple[LiveServer, BatchEngine]:
    """A live server for the model in `model_dir`; `app_kwargs` go to create_app (default body limit 64 KiB),
    `connection` to LiveServer."""
    from gptwo.weights import load_model

    model, tokenizer = load_model(model_dir, device="cpu", dtype=dtype, quantize=quantize)
    engine = BatchEngine(model, tokenizer, **engine_kwargs)
    return LiveServer(
        create_app(engine, name, **{"max_body_bytes": 64 * 1024, **(app_kwargs or {})}),
        lifespan=lifespan,
        **(connection or {}),
    ), engine
