"""OpenAI's completions and chat completions APIs as pydantic models: what requests may hold and what responses
look like.

Chat is served for models that carry a chat template (gptwo.chat renders the messages into one prompt).
Besides OpenAI's fields both take the extension keys vLLM's clients send (`EXTENSIONS`); those gptwo does
not implement are accepted only at their neutral value (`NEUTRAL`, `CHAT_NEUTRAL`), anything else there is
a 400, never ignored.
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


class SamplingRequest(BaseModel):
    """What /v1/completions and /v1/chat/completions share: the model, the sampling controls, streaming, and
    vLLM's extensions. `top_k` is an extension (as in vLLM); -1 or null means off. Unknown fields are errors.

    Types are strict, as JSON has them: "4" and true are not integers, "0.5" is not a number.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="the served model's id (see GET /v1/models)")
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float | None = Field(
        default=1.0, ge=0.0, le=1.0, description="nucleus sampling mass (0, as OpenAI takes it: the most likely token)"
    )
    top_k: int | None = Field(
        default=None, ge=-1, description="sample from the k most likely tokens; -1, 0 or null: all"
    )
    n: int | None = Field(default=1, ge=1, le=128, description="choices per prompt")
    stop: StrictStr | list[StrictStr] | None = Field(
        default=None,
        description=f"up to {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters that end a choice "
        "(not returned)",
    )
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64, description="makes sampling reproducible")
    stream: bool | None = Field(default=False, description="send server-sent events, ending with data: [DONE]")
    stream_options: StreamOptions | None = None
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
    # vLLM's extensions (its sampling parameters), implemented
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

    def _sampling_params(
        self, max_tokens: int, logprobs: int | None, prompt_logprobs: bool = False, best_of: int | None = None
    ) -> SamplingParams:
        """The engine's view of the shared fields (defaults filled in, "off" values as None)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            # top_p 0 keeps the smallest set of tokens reaching mass 0: the most likely one (top_k 1)
            top_k=1 if self.top_p == 0 else self.top_k if self.top_k and self.top_k > 0 else None,
            top_p=self.top_p if self.top_p not in (None, 0.0, 1.0) else None,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            seed=self.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
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
            best_of=best_of,
        )

    def _unsupported(self, max_tokens: int | None, neutral: dict) -> tuple[str, str] | None:
        """(parameter, message) for a shared field set to something gptwo does not do, if any."""
        if self.min_tokens and max_tokens is not None and self.min_tokens > max_tokens:
            return "min_tokens", f"min_tokens={self.min_tokens} is more than max_tokens={max_tokens}"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        for name, (is_neutral, value_told) in neutral.items():
            value = getattr(self, name)
            if value is not None and not is_neutral(value):
                return name, f"{name}={json.dumps(value)} is not supported by gptwo: send {value_told} or leave it out"
        return None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: prompts to continue."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        default="", description="text, texts, token ids, or lists of token ids; empty text means <|endoftext|>"
    )
    max_tokens: int | None = Field(default=16, ge=0, description="tokens to generate per choice (default 16)")
    best_of: int | None = Field(
        default=None,
        ge=1,
        le=MAX_BEST_OF,
        description="candidates per prompt (>= n): the n of highest cumulative logprob are returned; not with stream",
    )
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="top alternatives per token (raw model log-probabilities)"
    )
    echo: bool | None = Field(default=False, description="return the prompt before the completion")
    suffix: str | None = Field(default=None, description="not supported")

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

    @field_validator("prompt")
    @classmethod
    def _prompt_is_text(cls, prompt):
        for text in [prompt] if isinstance(prompt, str) else prompt:
            why = isinstance(text, str) and invalid_text(text)
            if why:
                raise PydanticCustomError("invalid_text", "the prompt is not valid text: {why}", {"why": why})
        return prompt

    def sampling_params(self) -> SamplingParams:
        """The engine's view of this request (defaults filled in, "off" values as None)."""
        n = self.n or 1
        return self._sampling_params(
            max_tokens=16 if self.max_tokens is None else self.max_tokens,
            logprobs=self.logprobs,
            prompt_logprobs=bool(self.echo) and self.logprobs is not None,
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
        return self._unsupported(self.max_tokens, NEUTRAL)


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


# chat: roles gptwo's templates read (developer is OpenAI's newer name for system, and is read as system)
CHAT_ROLES = ("system", "developer", "user", "assistant")
# template variables a request's chat_template_kwargs may not set (the server sets them)
RESERVED_TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "bos_token", "eos_token", "unk_token")


