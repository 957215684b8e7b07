"""`gptwo serve`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import os

from gptwo.argtypes import (
    add_adapters_option,
    add_speculative_options,
    add_watermark_options,
    command,
    device_name,
    float_in,
    int_at_least,
)
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


def kv_cache_memory(text: str) -> float:
    """--kv-cache-memory: a positive size in GiB (above 1) or a fraction of the memory available (0 to 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive number (GiB above 1, or a fraction 0-1)")
    return value


def _cmd_serve(args: argparse.Namespace) -> int:
    from gptwo.serve import serve
    from gptwo.watermark import key_from_environment, settings_from_options

    key = args.watermark_key if args.watermark_key is not None else key_from_environment()
    watermark = settings_from_options(  # --watermark-key alone keys the requests that ask for a watermark
        args.watermark,
        key=key if args.watermark else None,
        gamma=args.watermark_gamma,
        delta=args.watermark_delta,
        scheme=args.watermark_scheme,
        context_width=args.watermark_context_width,
        require_key=True,
    )

    serve(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        served_model_name=args.served_model_name,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        kv_cache_memory=args.kv_cache_memory,
        prefix_caching=not args.no_prefix_caching,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        log_level=args.log_level,
        api_key=args.api_key if args.api_key is not None else os.environ.get("GPTWO_API_KEY") or None,
        allowed_origins=args.allowed_origins,
        dtype=args.dtype,
        quantize=args.quantize,
        max_request_choices=args.max_request_choices,
        max_client_choices=args.max_client_choices,
        max_inspect_tokens=args.max_inspect_tokens,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        max_connections=args.max_connections,
        shutdown_timeout=args.shutdown_timeout,
        watermark=watermark,
        watermark_key=key,
        speculate=args.speculate,
        num_speculative_tokens=args.num_speculative_tokens,
        draft_model=args.draft_model,
        adapters=args.adapters,
        merge=args.merge,
        chat_template=args.chat_template,
    )
    return 0


def add_commands(sub) -> None:
    """`gptwo serve`: the OpenAI-compatible API and the playground page."""
    p = command(
        sub,
        "serve",
        _cmd_serve,
        "Serve a model over HTTP: OpenAI-style /v1/completions and /v1/chat/completions, and a playground page at /.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model folder (HF GPT-2 layout), run folder, or hub id such as openai-community/gpt2",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)",
    )
    p.add_argument(
        "--port",
        type=int_at_least(0, 65535),
        default=8000,
        help="port to listen on (default 8000; 0 picks a free one)",
    )
    add_adapters_option(p)
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        default=None,
        help="Jinja chat template for /v1/chat/completions, in place of the model's own (its folder's "
        "tokenizer_config.json or chat_template.jinja, a GGUF's tokenizer.chat_template); without either, chat "
        "requests get 400",
    )
    p.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: the folder's name or the hub id)"
    )
    p.add_argument(
        "--max-num-seqs",
        "--max-batch",
        dest="max_num_seqs",
        type=int_at_least(1, 4096),
        default=32,
        help="most sequences running at once (default 32; --max-batch is the old name)",
    )
    p.add_argument(
        "--max-batched-tokens",
        type=int_at_least(1, 1 << 20),
        default=MAX_BATCHED_TOKENS,
        help="most tokens one step computes: every running sequence's next token first, then chunks of "
        f"prompts (chunked prefill; default {MAX_BATCHED_TOKENS})",
    )
    p.add_argument(
        "--long-prefill-token-threshold",
        type=int_at_least(0, 1 << 20),
        default=LONG_PREFILL_TOKENS,
        help="most tokens of one prompt a step computes while other sequences decode, so a long prompt joins "
        f"running streams without stalling them (default {LONG_PREFILL_TOKENS}; 0: only --max-batched-tokens; "
        "larger: faster prefill, longer stalls)",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=kv_cache_memory,
        default=None,
        help="the KV cache's size: GiB (a number above 1) or a fraction of the memory available (0 to 1; "
        "default 0.25); memory is taken 16 tokens at a time as sequences grow",
    )
    p.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="compute every prompt in full (by default, prompts starting with the same 16-token blocks as "
        "earlier ones reuse their keys and values)",
    )
    add_speculative_options(
        p,
        draft_help="speculative decoding per batch row: a smaller model with the same tokenizer proposes tokens "
        "greedily for all rows in one draft step per token, checked in the same step as the row's sampled one",
        speculate_help="speculative decoding per batch row: ngram proposes what followed the last tokens' latest "
        "earlier occurrence in the text (prompt lookup), checked in the same step; greedy text is unchanged, sampled "
        "text follows the model's distribution; rows asking logprobs, best_of, a watermark or logit controls decode "
        "plainly",
    )
    p.add_argument(
        "--max-queue",
        type=int_at_least(1, 1_000_000),
        default=256,
        help="most sequences waiting for a row; beyond it requests get 429 (default 256)",
    )
    p.add_argument(
        "--max-request-choices",
        type=int_at_least(1, 1_000_000),
        default=MAX_REQUEST_CHOICES,
        help=f"most choices (prompts x n) in one request; more get 400 (default {MAX_REQUEST_CHOICES})",
    )
    p.add_argument(
        "--max-client-choices",
        type=int_at_least(0, 1_000_000),
        default=MAX_CLIENT_CHOICES,
        help="most choices one client (remote address) may have running or waiting at once; beyond it its "
        f"requests get 429, so one client cannot hold the queue (default {MAX_CLIENT_CHOICES}; 0: no limit; "
        "behind a proxy every client shares its address)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int_at_least(1, 1 << 30),
        default=1 << 20,
        help="largest request body accepted; larger ones get 413, however they are sent (default 1 MiB)",
    )
    p.add_argument(
        "--max-inspect-tokens",
        type=int_at_least(1, 1_000_000),
        default=MAX_INSPECT_TOKENS,
        help=f"longest text /v1/inspect takes, in tokens; longer ones get 413 (default {MAX_INSPECT_TOKENS})",
    )
    p.add_argument(
        "--header-timeout",
        type=float_in(0.0, 3600.0, low_open=True, high_open=False),
        default=HEADER_TIMEOUT_S,
        help="seconds a connection has to send a request's headers, else 408 and closed "
        f"(default {HEADER_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--body-timeout",
        type=float_in(0.0, 3600.0, low_open=True, high_open=False),
        default=BODY_TIMEOUT_S,
        help=f"seconds a request has to send its whole body, else 408 (default {BODY_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=float_in(0.0, 3600.0, low_open=True, high_open=False),
        default=KEEP_ALIVE_TIMEOUT_S,
        help="seconds a keep-alive connection may stay idle between requests before it is closed "
        f"(default {KEEP_ALIVE_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--max-connections",
        type=int_at_least(1, 1 << 20),
        default=None,
        help="most connections open at once; beyond it the longest-idle one between requests is closed, "
        "or, when all are in requests, the new one gets 503 (default: half the file limit, ulimit -n, at most 4096)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float_in(0.0, 86400.0, low_open=False, high_open=False),
        default=SHUTDOWN_TIMEOUT_S,
        help="on SIGTERM or Ctrl+C: seconds the running requests may finish while new ones get 503; then "
        "streams end with an error event and [DONE], waiting requests get 503, and the server exits "
        f"(default {SHUTDOWN_TIMEOUT_S:g}; a second signal stops at once)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level (default info)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every /v1 request, else 401 "
        "(default: env GPTWO_API_KEY, else none)",
    )
    p.add_argument(
        "--allowed-origins",
        action="append",
        default=[],
        metavar="ORIGINS",
        help="web origins (scheme://host[:port], comma-separated or repeated; * for any) whose pages may call "
        "the API from a browser (CORS; default none)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="weights' dtype (default auto: bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16 or AMX), "
        "else fp16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8: weight-only int8 linear layers (per-channel scales; activations in --dtype), a quarter of "
        "fp32's weight memory (docs/inference.md)",
    )
    add_watermark_options(
        p,
        "watermark every completion (Kirchenbauer et al., as transformers does it) with the key of "
        "--watermark-key or GPTWO_WATERMARK_KEY; without it a request may still ask for one ('watermark': true)",
    )
