"""The HTTP side: OpenAI-compatible completions and chat completions APIs and a playground page, on FastAPI + uvicorn.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (for a model with a chat template), `GET /v1/models`,
`GET /v1/models/{id}`, `POST /tokenize` (as vLLM's), `GET /health`, `GET /` (playground), and the OpenAPI
schema at `/openapi.json`. Every error is OpenAI's JSON shape
`{"error": {"message", "type", "param", "code"}}`; bodies over `max_body_bytes` get 413 (with a
Content-Length or chunked), a body that does not arrive within `body_timeout` seconds 408, a body
that is not UTF-8 400, a full queue or a client over its share 429, a missing or wrong API key
(when one is set) 401, and a client that goes away cancels its sequences. Header limits and
timeouts are the connection's (gptwo.serve.connection).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import difflib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from importlib import resources

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptwo.chat import check_template, continued_text, render
from gptwo.errors import GptwoError
from gptwo.infer.prepare import prepared_settings
from gptwo.runtime import dtype_name, resolve_device, resolve_dtype
from gptwo.serve import protocol
from gptwo.serve.connection import GracefulServer, check_max_connections, default_max_connections, uvicorn_config
from gptwo.serve.engine import (
    SHUTTING_DOWN,
    BatchEngine,
    ClientBusy,
    Draining,
    Overloaded,
    RequestRejected,
    TokenLogprob,
    Update,
)
from gptwo.serve.engine import Request as EngineRequest
from gptwo.serve.inspect import inspect_router
from gptwo.serve.limits import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    KEEP_ALIVE_TIMEOUT_S,
    LONG_PREFILL_TOKENS,
    MAX_BATCHED_TOKENS,
    MAX_CLIENT_CHOICES,
    MAX_INSPECT_TOKENS,
    MAX_REQUEST_CHOICES,
    SHUTDOWN_TIMEOUT_S,
)
from gptwo.serve.metrics import prometheus_text
from gptwo.tokenizer import Tokenizer
from gptwo.watermark import WatermarkSettings

log = logging.getLogger("gptwo.serve")
NO_CHAT_TEMPLATE = (
    "{model} has no chat template, so it cannot answer messages — serve it with --chat-template FILE or train it "
    "on chat data (gptwo prepare chat), or send a prompt to /v1/completions"
)


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


class EscapedJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error that quotes the request (a lone surrogate in `model`) always renders."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    return EscapedJSONResponse(
        {"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status, headers=headers
    )


def not_utf8(body: bytes) -> str | None:
    """Why `body` is not UTF-8 text (JSON's encoding on the wire), or None."""
    if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "it starts with a UTF-16 byte order mark"
    if b"\x00" in body:
        return "it holds NUL bytes, as UTF-16 or UTF-32 text does"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"byte 0x{body[err.start]:02x} at offset {err.start} is not UTF-8"
    return None


class BodyLimit:
    """ASGI middleware: read a request body whole, then hand it on; or refuse it.

    413 when it is larger than `max_bytes` (declared in Content-Length or not), 408 when it does not
    arrive within `timeout` seconds, 400 when it is not UTF-8. Refusals close the connection (the
    connection drops what the client still sends, see gptwo.serve.connection).
    """

    def __init__(self, app, max_bytes: int, timeout: float = BODY_TIMEOUT_S):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        body = bytearray()
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        deadline = asyncio.get_running_loop().time() + self.timeout
        more = not too_large
        while more and len(body) <= self.max_bytes:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                return await self._refuse(
                    scope,
                    receive,
                    send,
                    408,
                    f"the request body did not arrive within {self.timeout:g} seconds",
                    "request_timeout",
                )
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if too_large or len(body) > self.max_bytes:
            message = f"the request body is larger than {self.max_bytes} bytes, the server's limit"
            return await self._refuse(scope, receive, send, 413, message, "request_too_large")
        why = not_utf8(bytes(body))
        if why:
            message = f"the request body is not UTF-8 ({why}); send JSON encoded as UTF-8"
            return await self._refuse(scope, receive, send, 400, message, "invalid_encoding")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope, receive, send, status: int, message: str, code: str) -> None:
        response = error_response(status, message, code=code, headers={"Connection": "close"})
        await response(scope, receive, send)