class TextPart(BaseModel):
    """One of OpenAI's content parts; only text ones are read."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: str = Field(description="system, developer (read as system), user or assistant")
    content: StrictStr | list[TextPart] = Field(description="text, or OpenAI's content parts of type text (joined)")
    name: StrictStr | None = Field(default=None, description="not supported: the chat template has no place for it")
    # OpenAI's tool and audio fields: only empty (gptwo serves no tools), so a tool message is refused for its role
    tool_calls: Any = Field(default=None, description="not supported: only null or []")
    tool_call_id: Any = Field(default=None, description="not supported: only null")
    function_call: Any = Field(default=None, description="not supported: only null")
    refusal: Any = Field(default=None, description="not supported: only null")
    audio: Any = Field(default=None, description="not supported: only null")

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, role):
        if isinstance(role, str) and role in CHAT_ROLES:
            return role
        if role in ("tool", "function"):
            raise PydanticCustomError(
                "invalid_role",
                "role '{role}' is not supported: gptwo serves no tools; send system, developer, user or assistant "
                "messages",
                {"role": role},
            )
        raise PydanticCustomError(
            "invalid_role", "role must be one of system, developer, user, assistant, not {role}", {"role": repr(role)}
        )

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, content):
        """One clear message for content that is not text (pydantic's would name each member of the union)."""
        if isinstance(content, str):
            return content
        if isinstance(content, list) and content and all(isinstance(part, dict) for part in content):
            for part in content:
                if part.get("type") != "text":
                    raise PydanticCustomError(
                        "invalid_content",
                        "content holds a part of type {type}: gptwo models read text parts only",
                        {"type": json.dumps(part.get("type"))},
                    )
            return content
        raise PydanticCustomError(
            "invalid_content", 'content must be a string or a list of text parts ({"type": "text", "text": "..."})'
        )

    @field_validator("content")
    @classmethod
    def _content_is_text(cls, content):
        why = invalid_text(content if isinstance(content, str) else "".join(part.text for part in content))
        if why:
            raise PydanticCustomError("invalid_text", "the message is not valid text: {why}", {"why": why})
        return content

    def as_dict(self) -> dict[str, str]:
        """{"role", "content"} as chat templates read it: parts joined, developer as system."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions: a conversation, rendered by the served model's chat template, to be answered."""

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_completion_tokens: int | None = Field(
        default=None, ge=0, description="tokens per choice (default: what the context leaves after the messages)"
    )
    max_tokens: int | None = Field(default=None, ge=0, description="the older name of max_completion_tokens")
    logprobs: bool | None = Field(default=False, description="each generated token's log-probability")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="with logprobs: the most likely alternatives per token"
    )
    parallel_tool_calls: bool | None = Field(default=None, description="accepted; no tools are served, so no effect")
    # vLLM's chat extensions
    add_generation_prompt: bool | None = Field(
        default=True, description="extension: end the prompt with the assistant's cue (the template's)"
    )
    continue_final_message: bool | None = Field(
        default=False,
        description="extension: the prompt ends inside the last message, which the answer continues "
        "(needs add_generation_prompt: false)",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="extension: more variables for the chat template"
    )
    chat_template: str | None = Field(default=None, description="extension: not supported (the server's is used)")
    # OpenAI's chat fields gptwo takes only at their neutral value (CHAT_NEUTRAL)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    store: bool | None = None

    def completion_tokens(self) -> int | None:
        """The tokens per choice asked for (max_completion_tokens, else max_tokens), or None for the default."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's view of this request, with `max_tokens` resolved against the rendered prompt."""
        return self._sampling_params(max_tokens, logprobs=(self.top_logprobs or 0) if self.logprobs else None)

    def template_variables(self) -> dict[str, Any]:
        """chat_template_kwargs: the variables the template gets besides the server's."""
        return dict(self.chat_template_kwargs or {})

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, message) for a parameter set to something gptwo does not do, if any."""
        for index, message in enumerate(self.messages):
            if message.name is not None:
                return f"messages.{index}.name", (
                    "a message's name is not supported by gptwo: the chat template has no place for it; leave it out"
                )
            for name in ("tool_calls", "tool_call_id", "function_call", "refusal", "audio"):
                value = getattr(message, name)
                if value is not None and value != []:
                    return f"messages.{index}.{name}", (
                        f"a message's {name} is not supported by gptwo: it serves no tools or audio; leave it out"
                    )
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if self.continue_final_message and self.add_generation_prompt is not False:
            return "continue_final_message", (
                "continue_final_message continues the last message, so it needs add_generation_prompt: false"
            )
        if self.chat_template is not None:
            return "chat_template", (
                "a request's own chat_template is not supported by gptwo: the server's (the model's or "
                "--chat-template) is used; leave it out"
            )
        reserved = [key for key in self.template_variables() if key in RESERVED_TEMPLATE_VARIABLES]
        if reserved:
            return "chat_template_kwargs", f"chat_template_kwargs may not set {reserved[0]}: the server sets it"
        return self._unsupported(self.completion_tokens(), CHAT_NEUTRAL)


# what chat takes only at the neutral value: vLLM's keys (as for completions) and OpenAI's tools, audio, ...
CHAT_NEUTRAL = {
    **NEUTRAL,
    "prompt_logprobs": (lambda v: False, "null"),
    "tools": (lambda v: v == [], "[] (gptwo serves no tools)"),
    "tool_choice": (lambda v: v in ("none", "auto"), '"none" (gptwo serves no tools)'),
    "functions": (lambda v: v == [], "[] (gptwo serves no tools)"),
    "function_call": (lambda v: v in ("none", "auto"), '"none" (gptwo serves no tools)'),
    "audio": (lambda v: False, "null (gptwo models read and write text)"),
    "modalities": (lambda v: v == ["text"], '["text"]'),
    "prediction": (lambda v: False, "null"),
    "web_search_options": (lambda v: False, "null"),
    "reasoning_effort": (lambda v: False, "null"),
    "store": (lambda v: v is False, "false (gptwo stores nothing)"),
}


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletion(BaseModel):
    """A whole chat completion (with stream, chunks of object chat.completion.chunk whose choices hold a delta)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
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
