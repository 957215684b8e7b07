"""`gptwo export gguf|onnx`."""

from __future__ import annotations

import argparse

from gptwo.argtypes import Parser, command, print_report

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # gptwo.export.gguf.GGUF_TYPES (kept here so --help imports nothing)
MODEL_HELP = "model folder, run folder, hub id such as openai-community/gpt2, or a GGUF file"


def render_gguf(report: dict) -> str:
    return (
        f"wrote {report['path']}: GGUF {report['type']}, {report['tensors']} tensors, {report['tokens']:,} tokens "
        f"({report['tokenizer']}), {report['bytes'] / 1e6:.1f} MB"
    )


def render_onnx(report: dict) -> str:
    lines = [f"wrote {report['out']}: {', '.join(f'{n} ({b / 1e6:.1f} MB)' for n, b in report['files'].items())}"]
    for kind, check in report["checks"].items():
        lines.append(
            f"onnxruntime {kind} vs gptwo: max |logit diff| {check['prefill_max_diff']:.2g} at the prompt, "
            f"{check['step_max_diff']:.2g} at a step with past; same next token: {check['step_same_argmax']}"
        )
    return "\n".join(lines)


def _cmd_export_gguf(args: argparse.Namespace) -> int:
    from gptwo.export.gguf import export_gguf

    print_report(export_gguf(args.model, args.out, args.type, args.name), args.json, render_gguf)
    return 0


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from gptwo.export.onnx import export_onnx

    print_report(export_onnx(args.model, args.out, args.quantize), args.json, render_onnx)
    return 0


def add_commands(sub) -> None:
    """`gptwo export gguf|onnx`."""
    ex = sub.add_parser(
        "export",
        help="Export a model for llama.cpp/Ollama (GGUF) or onnxruntime (ONNX).",
        description="Export a model for llama.cpp/Ollama (GGUF) or onnxruntime (ONNX); docs/export.md.",
    )
    esub = ex.add_subparsers(dest="export_command", required=True, parser_class=Parser, metavar="EXPORT_COMMAND")

    p = command(esub, "gguf", _cmd_export_gguf, "Write the model and its tokenizer as one GGUF file (llama.cpp).")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="the GGUF file to write (its folder must exist)")
    p.add_argument(
        "--type",
        choices=GGUF_TYPES,
        default="f32",
        help="weight type: f32 (default), f16, bf16 or q8_0 (8-bit blocks of 32 with an fp16 scale); norms, "
        "biases and the position table stay f32, as llama.cpp's converter keeps them",
    )
    p.add_argument("--name", default=None, help="general.name in the file (default: the model's folder or file name)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a line")

    p = command(
        esub,
        "onnx",
        _cmd_export_onnx,
        "Write an ONNX decoder with past key values (optimum's input/output names), checked with onnxruntime.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for model.onnx and its files (made if missing; its parent must exist)",
    )
    p.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="also write model_quantized.onnx: onnxruntime's dynamic int8 quantization of the MatMul weights",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of lines")
