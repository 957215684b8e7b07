"""The OpenAI completions API as pydantic models: what requests may hold and what responses look like.

Only the legacy `/v1/completions` shape is served (GPT-2 is not a chat model). Parameters that
gptwo cannot honour (penalties, logit_bias, suffix, best_of > n) are rejected, never ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from gptwo.serve.params import SamplingParams
from gptwo.text import MAX_STOP_CHARS, MAX_STOPS, invalid_text
from gptwo.watermark import MAX_CONTEXT_WIDTH, MAX_KEY

MAX_LOGPROBS = 20
CODES = (
    "string_above_max_length",
    "array_above_max_length",
    "invalid_text",
)  # our validators' error types = OpenAI codes


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


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
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int | None = Field(
        default=None, ge=-1, description="sample from the k most likely tokens; -1, 0 or null: all"
    )
    n: int | None = Field(default=1, ge=1, le=128, description="choices per prompt")
    best_of: int | None = Field(default=None, ge=1, description="accepted only when equal to n")
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
    presence_penalty: float | None = Field(default=0.0, description="not supported: must be 0")
    frequency_penalty: float | None = Field(default=0.0, description="not supported: must be 0")
    logit_bias: dict[str, float] | None = Field(default=None, description="not supported: must be empty")
    suffix: str | None = Field(default=None, description="not supported")
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
        return SamplingParams(
            max_tokens=16 if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k if self.top_k and self.top_k > 0 else None,
            top_p=self.top_p if self.top_p not in (None, 1.0) else None,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            seed=self.seed,
            logprobs=self.logprobs,
            prompt_logprobs=bool(self.echo) and self.logprobs is not None,
            watermark=self.watermark.settings() if isinstance(self.watermark, WatermarkRequest) else self.watermark,
        )

    def unsupported(self) -> str | None:
        """The name of a parameter set to something gptwo does not do, if any."""
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty" if self.presence_penalty else "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        if self.suffix:
            return "suffix"
        if self.best_of is not None and self.best_of != (self.n or 1):
            return "best_of"
        return None


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
