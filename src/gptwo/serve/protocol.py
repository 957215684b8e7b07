"""The OpenAI completions API as pydantic models: what requests may hold and what responses look like.

Only the legacy `/v1/completions` shape is served (GPT-2 is not a chat model). Besides OpenAI's fields
it takes the extension keys vLLM's clients send (`EXTENSIONS`); those gptwo does not implement are
accepted only at their neutral value (`NEUTRAL`), anything else there is a 400, never ignored.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from gptwo.serve.params import SamplingParams
from gptwo.text import MAX_STOP_CHARS, MAX_STOPS, invalid_text
from gptwo.watermark import MAX_CONTEXT_WIDTH, MAX_KEY

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS_TOKENS = 1024  # entries in one logit_bias
MAX_BEST_OF = 128
CODES = (
    "string_above_max_length",
    "array_above_max_length",
    "invalid_text",
)  # our validators' error types = OpenAI codes


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = Field(default=False, description="a last chunk with usage; the others usage: null")
    continuous_usage_stats: bool | None = Field(
        default=False, description="vLLM extension: with include_usage, every chunk carries the usage so far"
    )
    include_obfuscation: bool | None = Field(
        default=None, description="accepted (OpenAI's); gptwo adds no obfuscation padding to chunks"
    )


class WatermarkRequest(BaseModel):
    """The `watermark` extension as an object: settings left out take the server's (its key, else
    transformers' defaults)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: int | None = Field(default=None, ge=0, le=MAX_KEY, description="the secret seeding the green lists")
    gamma: float | None = Field(default=None, gt=0.0, lt=1.0, description="green share of the vocabulary (0.25)")
    delta: float | None = Field(default=None, ge=0.0, allow_inf_nan=False, description="green logits' bias (2.0)")
    scheme: Literal["lefthash", "selfhash"] | None = Field(default=None, description="lefthash (default) or selfhash")
    context_width: int | None = Field(
        default=None, ge=1, le=MAX_CONTEXT_WIDTH, description="tokens hashed into the seed (1)"
    )

    def settings(self) -> dict:
        """The settings this request names."""
        return self.model_dump(exclude_none=True)


def watermark_request(value):
    """A request's `watermark` as given (None, true, false) or as a checked WatermarkRequest."""
    if value is None or isinstance(value, bool | WatermarkRequest):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError(
            "invalid_watermark",
            "watermark must be true, false or an object of settings (key, gamma, delta, scheme, context_width)",
        )
    try:
        return WatermarkRequest.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        why = {"where": where, "why": first["msg"]}
        raise PydanticCustomError("invalid_watermark", "watermark.{where}: {why}", why) from None


