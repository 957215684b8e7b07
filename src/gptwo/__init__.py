"""gptwo: the whole GPT-2 system — model, tokenizer, weights, data, training, serving, evaluation."""

from gptwo.config import GPTConfig
from gptwo.errors import GptwoError
from gptwo.model import GPT, KVCache
from gptwo.tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "GptwoError", "KVCache", "Tokenizer"]
__version__ = "0.1.0"
