"""`POST /v1/inspect` (a gptwo extension, not OpenAI's) and the Inspect page at `/inspect`.

For a text: every token with its probability, rank, GLTR bucket, entropy and top alternatives; the
document's detection scores and verdict (as `gptwo detect` gives them), and its watermark test when
asked for (or when the server watermarks every completion); and the attention weights
of every layer and head, from the explicit path in `gptwo.detect.attention` (the served model's
fast path is untouched). The model reads <|endoftext|> then the text, so attention row i belongs
to the token at position i of `attention.tokens` (position 0 is <|endoftext|>); row i holds the
weights on positions 0..i and sums to 1.
"""

from __future__ import annotations

from dataclasses import asdict
from importlib import resources

import torch
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator
from starlette.exceptions import HTTPException

from gptwo.detect.attention import forward_with_attention
from gptwo.detect.detector import Rule, judge_tokens, load_rule, token_rows
from gptwo.detect.stats import bucket_of
from gptwo.detect.watermark import WatermarkCheck
from gptwo.errors import GptwoError
from gptwo.serve.limits import MAX_INSPECT_TOKENS
from gptwo.serve.protocol import WatermarkRequest, watermark_request
from gptwo.text import invalid_text
from gptwo.watermark import DETECT_Z, WatermarkSettings

MAX_ATTENTION_WEIGHTS = 4_000_000  # floats in one response (about 40 MB of JSON); ask for fewer layers beyond it


class InspectRequest(BaseModel):
    """POST /v1/inspect."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "4" is not 4, true is not 1

    model: str | None = Field(default=None, description="the served model's id; optional")
    text: StrictStr = Field(description="the text to inspect")
    top_logprobs: int = Field(default=10, ge=0, le=20, description="alternatives per token (default 10)")
    attention: bool = Field(default=True, description="include attention weights")
    layers: list[int] | None = Field(default=None, description="layers whose attention to return (default all)")
    watermark: bool | WatermarkRequest | None = Field(
        default=None,
        description="test for the watermark: true (the server's settings and key), an object of settings over "
        "them, or false; by default on when the server watermarks every completion",
    )
    watermark_z: float = Field(
        default=DETECT_Z, ge=-1e9, le=1e9, description="z at or above which the watermark is detected (default 4)"
    )
    ignore_repeated: bool = Field(default=False, description="count repeated n-grams once in the watermark test")

    _watermark_settings = field_validator("watermark", mode="before")(watermark_request)


def _attention(model: torch.nn.Module, ids: list[int], layers: list[int] | None) -> dict:
    """Weights[layer][head][query] = the query's row over keys 0..query (causal rows, trimmed)."""
    n_layer, n_head = model.config.n_layer, model.config.n_head
    layers = list(range(n_layer)) if layers is None else layers
    bad = [layer for layer in layers if not 0 <= layer < n_layer]
    if bad:
        raise HTTPException(400, f"layer {bad[0]} does not exist; the model has layers 0..{n_layer - 1}")
    if len(layers) * n_head * len(ids) * (len(ids) + 1) // 2 > MAX_ATTENTION_WEIGHTS:
        raise HTTPException(
            400,
            f"attention for {len(ids)} tokens, {len(layers)} layers and {n_head} heads is too large; "
            "ask for fewer layers or a shorter text",
        )
    device = next(model.parameters()).device
    _, maps = forward_with_attention(model, torch.tensor([ids], device=device))
    weights = maps[layers, 0].float().cpu()  # (layers, heads, T, T)
    rows = [
        [[weights[li, h, q, : q + 1].tolist() for q in range(len(ids))] for h in range(n_head)]
        for li in range(len(layers))
    ]
    return {"layers": layers, "heads": n_head, "weights": rows}


def watermark_check(body: InspectRequest, server_wide: WatermarkSettings | None, key: int | None):
    """The watermark test `body` asks for, over the server's watermark (or transformers' defaults and the
    server's key); None for none."""
    if body.watermark is False or (body.watermark is None and server_wide is None):
        return None
    base = asdict(server_wide) if server_wide is not None else ({} if key is None else {"key": key})
    named = body.watermark.settings() if isinstance(body.watermark, WatermarkRequest) else {}
    return WatermarkCheck(WatermarkSettings(**{**base, **named}), body.watermark_z, body.ignore_repeated)


