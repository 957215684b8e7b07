"""gptwo: the whole GPT-2 system — model, tokenizer, weights, data, training, serving, evaluation.

`from gptwo import GPT, GPTConfig, Tokenizer`. `GPT` is the model with its loading, saving and sampling
conveniences (`gptwo.weights.GPT`, a subclass of the bare `gptwo.model.GPT`). The names load on first
use, so `gptwo --help` and worker processes that need no model do not import torch.
"""

from gptwo.lazy import lazy_names

__version__ = "0.1.0"
_WHERE = {
    "GPT": "gptwo.weights",
    "GPTConfig": "gptwo.config",
    "GptwoError": "gptwo.errors",
    "Tokenizer": "gptwo.tokenizer",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
