"""`gptwo serve`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import os

from gptwo.argtypes import command


def _cmd_serve(args: argparse.Namespace) -> int:
    from gptwo.serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        served_model_name=args.served_model_name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        log_level=args.log_level,
        api_key=args.api_key if args.api_key is not None else os.environ.get("GPTWO_API_KEY") or None,
        allowed_origins=args.allowed_origins,
        dtype=args.dtype,
        quantize=args.quantize,
    )
    return 0


def add_commands(sub) -> None:
    """`gptwo serve`: the OpenAI-compatible API and the playground page."""
    p = command(
        sub, "serve", _cmd_serve, "Serve a model over HTTP: OpenAI-style /v1/completions, and a playground page at /."
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
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: the folder's name or the hub id)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=32,
        help="most sequences decoded together (default 32); each holds a KV cache row",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="most sequences waiting for a row; beyond it requests get 429 (default 256)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="largest request body accepted; larger ones get 413 (default 1 MiB)",
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
        help="require 'Authorization: Bearer KEY' on every /v1 request, else 401 (default: env GPTWO_API_KEY, else none)",
    )
    p.add_argument(
        "--allowed-origins",
        action="append",
        default=[],
        metavar="ORIGINS",
        help="web origins (scheme://host[:port], comma-separated or repeated; * for any) whose pages may call the API from a browser (CORS; default none)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="weights' dtype (default auto: bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16 or AMX), else fp16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8: weight-only int8 linear layers (per-channel scales; activations in --dtype), a quarter of fp32's weight memory (docs/inference.md)",
    )