class ApiKeyAuth:
    """ASGI middleware: every `/v1/*` and `/tokenize` request must carry `Authorization: Bearer <key>`, else 401
    (OpenAI's shape).

    Other routes (the playground page, /health, the OpenAPI schema) stay open, as in vLLM; CORS
    preflights (OPTIONS, which browsers send without credentials) pass through.
    """

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and _needs_key(scope["path"]):
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                message = (
                    "Incorrect API key provided"
                    if given
                    else "You didn't provide an API key: send it in an Authorization header "
                    "(Authorization: Bearer YOUR_KEY)"
                )
                response = error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _needs_key(path: str) -> bool:
    return (path + "/").startswith(("/v1/", "/tokenize/"))


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): the token ids a completions prompt becomes, so a client can fit max_tokens to
    the context."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="the served model's id; optional")
    prompt: StrictStr | list[StrictInt] = Field(description="a prompt as /v1/completions takes one")


def parse_origins(values: Sequence[str]) -> list[str]:
    """Origins for CORS from repeated and/or comma-separated values; each must be `*` or scheme://host[:port]."""
    origins = [o.strip() for value in values for o in value.split(",") if o.strip()]
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise GptwoError(
                f"--allowed-origins '{origin}' is not an origin",
                "write scheme://host[:port] with no path or trailing slash, e.g. http://localhost:3000 (or * for any)",
            )
    return origins


class ChoiceText:
    """One choice's text and OpenAI logprobs, built from engine updates (prompt first when echoing)."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], echo: bool, logprobs: bool):
        self.tokenizer, self.prompt, self.echo, self.logprobs = tokenizer, prompt, echo, logprobs
        self.started, self.finish_reason, self.completion_tokens = False, None, 0
        self.cumulative_logprob = 0.0  # of the generated tokens under the model (what best_of ranks by)
        self._chars = 0  # characters of the choice's text before the next token (for text_offset)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def take(self, update: Update) -> tuple[str, dict | None]:
        """The text and logprobs (or None) that `update` adds to this choice."""
        text, infos = update.text, list(update.tokens)
        if not self.started:
            self.started = True
            if self.echo:
                text = self.tokenizer.decode(self.prompt) + text
                infos = (update.prompt or [TokenLogprob(t, None, None) for t in self.prompt]) + infos
        self.completion_tokens += len(update.tokens)
        self.cumulative_logprob += sum(info.logprob for info in update.tokens if info.logprob is not None)
        self.finish_reason = update.finish_reason or self.finish_reason
        return text, self._logprobs(infos) if self.logprobs else None

    def _logprobs(self, infos: list[TokenLogprob]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for info in infos:
            out["tokens"].append(self.tokenizer.decode([info.token]))
            out["token_logprobs"].append(info.logprob)
            out["top_logprobs"].append(None if info.top is None else self._named(info.top))
            out["text_offset"].append(self._chars)
            self._chars += len(self._decoder.decode(self.tokenizer.token_bytes(info.token)))
        return out

    def _named(self, top: dict[int, float]) -> dict[str, float]:
        named: dict[str, float] = {}
        for token, logprob in top.items():
            name = self.tokenizer.decode([token])
            named[name] = max(logprob, named.get(name, float("-inf")))
        return named


def _merge_logprobs(total: dict | None, part: dict | None) -> dict | None:
    if part is None:
        return total
    if total is None:
        return {key: list(values) for key, values in part.items()}
    for key, values in part.items():
        total[key].extend(values)
    return total


def validation_error(errors: list[dict]) -> dict:
    """OpenAI's message / param / code for pydantic's errors: unknown fields first (naming a close known one)."""
    errors = sorted(errors, key=lambda e: e.get("type") != "extra_forbidden") or [
        {"loc": (), "msg": "invalid request", "type": ""}
    ]
    first = errors[0]
    if first["type"] == "json_invalid":  # its loc is the character position, not a field
        why = (first.get("ctx") or {}).get("error", "")
        message = f"the request body is not valid JSON ({why})" if why else "the request body is not valid JSON"
        return {"message": message, "param": None, "code": None}
    where = ".".join(str(part) for part in first["loc"] if part != "body")
    if first["type"] == "extra_forbidden":
        known = [
            *protocol.CompletionRequest.model_fields,
            *protocol.ChatCompletionRequest.model_fields,
            *protocol.ChatMessage.model_fields,
            *protocol.StreamOptions.model_fields,
        ]
        close = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return {"message": f"Unknown parameter: '{where}'{hint}", "param": where, "code": "unknown_parameter"}
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return {
        "message": message,
        "param": where or None,
        "code": first["type"] if first["type"] in protocol.CODES else None,
    }


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def prompt_list(prompt) -> list:
    """The prompts of a request's `prompt` field, each a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is an empty list", param="prompt")
    return [prompt] if isinstance(prompt[0], int) else list(prompt)


