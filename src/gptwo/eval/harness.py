"""lm-evaluation-harness plug-in: `--model gptwo --model_args pretrained=PATH`.

lm-eval 0.4.x looks models up only in its own registry: it has no entry-point discovery. So
importing this module registers the name `gptwo` (lazily, by import path, so importing it twice
is harmless), and two ways run lm-eval's own command line with it registered:

    gptwo eval harness --model gptwo --model_args pretrained=PATH --tasks lambada_openai
    python -m gptwo.eval.harness --model gptwo --model_args pretrained=PATH --tasks lambada_openai

From Python: `import gptwo.eval.harness`, then `lm_eval.simple_evaluate(model="gptwo", ...)`.
The model and tokenizer are gptwo's own (`gptwo.weights.load_model`): a folder with a trained
tokenizer.json works as well as GPT-2's BPE.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import normalize_gen_kwargs

from gptwo.errors import GptwoError
from gptwo.eval.scoring import rolling_pairs, score_pairs
from gptwo.generate import stream_texts
from gptwo.runtime import resolve_device

model_registry.register("gptwo", target="gptwo.eval.harness:GptwoLM")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": None}
_SAMPLING_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}
EXAMPLE = "gptwo eval harness --model gptwo --model_args pretrained=PATH --tasks lambada_openai"


class GptwoLM(TemplateLM):
    """A gptwo model behind lm-eval's three request types, batched."""

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = "auto",
        batch_size: int | str | None = 8,
        max_batch_size: int | None = None,
        dtype: str | None = None,
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        from gptwo.weights import load_model

        if not pretrained:
            raise GptwoError(
                "--model gptwo has no model to load (no pretrained= in --model_args)",
                "pass --model_args pretrained=PATH (a model folder, run folder or hub id)",
            )

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 unless told otherwise; its hf model falls back too
            logging.getLogger(__name__).warning("device %s is not available; using %s", device, resolve_device("auto"))
            device = "auto"
        if str(dtype) not in _DTYPES and dtype is not None:
            raise GptwoError(f"dtype '{dtype}' is not supported", f"use one of: {', '.join(_DTYPES)}")
        self.model, self.tokenizer = load_model(pretrained, device=device or "auto", dtype=_DTYPES.get(str(dtype)))
        self.pretrained = pretrained
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.max_gen_toks = int(max_gen_toks)

    # ---- what TemplateLM asks for
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_token

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each request is ((context, continuation), context tokens, continuation tokens)."""
        scores = score_pairs(
            self.model,
            [(ctx, cont) for _, ctx, cont in requests],
            self.batch_size,
            None if disable_tqdm else "loglikelihood",
        )
        answers = [(s.logprob, s.greedy) for s in scores]
        for (strings, _, _), answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each whole text, in disjoint windows of the full context."""
        pairs, owner = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            windows = rolling_pairs(self.tok_encode(string), self.prefix_token_id, self.max_length)
            pairs += windows
            owner += [index] * len(windows)
        totals = [0.0] * len(requests)
        for index, score in zip(
            owner, score_pairs(self.model, pairs, self.batch_size, None if disable_tqdm else "loglikelihood_rolling")
        ):
            totals[index] += score.logprob
        for req, value in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, value)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, cut at the first stop sequence; requests sharing settings run as a batch."""
        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(index)
        outputs = [""] * len(requests)
        for indices in groups.values():
            settings = _sampling(requests[indices[0]].args[1], self.max_gen_toks)
            room = self.max_length - settings["max_new_tokens"]
            if room < 1:
                raise GptwoError(
                    f"max_gen_toks={settings['max_new_tokens']} leaves no room in the context of {self.max_length}",
                    "ask for fewer tokens",
                )
            contexts = {i: (self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-room:] for i in indices}
            ordered = sorted(indices, key=lambda i: -len(contexts[i]))
            for first in range(0, len(ordered), self.batch_size):
                batch = ordered[first : first + self.batch_size]
                for i, text in zip(batch, self._complete([contexts[i] for i in batch], settings)):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    def _complete(self, prompts: Sequence[Sequence[int]], settings: dict) -> list[str]:
        texts = [""] * len(prompts)
        for pieces in stream_texts(self.model, self.tokenizer, prompts, **settings):
            texts = [t + p for t, p in zip(texts, pieces)]
        return texts

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": self.model.num_params(non_embedding=False),
            "model_dtype": str(self.model.lm_head.weight.dtype),
        }


def _batch_size(value: int | str | None, max_batch_size: int | None) -> int:
    """lm-eval passes --batch_size as given; 'auto' (not detected here) means 8, capped by --max_batch_size."""
    text = str(value if value is not None else 8)
    size = 8 if text.startswith("auto") else int(text)
    if size < 1:
        raise GptwoError(f"batch size {size} must be at least 1", "use --batch_size 1 or more")
    return min(size, int(max_batch_size)) if max_batch_size else size


def _sampling(gen_kwargs: dict, default_max_gen_toks: int) -> dict:
    """lm-eval's generation settings as `stream_texts` keywords; greedy unless do_sample."""
    unknown = sorted(set(gen_kwargs) - _SAMPLING_KEYS - {"max_new_tokens", "max_tokens", "max_completion_tokens"})
    if unknown:
        raise GptwoError(
            f"generation setting '{unknown[0]}' is not supported by the gptwo model",
            f"use only: {', '.join(sorted(_SAMPLING_KEYS))}",
        )
    kwargs = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks)
    return {
        "max_new_tokens": kwargs["max_gen_toks"],
        "temperature": float(kwargs["temperature"]) if kwargs["do_sample"] else 0.0,
        "top_k": kwargs.get("top_k"),
        "top_p": kwargs.get("top_p"),
        "stop": [s for s in kwargs["until"] if s],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's own command line (`lm-eval ARGS...`) with the `gptwo` model registered."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise GptwoError(
            "gptwo eval harness needs lm-eval's arguments",
            f"e.g. {EXAMPLE}; lm-eval's own help: gptwo eval harness --help",
        )
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except ValueError as err:  # lm-eval's word for a task it does not know
        if not str(err).startswith("Tasks not found:"):
            raise
        missing = str(err).removeprefix("Tasks not found:").strip()
        raise GptwoError(
            f"lm-eval has no task {missing}",
            "list its tasks with 'gptwo eval harness ls tasks', or pass --include_path DIR for your own",
        ) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
