"""Serving: an OpenAI-compatible completions API with continuous batching, and a playground page."""

from gptwo.lazy import lazy_names

_WHERE = {
    "BatchEngine": "gptwo.serve.engine",
    "SamplingParams": "gptwo.serve.engine",
    "create_app": "gptwo.serve.app",
    "serve": "gptwo.serve.app",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