def chat_prompt_ids(tokenizer: Tokenizer, body: protocol.ChatCompletionRequest, template: str) -> list[int]:
    """Token ids of a chat request's conversation rendered by `template`: with the assistant's cue at the end,
    without it (add_generation_prompt: false), or ending inside the last message (continue_final_message)."""
    messages, variables = [message.as_dict() for message in body.messages], body.template_variables()
    try:
        if body.continue_final_message:
            text = continued_text(messages, template, variables)
        else:
            text = render(messages, template, body.add_generation_prompt is not False, variables=variables)
    except GptwoError as err:
        raise ApiError(400, str(err), param="messages") from None
    return tokenizer.encode(text)


def encode_prompts(tokenizer: Tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each prompt: text is encoded ("" means <|endoftext|>), token ids pass through."""
    return [(tokenizer.encode(p) if p else [tokenizer.eot_token]) if isinstance(p, str) else list(p) for p in prompts]


class CompletionJob:
    """An accepted completions request: the engine's updates turned into a response or a stream of chunks.

    The response's shape is in `object`, `chunk_object` and the choice hooks (`opening`, `chunk_choices`,
    `final_choice`); ChatJob gives chat's."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(
        self,
        engine: BatchEngine,
        job: EngineRequest,
        tokenizer: Tokenizer,
        prompts: list[list[int]],
        n: int,
        echo: bool,
        logprobs: bool,
        model_name: str,
        keep: int | None = None,
    ):
        """`n` choices per prompt run; the `keep` (default all) of highest cumulative logprob are answered."""
        self.engine, self.job, self.prompts = engine, job, prompts
        self.n, self.keep = n, n if keep is None else keep
        self.choices = [ChoiceText(tokenizer, prompts[i // n], echo, logprobs) for i in range(len(prompts) * n)]
        self.head = {"id": f"{self.id_prefix}{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

    def usage(self) -> dict:
        prompt_tokens, completion_tokens = sum(map(len, self.prompts)), sum(c.completion_tokens for c in self.choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def updates(self) -> AsyncIterator[tuple[Update, str, dict | None]]:
        """Each update with the text and logprobs it adds to its choice, until every choice has finished."""
        left = len(self.choices)
        while left:
            update = await self.job.queue.get()
            if update.shutting_down:  # ended by a restart, not by the request: the client may send it again
                raise ApiError(
                    503, f"{SHUTTING_DOWN}; send the request again", type="server_error", code="shutting_down"
                )
            if update.error is not None:
                raise ApiError(500, f"generation failed: {update.error}", type="server_error")
            left -= update.finish_reason is not None
            yield (update, *self.choices[update.index].take(update))

    async def events(self, include_usage: bool, continuous_usage: bool = False) -> AsyncIterator[str]:
        """Server-sent events: a chunk per update, optionally a usage chunk, then [DONE].

        With `include_usage` the other chunks carry `usage: null` (as OpenAI's), or with `continuous_usage`
        (vLLM's continuous_usage_stats) the usage so far."""
        head = {"id": self.head["id"], "object": self.chunk_object, **self.head}

        def chunk(choice: dict) -> str:
            usage = {"usage": self.usage() if continuous_usage else None} if include_usage else {}
            return f"data: {json.dumps({**head, 'choices': [choice], **usage})}\n\n"

        try:
            for choice in self.opening():
                yield chunk(choice)
            async for update, text, logprobs in self.updates():
                for choice in self.chunk_choices(update, text, logprobs):
                    yield chunk(choice)
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': self.usage()})}\n\n"
        except ApiError as err:
            error = {"message": err.message, "type": err.type, "param": None, "code": err.code}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            self.engine.cancel(self.job)  # frees the rows if the client went away mid-stream
        yield "data: [DONE]\n\n"

    def opening(self) -> list[dict]:
        """Stream choices sent before any token."""
        return []

    def chunk_choices(self, update: Update, text: str, logprobs: dict | None) -> list[dict]:
        """The stream's choices for one update."""
        if not (text or logprobs or update.finish_reason):
            return []
        return [{"index": update.index, "text": text, "logprobs": logprobs, "finish_reason": update.finish_reason}]

    def final_choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        """One choice of the whole response."""
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    async def collect(self) -> dict:
        """The whole response body."""
        texts, logprobs = [""] * len(self.choices), [None] * len(self.choices)
        async for update, text, part in self.updates():
            texts[update.index] += text
            logprobs[update.index] = _merge_logprobs(logprobs[update.index], part)
        choices = [
            self.final_choice(i, text, part, choice.finish_reason)
            for i, (text, part, choice) in enumerate(zip(texts, logprobs, self.choices))
        ]
        if self.keep < self.n:  # best_of: each prompt's best `keep` candidates, best first
            best = []
            for start in range(0, len(choices), self.n):
                ranked = sorted(range(start, start + self.n), key=lambda i: -self.choices[i].cumulative_logprob)
                best += [choices[i] for i in ranked[: self.keep]]
            choices = [{**choice, "index": i} for i, choice in enumerate(best)]
        return {"id": self.head["id"], "object": self.object, **self.head, "choices": choices, "usage": self.usage()}

    async def response(self, request: Request) -> JSONResponse:
        """The whole response, unless the client disconnects first (then its sequences are cancelled)."""
        work, gone = asyncio.ensure_future(self.collect()), asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            finished = work.done() and not work.cancelled()
            if not finished or work.exception() is not None:  # (a failed choice ends the request's others too)
                self.engine.cancel(self.job)
                work.cancel()
        if not finished:  # the client went away first (a cancelled task is only marked so once it runs again)
            return error_response(499, "the client closed the request", code="client_closed")
        return JSONResponse(work.result())


class ChatChoiceText(ChoiceText):
    """One chat choice's text and logprobs in OpenAI's chat shape: {"content": [{token, logprob, bytes,
    top_logprobs}]}, the `top` most likely alternatives per token."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], top: int | None):
        super().__init__(tokenizer, prompt, echo=False, logprobs=top is not None)
        self.top = top or 0

    def _logprobs(self, infos: list[TokenLogprob]) -> dict:
        content = []
        for info in infos:
            ranked = sorted((info.top or {}).items(), key=lambda item: -item[1])[: self.top]
            alternatives = [self._entry(token, logprob) for token, logprob in ranked]
            content.append({**self._entry(info.token, info.logprob), "top_logprobs": alternatives})
        return {"content": content}

    def _entry(self, token: int, logprob: float) -> dict:
        return {
            "token": self.tokenizer.decode([token]),
            "logprob": logprob,
            "bytes": list(self.tokenizer.token_bytes(token)),
        }


class ChatJob(CompletionJob):
    """An accepted chat completions request: choices are assistant messages, stream chunks deltas of them
    (a first one with the role, then the content, then one with the finish reason)."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def __init__(
        self,
        engine: BatchEngine,
        job: EngineRequest,
        tokenizer: Tokenizer,
        prompt: list[int],
        n: int,
        top_logprobs: int | None,
        model_name: str,
    ):
        super().__init__(engine, job, tokenizer, [prompt], n, False, False, model_name)
        self.choices = [ChatChoiceText(tokenizer, prompt, top_logprobs) for _ in range(n)]

    def opening(self) -> list[dict]:
        return [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(len(self.choices))
        ]

    def chunk_choices(self, update: Update, text: str, logprobs: dict | None) -> list[dict]:
        choices, index = [], update.index
        if text or logprobs:
            choices.append({"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None})
        if update.finish_reason:
            choices.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": update.finish_reason})
        return choices

    def final_choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def create_app(
    engine: BatchEngine,
    model_name: str,
    max_body_bytes: int = 1 << 20,
    *,
    api_key: str | None = None,
    allowed_origins: Sequence[str] = (),
    body_timeout: float = BODY_TIMEOUT_S,
    max_inspect_tokens: int = MAX_INSPECT_TOKENS,
    chat_template: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` as model `model_name` (and the LoRA adapters its model carries, each
    under its name: `engine.adapter_names`); its lifespan starts and stops the engine.

    With `api_key`, every /v1/* request needs it as a bearer token; `allowed_origins` are the web
    origins whose pages may call the API from a browser (CORS; none by default); a request body
    must arrive within `body_timeout` seconds; /v1/inspect takes texts of up to `max_inspect_tokens`;
    /v1/chat/completions renders conversations with `chat_template` (without one it answers 400).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(
        title="gptwo",
        summary="OpenAI-compatible completions and chat completions for GPT-2 models",
        version="1",
        lifespan=lifespan,
        redirect_slashes=False,  # /v1/completions/ is a 404 in OpenAI's shape, not a redirect
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout=body_timeout)
    if api_key:  # added later = runs earlier: a request without the key is refused before its body is read
        app.add_middleware(ApiKeyAuth, key=api_key)
    if allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    tokenizer, context = engine.tokenizer, engine.model.config.block_size
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        headers = {"Retry-After": "1"} if err.status in (429, 503) else None
        return error_response(err.status, err.message, err.type, err.param, err.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return error_response(400, **validation_error(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        where = f"{request.method} {request.url.path}"
        if err.status_code == 404 and err.detail == "Not Found":  # no such route (not a handler's own 404)
            message = (
                f"there is no {where} on this server; the API is POST /v1/completions, POST /v1/chat/completions "
                "and GET /v1/models"
            )
            return error_response(404, message, code="not_found")
        if err.status_code == 405:
            message = f"{where} is not allowed; see /openapi.json"
            return error_response(405, message, code="method_not_allowed", headers=err.headers)
        return error_response(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception):
        log.exception("request failed")
        return error_response(500, f"internal error ({type(err).__name__})", type="server_error")

    # POST /v1/inspect and the Inspect page (gptwo.serve.inspect)
    app.include_router(inspect_router(engine, model_name, max_inspect_tokens))

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse((resources.files("gptwo.serve") / "static" / "index.html").read_text(encoding="utf-8"))

    @app.get("/health", summary="Whether the engine runs, and how busy it is")
    async def health() -> JSONResponse:
        weights_dtype = engine.model.transformer.wte.weight.dtype
        state = "draining" if engine.draining else "ok" if engine.alive else "down"
        status = {
            "status": state,
            "model": model_name,
            "dtype": dtype_name(weights_dtype),
            "kv_cache_dtype": dtype_name(engine.cache.k.dtype),
            "quantize": (prepared_settings(engine.model) or {}).get("quantize"),
            "running": engine.running,
            "waiting": engine.waiting,
            **engine.stats,
        }
        return JSONResponse(status, status_code=200 if state == "ok" else 503)

    @app.get("/metrics", summary="Prometheus metrics: requests, KV-cache blocks, prefix-cache hits, tokens, TTFT")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine.metrics(), model_name), media_type="text/plain; version=0.0.4")

    served = served_models(model_name, engine.adapter_names)
    cards = {
        name: protocol.ModelCard(id=name, created=created, max_model_len=context, parent=model_name if slot else None)
        for name, slot in served.items()
    }

    def adapter_slot(requested: str | None) -> int:
        """The LoRA adapter slot of the model a request names (0: the base, also when none is named); an unknown
        one is a 404."""
        if requested is None:
            return 0
        if requested not in served:
            shown = ", ".join(f"`{name}`" for name in served)
            raise ApiError(
                404,
                f"The model `{requested}` does not exist; this server serves {shown}",
                param="model",
                code="model_not_found",
            )
        return served[requested]

    def submit(prompts: list[list[int]], params, n: int, request: Request, adapter: int = 0) -> EngineRequest:
        """Queue the request's choices (on LoRA adapter slot `adapter`), or an ApiError saying why not (OpenAI's
        status and code)."""
        try:
            return engine.submit(prompts, params, n, client=client_of(request), adapter=adapter)
        except RequestRejected as err:
            raise ApiError(400, str(err), param=err.param, code=err.code) from None
        except ClientBusy as err:
            raise ApiError(
                429, f"{err}; wait for your other requests to finish", type="rate_limit_error", code="too_many_choices"
            ) from None
        except Draining:
            raise ApiError(503, f"{SHUTTING_DOWN}; retry shortly", type="server_error", code="shutting_down") from None
        except Overloaded as err:
            raise ApiError(
                429, f"the server is busy ({err}); retry shortly", type="server_overloaded", code="queue_full"
            ) from None

    async def answer(job: CompletionJob, stream: bool, stream_options: protocol.StreamOptions | None, request: Request):
        """The job's stream of server-sent events, or its whole response."""
        if stream:
            options = stream_options or protocol.StreamOptions()
            return StreamingResponse(
                job.events(bool(options.include_usage), bool(options.continuous_usage_stats)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await job.response(request)

    @app.get("/v1/models", response_model=protocol.ModelList, summary="The served models: the base, then its adapters")
    async def models() -> protocol.ModelList:
        return protocol.ModelList(data=list(cards.values()))

    @app.get(
        "/v1/models/{model_id:path}",
        response_model=protocol.ModelCard,
        responses={404: {"model": protocol.ErrorResponse}},
        summary="The served model, by its id (OpenAI's models.retrieve)",
    )
    async def model(model_id: str) -> protocol.ModelCard:
        adapter_slot(model_id)
        return cards[model_id]

    @app.post("/tokenize", summary="The token ids of a prompt, their count and the context (vLLM's /tokenize)")
    async def tokenize(body: TokenizeRequest) -> dict:
        adapter_slot(body.model)  # every served model has the base's tokenizer
        tokens = encode_prompts(tokenizer, [body.prompt])[0]
        return {"count": len(tokens), "max_model_len": context, "tokens": tokens}

    @app.post(
        "/v1/completions",
        response_model=protocol.Completion,
        responses={code: {"model": protocol.ErrorResponse} for code in (400, 404, 408, 413, 429, 500, 503)},
        summary="Complete prompts (OpenAI completions API; stream=true sends server-sent events)",
    )
    async def completions(body: protocol.CompletionRequest, request: Request):
        adapter = adapter_slot(body.model)
        unsupported = body.unsupported()
        if unsupported:
            raise ApiError(400, unsupported[1], param=unsupported[0])
        n, candidates = body.n or 1, body.candidates()
        try:
            texts = prompt_list(body.prompt)
            engine.check_count(len(texts), candidates)  # before encoding: the work stays bounded by the queue
        except RequestRejected as err:
            raise ApiError(400, str(err), param=err.param, code=err.code) from None
        prompts = encode_prompts(tokenizer, texts)
        job = submit(prompts, body.sampling_params(), candidates, request, adapter)
        completion = CompletionJob(
            engine, job, tokenizer, prompts, candidates, bool(body.echo), body.logprobs is not None,
            body.model or model_name, n,
        )  # fmt: skip
        return await answer(completion, bool(body.stream), body.stream_options, request)

    @app.post(
        "/v1/chat/completions",
        response_model=protocol.ChatCompletion,
        responses={code: {"model": protocol.ErrorResponse} for code in (400, 404, 408, 413, 429, 500, 503)},
        summary="Answer a conversation (OpenAI chat completions API) with the model's chat template; stream=true "
        "sends server-sent events",
    )
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
        adapter = adapter_slot(body.model)
        if chat_template is None:
            raise ApiError(400, NO_CHAT_TEMPLATE.format(model=model_name), param="messages", code="no_chat_template")
        unsupported = body.unsupported()
        if unsupported:
            raise ApiError(400, unsupported[1], param=unsupported[0])
        n = body.n or 1
        try:
            engine.check_count(1, n)
        except RequestRejected as err:
            raise ApiError(400, str(err), param=err.param, code=err.code) from None
        prompt = chat_prompt_ids(tokenizer, body, chat_template)
        asked = body.completion_tokens()
        max_tokens = max(context - len(prompt), 1) if asked is None else asked  # by default: to the context's end
        params = body.sampling_params(max_tokens)
        try:
            job = submit([prompt], params, n, request, adapter)
        except ApiError as err:
            if err.code == "context_length_exceeded" and asked is None:
                err.param = "messages"
            raise
        chat = ChatJob(engine, job, tokenizer, prompt, n, params.logprobs, body.model or model_name)
        return await answer(chat, bool(body.stream), body.stream_options, request)

    return app


def served_models(model_name: str, adapter_names: Sequence[str]) -> dict[str, int]:
    """The model ids a server answers to, each with its LoRA adapter slot: the base (0), then each adapter."""
    return {model_name: 0, **{name: slot for slot, name in enumerate(adapter_names, start=1)}}


def client_of(request: Request) -> str:
    """Who sent `request`, for the per-client limits: its remote address."""
    return request.client.host if request.client else ""


def default_model_name(model: str) -> str:
    """The id a served model goes by: a folder's name, or the hub id as given."""
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


def named_adapters(adapters: Sequence[tuple[str | None, str]], model_name: str) -> list[tuple[str, str]]:
    """(name, folder) of each adapter to serve, an unnamed one named after its folder; names must differ from
    each other and from the base model's."""
    named = [(name or os.path.basename(os.path.normpath(folder)), folder) for name, folder in adapters]
    names = [model_name] + [name for name, _ in named]
    for name in names:
        if names.count(name) > 1:
            raise GptwoError(
                f"the model name `{name}` is given to "
                + ("the base model and an adapter" if name == model_name else "two adapters"),
                "give each adapter its own name: --adapter NAME=DIR (or --served-model-name for the base)",
            )
    return named


def served_chat_template(model: str, template_file: str | None = None) -> str | None:
    """The template /v1/chat/completions renders with: `template_file`'s (vLLM's --chat-template), else the
    model's own (its folder's chat_template.jinja or tokenizer_config.json, a GGUF's tokenizer.chat_template),
    else None (chat requests get 400)."""
    from gptwo.weights import model_chat_template

    if template_file is not None:
        source = f"--chat-template {template_file}"
        try:
            with open(template_file, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as err:
            why = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
            raise GptwoError(f"{source}: cannot read it ({why})", "pass a Jinja chat template file (UTF-8)") from None
        if not template.strip():
            raise GptwoError(f"{source} is empty", "pass a Jinja chat template file")
    else:
        source, template = model, model_chat_template(model)
    if template is not None:
        try:
            check_template(template)
        except GptwoError as err:
            raise GptwoError(f"{source}: {err.what}", err.fix) from None
    return template


def load_served_model(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str | None,
    adapters: Sequence[tuple[str, str]] = (),
    merge: bool = False,
):
    """The model and tokenizer as `gptwo serve` runs them, carrying the LoRA `adapters` ((name, folder) pairs)
    unmerged side by side (gptwo.lora.load_adapters), or with `merge` the one adapter merged in.

    On a CPU, fp32/bf16 weights are prepared for inference (named as text) as int8 ones are: native
    kernels, and every step of the engine runs as one native call over the paged cache (gptwo.infer.native);
    a model carrying unmerged adapters runs the torch step over those kernels.
    """
    from gptwo.lora import load_adapters
    from gptwo.weights import load_model

    if merge and len(adapters) != 1:
        raise GptwoError(
            f"--merge merges one adapter into the weights, but {len(adapters)} are given",
            "give one --adapter with --merge, or leave --merge out to serve several side by side",
        )
    prepared = dtype_name(dtype) if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) else dtype
    if merge:
        return load_model(
            model, device=str(device), dtype=prepared, quantize=quantize, adapter=adapters[0][1], merge=True
        )
    net, tokenizer = load_model(model, device=str(device), dtype=prepared, quantize=quantize)
    return (load_adapters(net, adapters) if adapters else net), tokenizer


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: str = "auto",
    served_model_name: str | None = None,
    max_num_seqs: int = 32,
    max_queue: int = 256,
    max_batched_tokens: int = MAX_BATCHED_TOKENS,
    long_prefill_token_threshold: int = LONG_PREFILL_TOKENS,
    kv_cache_memory: float | None = None,
    prefix_caching: bool = True,
    max_body_bytes: int = 1 << 20,
    log_level: str = "info",
    api_key: str | None = None,
    allowed_origins: Sequence[str] = (),
    quantize: str | None = None,
    dtype: str = "auto",
    max_request_choices: int = MAX_REQUEST_CHOICES,
    max_client_choices: int = MAX_CLIENT_CHOICES,
    max_inspect_tokens: int = MAX_INSPECT_TOKENS,
    header_timeout: float = HEADER_TIMEOUT_S,
    body_timeout: float = BODY_TIMEOUT_S,
    keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT_S,
    max_connections: int | None = None,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_S,
    watermark: WatermarkSettings | None = None,
    watermark_key: int | None = None,
    speculate: str | None = None,
    num_speculative_tokens: int = 4,
    adapters: Sequence[tuple[str | None, str]] = (),
    merge: bool = False,
    draft_model: str | None = None,
    chat_template: str | None = None,
) -> None:
    """Load `model` and serve it over HTTP until interrupted; `watermark` marks every completion and
    `watermark_key` keys the requests that ask for a watermark; `speculate="ngram"` or `draft_model` (a
    smaller model with the same tokenizer) decodes each row speculatively (BatchEngine). `adapters`: (name or
    None for the folder's name, folder) of LoRA adapters served beside the base, a request's `model` choosing;
    with `merge`, the one adapter is merged and served alone, under its name. `chat_template` is a template
    file for /v1/chat/completions in place of the model's own."""

    for name, value, low in (
        ("max_num_seqs", max_num_seqs, 1),
        ("max_batched_tokens", max_batched_tokens, 1),
        ("long_prefill_token_threshold", long_prefill_token_threshold, 0),
        ("max_queue", max_queue, 1),
        ("max_body_bytes", max_body_bytes, 1),
        ("max_request_choices", max_request_choices, 1),
        ("max_client_choices", max_client_choices, 0),
        ("max_inspect_tokens", max_inspect_tokens, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise GptwoError(
                f"{name}={value!r} is not an integer of at least {low}", f"pass --{name.replace('_', '-')} >= {low}"
            )
    for name, value in (
        ("header_timeout", header_timeout),
        ("body_timeout", body_timeout),
        ("keep_alive_timeout", keep_alive_timeout),
    ):
        if isinstance(value, bool) or not (isinstance(value, int | float) and 0 < value < float("inf")):
            raise GptwoError(
                f"{name}={value!r} is not a positive number of seconds", f"pass a positive --{name.replace('_', '-')}"
            )
    if isinstance(shutdown_timeout, bool) or not (
        isinstance(shutdown_timeout, int | float) and 0 <= shutdown_timeout < float("inf")
    ):
        raise GptwoError(
            f"shutdown_timeout={shutdown_timeout!r} is not a number of seconds >= 0", "pass --shutdown-timeout >= 0"
        )
    max_connections = default_max_connections() if max_connections is None else check_max_connections(max_connections)
    if api_key is not None and not api_key.strip():  # e.g. --api-key "$UNSET_VARIABLE": never serve openly by mistake
        raise GptwoError("--api-key is empty", "pass a non-empty key, or leave the option out to serve without one")
    api_key = api_key.strip() if api_key else None
    origins = parse_origins(allowed_origins)
    torch_device = resolve_device(device)
    if torch_device.type == "cpu" and torch_device.index is not None:
        raise GptwoError(f"--device {device}: cpu takes no index", "use --device cpu")
    torch_dtype = resolve_dtype(dtype, torch_device)
    if merge:  # one model: the base with the adapter merged in, under the adapter's name
        adapters = named_adapters(adapters, "")
        name = served_model_name or (adapters[0][0] if adapters else default_model_name(model))
    else:
        name = served_model_name or default_model_name(model)
        adapters = named_adapters(adapters, name)
    sock = bind_socket(host, port)
    template = served_chat_template(model, chat_template)  # before the weights: a bad file fails at once
    net, tokenizer = load_served_model(model, torch_device, torch_dtype, quantize, adapters, merge)
    draft = None
    if draft_model is not None:
        from gptwo.weights import check_draft_tokenizer

        draft, draft_tokenizer = load_served_model(draft_model, torch_device, torch_dtype, quantize)
        check_draft_tokenizer(draft_tokenizer, tokenizer, draft_model)
    engine = BatchEngine(
        net,
        tokenizer,
        max_num_seqs=max_num_seqs,
        max_queue=max_queue,
        max_batched_tokens=max_batched_tokens,
        long_prefill_token_threshold=long_prefill_token_threshold,
        kv_cache_memory=kv_cache_memory,
        prefix_caching=prefix_caching,
        max_request_choices=max_request_choices,
        max_client_choices=max_client_choices,
        watermark=watermark,
        watermark_key=watermark_key,
        speculate=speculate,
        num_speculative_tokens=num_speculative_tokens,
        draft_model=draft,
    )
    app = create_app(
        engine,
        name,
        max_body_bytes,
        api_key=api_key,
        allowed_origins=origins,
        body_timeout=body_timeout,
        max_inspect_tokens=max_inspect_tokens,
        chat_template=template,
    )
    app.state.model_dir = model  # where /v1/inspect finds the detector's calibration
    # (the config also sets up uvicorn's loggers)
    config = uvicorn_config(
        app,
        header_timeout=header_timeout,
        max_connections=max_connections,
        timeout_keep_alive=keep_alive_timeout,
        log_level=log_level,
        timeout_graceful_shutdown=5,  # after the drain: for the answers already ended to be sent
    )
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    logger = logging.getLogger("uvicorn.error")
    ours = logging.getLogger("gptwo.serve")  # the engine's lines (a step each at debug) go where uvicorn's go
    ours.setLevel(logger.level)
    if not ours.handlers:
        ours.handlers, ours.propagate = list(logging.getLogger("uvicorn").handlers), False
    auth = "API key required" if api_key else "no API key"
    weights = dtype_name(torch_dtype) + (f", {quantize} weights" if quantize else "")
    logger.info(
        "serving %s at %s (playground at /, OpenAI API at /v1; %s, %s; %s)", name, url, torch_device, weights, auth
    )
    chat = "none (chat requests get 400)" if template is None else chat_template or "the model's"
    logger.info("chat template: %s", chat)
    if watermark is not None:  # never the key
        logger.info("watermarking every completion: %s", watermark.public())
    if not api_key and not _is_loopback(sock.getsockname()[0]):
        logger.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
    try:
        GracefulServer(
            config, drain=engine.drain, idle=lambda: engine.idle, abort=engine.stop, shutdown_timeout=shutdown_timeout
        ).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after a graceful shutdown: for a server that is a normal stop
        pass


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a GptwoError saying why not (port taken, bad host)."""
    if not 0 <= port <= 65535:
        raise GptwoError(f"port {port} is out of range", "use a port between 1 and 65535 (0 picks a free one)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise GptwoError(
            f"cannot listen on {host}:{port} ({err.strerror or err})", "pick another --port or --host"
        ) from None
    sock.listen(2048)
    return sock