def check_text(text: str, max_chars: int) -> None:
    """Refuse a text that is not text (a NUL, a lone surrogate) or longer than `max_chars` characters."""
    why = invalid_text(text)
    if why is None and "\x00" in text:
        why = f"it holds a NUL character (U+0000) at character {text.index(chr(0))}"
    if why:
        raise HTTPException(400, f"text is not valid text: {why}; send UTF-8 text without NUL characters")
    if len(text) > max_chars:
        raise HTTPException(
            413,
            f"text has {len(text)} characters, more than /v1/inspect takes ({max_chars}: "
            f"{CHARS_PER_TOKEN} per token of the server's --max-inspect-tokens); send a shorter text",
        )


CHARS_PER_TOKEN = 16  # a text longer than this many characters per allowed token is refused before it is encoded


def inspect_text(
    model: torch.nn.Module,
    tokenizer,
    body: InspectRequest,
    rule: Rule,
    max_tokens: int = MAX_INSPECT_TOKENS,
    watermark: WatermarkCheck | None = None,
) -> dict:
    """The whole /v1/inspect answer for one text of at most `max_tokens` tokens, tested for `watermark` when
    given (runs the model; call it off the event loop)."""
    check_text(body.text, CHARS_PER_TOKEN * max_tokens)
    tokens = tokenizer.encode_ordinary(body.text)
    if not tokens:
        raise HTTPException(400, "text is empty: give some text to inspect")
    if len(tokens) > max_tokens:
        raise HTTPException(
            413,
            f"text has {len(tokens)} tokens, more than /v1/inspect takes ({max_tokens}, the server's "
            "--max-inspect-tokens); send a shorter text",
        )
    doc = judge_tokens(model, tokenizer, tokens, "text", rule, top=max(1, body.top_logprobs), watermark=watermark)
    rows = token_rows(doc, tokenizer)
    for row, bucket in zip(rows, bucket_of(doc.table.rank).tolist()):
        row["bucket"] = bucket
        row["top"] = [{"text": text, "prob": prob} for text, prob in row["top"][: body.top_logprobs]]
    out = {
        "object": "inspection",
        "tokens": rows,
        "scores": doc.scores,
        "score": doc.score,
        "verdict": doc.verdict,
        "detector": rule.detector,
        "threshold": rule.threshold,
        "calibrated": rule.calibrated,
        "min_tokens": rule.min_tokens,
        "rule": rule.describe(),
    }
    if doc.watermark is not None:
        out["watermark"] = doc.watermark.to_dict()
    if doc.verdict == "too short":
        out["note"] = f"too short to judge: {len(tokens)} tokens, at least {rule.min_tokens} needed"
    if body.attention:
        ids = [tokenizer.eot_token, *tokens][: model.config.block_size]
        out["attention"] = {
            "tokens": ["<|endoftext|>", *doc.pieces[: len(ids) - 1]],
            **_attention(model, ids, body.layers),
        }
        if len(ids) <= len(tokens):
            out["attention"]["note"] = f"attention covers the first {len(ids) - 1} tokens (the model's context)"
    return out


def inspect_router(engine, model_name: str, max_tokens: int = MAX_INSPECT_TOKENS) -> APIRouter:
    """The Inspect routes for the model `engine` serves, for texts of up to `max_tokens` tokens.

    The detector's calibration is read from `app.state.model_dir` when set.
    """
    router = APIRouter()

    @router.get("/inspect", include_in_schema=False)
    async def inspect_page() -> HTMLResponse:
        return HTMLResponse((resources.files("gptwo.serve") / "static" / "inspect.html").read_text(encoding="utf-8"))

    @router.post(
        "/v1/inspect",
        summary="gptwo extension: per-token probabilities, ranks and alternatives, detection scores, attention weights",
    )
    async def inspect(body: InspectRequest, request: Request) -> dict:
        if body.model is not None and body.model != model_name:
            raise HTTPException(404, f"The model `{body.model}` does not exist; this server serves `{model_name}`")
        model_dir = getattr(request.app.state, "model_dir", None)
        try:
            rule = load_rule(model_dir) if model_dir else Rule()
            watermark = watermark_check(body, engine.watermark, engine.watermark_key)
            result = await run_in_threadpool(
                inspect_text, engine.model, engine.tokenizer, body, rule, max_tokens, watermark
            )
        except GptwoError as err:
            raise HTTPException(400, str(err)) from None
        return {"model": model_name, **result}

    return router