class CompletionRequest(BaseModel):
    """POST /v1/completions. `top_k` is an extension (as in vLLM); -1 or null means off. Unknown fields are errors.

    Types are strict, as JSON has them: "4" and true are not integers, "0.5" is not a number.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="the served model's id (see GET /v1/models)")
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        default="", description="text, texts, token ids, or lists of token ids; empty text means <|endoftext|>"
    )
    max_tokens: int | None = Field(default=16, ge=0, description="tokens to generate per choice (default 16)")
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float | None = Field(
        default=1.0, ge=0.0, le=1.0, description="nucleus sampling mass (0, as OpenAI takes it: the most likely token)"
    )
    top_k: int | None = Field(
        default=None, ge=-1, description="sample from the k most likely tokens; -1, 0 or null: all"
    )
    n: int | None = Field(default=1, ge=1, le=128, description="choices per prompt")
    best_of: int | None = Field(
        default=None,
        ge=1,
        le=MAX_BEST_OF,
        description="candidates per prompt (>= n): the n of highest cumulative logprob are returned; not with stream",
    )
    stop: StrictStr | list[StrictStr] | None = Field(
        default=None,
        description=f"up to {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters that end a choice "
        "(not returned)",
    )
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64, description="makes sampling reproducible")
    stream: bool | None = Field(default=False, description="send server-sent events, ending with data: [DONE]")
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="top alternatives per token (raw model log-probabilities)"
    )
    echo: bool | None = Field(default=False, description="return the prompt before the completion")
    presence_penalty: float | None = Field(
        default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False, description="minus this for each token already produced"
    )
    frequency_penalty: float | None = Field(
        default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False, description="minus this times each token's count so far"
    )
    logit_bias: dict[str, float] | None = Field(
        default=None,
        description=f"token id (as a string) -> bias added to its logit, clipped to [-100, 100]; -100 bans it "
        f"(at most {MAX_LOGIT_BIAS_TOKENS} tokens)",
    )
    suffix: str | None = Field(default=None, description="not supported")
    # vLLM's extensions (its CompletionRequest's sampling parameters), implemented
    repetition_penalty: float | None = Field(
        default=None,
        gt=0.0,
        allow_inf_nan=False,
        description="extension: logits of tokens in the prompt or output divided by it (multiplied when negative)",
    )
    min_tokens: int | None = Field(default=0, ge=0, description="extension: end-of-text is banned until this many")
    ignore_eos: bool | None = Field(default=False, description="extension: end-of-text does not end the choice")
    skip_special_tokens: bool | None = Field(
        default=True, description="extension: with ignore_eos, an end-of-text adds no text (false: <|endoftext|>)"
    )
    add_special_tokens: bool | None = Field(
        default=True, description="extension: GPT-2's tokenizer adds no special tokens, so both values do the same"
    )
    request_id: str | None = Field(default=None, max_length=256, description="extension: accepted, not used")
    # vLLM's extensions accepted only at their neutral value (NEUTRAL)
    use_beam_search: bool | None = None
    min_p: float | None = None
    length_penalty: float | None = None
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[StrictInt] | None = None
    prompt_logprobs: int | None = None
    detokenize: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    priority: int | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    watermark: bool | WatermarkRequest | None = Field(
        default=None,
        description="gptwo extension: watermark the completion (Kirchenbauer et al., as transformers does it): "
        "true, or an object of settings (key, gamma, delta, scheme, context_width)",
    )

    @field_validator("watermark", mode="before")
    @classmethod
    def _watermark_settings(cls, value):
        """true, false or an object of settings, with one clear message for anything else."""
        return watermark_request(value)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt):
        """One clear message for a prompt of the wrong shape (pydantic's would name each member of the union)."""
        if prompt is None:
            raise PydanticCustomError(
                "invalid_prompt", "prompt is null: send a string, strings, token ids or lists of token ids"
            )
        if isinstance(prompt, str) or (isinstance(prompt, list) and _prompt_list(prompt)):
            return prompt
        raise PydanticCustomError(
            "invalid_prompt",
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        )

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, bias):
        if not bias:
            return bias
        if len(bias) > MAX_LOGIT_BIAS_TOKENS:
            raise PydanticCustomError(
                "array_above_max_length",
                "logit_bias has {n} tokens, at most {limit} are allowed",
                {"n": len(bias), "limit": MAX_LOGIT_BIAS_TOKENS},
            )
        for key, value in bias.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 12):
                raise PydanticCustomError(
                    "invalid_logit_bias", 'logit_bias key {key!r} is not a token id (such as "50256")', {"key": key}
                )
            if not math.isfinite(value):
                raise PydanticCustomError("invalid_logit_bias", "logit_bias values must be finite numbers")
        return bias

    @field_validator("prompt")
    @classmethod
    def _prompt_is_text(cls, prompt):
        for text in [prompt] if isinstance(prompt, str) else prompt:
            why = isinstance(text, str) and invalid_text(text)
            if why:
                raise PydanticCustomError("invalid_text", "the prompt is not valid text: {why}", {"why": why})
        return prompt

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise PydanticCustomError(
                "array_above_max_length",
                "array too long: {n} stop strings, at most {limit} are allowed",
                {"n": len(stops), "limit": MAX_STOPS},
            )
        for text in stops:
            if len(text) > MAX_STOP_CHARS:
                raise PydanticCustomError(
                    "string_above_max_length",
                    "string too long: a stop string has {n} characters, at most {limit} are allowed",
                    {"n": len(text), "limit": MAX_STOP_CHARS},
                )
            why = invalid_text(text)
            if why:
                raise PydanticCustomError("invalid_text", "a stop string is not valid text: {why}", {"why": why})
        return stop

    def sampling_params(self) -> SamplingParams:
        """The engine's view of this request (defaults filled in, "off" values as None)."""
        n = self.n or 1
        return SamplingParams(
            max_tokens=16 if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            # top_p 0 keeps the smallest set of tokens reaching mass 0: the most likely one (top_k 1)
            top_k=1 if self.top_p == 0 else self.top_k if self.top_k and self.top_k > 0 else None,
            top_p=self.top_p if self.top_p not in (None, 0.0, 1.0) else None,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            seed=self.seed,
            logprobs=self.logprobs,
            prompt_logprobs=bool(self.echo) and self.logprobs is not None,
            watermark=self.watermark.settings() if isinstance(self.watermark, WatermarkRequest) else self.watermark,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=tuple(
                (int(token), min(max(float(bias), -100.0), 100.0)) for token, bias in (self.logit_bias or {}).items()
            ),
            min_tokens=self.min_tokens or 0,
            ignore_eos=bool(self.ignore_eos),
            skip_special_tokens=self.skip_special_tokens is not False,
            best_of=self.best_of if self.best_of is not None and self.best_of > n else None,
        )

    def candidates(self) -> int:
        """Choices generated per prompt: best_of when it is more than n."""
        return max(self.n or 1, self.best_of or 1)

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, message) for a parameter set to something gptwo does not do, if any."""
        if self.suffix:
            return "suffix", "suffix is not supported by gptwo: GPT-2 only continues text; leave it out"
        n = self.n or 1
        if self.best_of is not None and self.best_of < n:
            return "best_of", f"best_of={self.best_of} is less than n={n}: best_of must be at least n"
        if self.best_of is not None and self.best_of > n and self.stream:
            return "best_of", "best_of > n cannot be streamed (the best are known only at the end): drop stream"
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            return "min_tokens", f"min_tokens={self.min_tokens} is more than max_tokens={self.max_tokens}"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        for name, (is_neutral, neutral) in NEUTRAL.items():
            value = getattr(self, name)
            if value is not None and not is_neutral(value):
                return name, f"{name}={json.dumps(value)} is not supported by gptwo: send {neutral} or leave it out"
        return None


def _prompt_list(prompt: list) -> bool:
    """Whether `prompt` is a list of strings, of token ids, or of lists of token ids (or empty)."""

    def ids(items) -> bool:
        return isinstance(items, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in items)

    return all(isinstance(p, str) for p in prompt) or ids(prompt) or all(ids(p) for p in prompt)


# vLLM's extension keys gptwo takes only at the value that changes nothing: (test, the neutral value as told)
NEUTRAL = {
    "use_beam_search": (lambda v: v is False, "false"),
    "min_p": (lambda v: v == 0, "0"),
    "length_penalty": (lambda v: v == 1, "1"),
    "stop_token_ids": (lambda v: v == [], "[]"),
    "include_stop_str_in_output": (lambda v: v is False, "false"),
    "spaces_between_special_tokens": (lambda v: v is True, "true"),
    "truncate_prompt_tokens": (lambda v: False, "null"),
    "allowed_token_ids": (lambda v: False, "null"),
    "prompt_logprobs": (lambda v: False, "null (echo with logprobs scores the prompt)"),
    "detokenize": (lambda v: v is True, "true"),
    "return_tokens_as_token_ids": (lambda v: v is False, "false"),
    "priority": (lambda v: v == 0, "0"),
    "response_format": (lambda v: v == {"type": "text"}, '{"type": "text"}'),
}
# vLLM's extension keys gptwo implements
EXTENSIONS = (
    "top_k",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "skip_special_tokens",
    "add_special_tokens",
    "request_id",
    "watermark",
)


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class Choice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """A whole completion, or (with stream) one chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptwo"
    max_model_len: int
    parent: str | None = None  # a LoRA adapter's base model (as vLLM lists adapters); None for the base


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
