"""Serving: an OpenAI-compatible completions API with continuous batching, and a playground page."""

from gptwo.serve.app import create_app, serve
from gptwo.serve.engine import Engine, SamplingParams

__all__ = ["Engine", "SamplingParams", "create_app", "serve"]
