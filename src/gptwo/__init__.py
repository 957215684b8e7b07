"""gptwo: the whole GPT-2 system — model, tokenizer, weights, data, training, serving, evaluation.

`from gptwo import GPT, GPTConfig, Tokenizer`. The names load on first use, so `gptwo --help` and
worker processes that need no model do not import torch.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "GptwoError", "KVCache", "Tokenizer"]
_WHERE = {"GPT": "gptwo.model", "KVCache": "gptwo.model", "GPTConfig": "gptwo.config", "GptwoError": "gptwo.errors", "Tokenizer": "gptwo.tokenizer"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'gptwo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
