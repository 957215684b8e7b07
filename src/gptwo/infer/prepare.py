"""Turn a finished GPT into an inference model: dtype, weight layout and int8 weight-only quantization.

Applied from outside model.py by swapping modules: every block's linear layers and the head become
`NativeLinear` (gptwo's own CPU kernels, infer/native.py) where they build, else `TransposedLinear` or
`Int8Linear` (torch's matmul). The head keeps `weight` tied to the token embedding (lookups,
dtype and device still read it) and computes from its own copy. A prepared model is for inference
only: it cannot be trained or saved.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from gptwo.errors import GptwoError
from gptwo.infer import native
from gptwo.infer.arena import arena_views
from gptwo.infer.linear import Int8Linear, NativeLinear, TransposedLinear
from gptwo.model import GPT
from gptwo.runtime import DTYPES, dtype_name

PREPARE_DTYPES = ("fp32", "bf16")  # what prepare_model re-lays weights in (gptwo.runtime.DTYPES names)
QUANTIZATIONS = ("int8",)
_PREPARED = "inference_prepared"  # attribute set on a prepared model: {"dtype": ..., "quantize": ...}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype for 'fp32' / 'bf16' (None stays None)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in PREPARE_DTYPES:
        raise GptwoError(f"dtype '{name}' is not supported", f"use one of {', '.join(PREPARE_DTYPES)}")
    return DTYPES[name]


def prepared_settings(model: torch.nn.Module) -> dict | None:
    """How `prepare_model` prepared `model` ({"dtype": "bf16", "quantize": "int8" or None}), or None if it did not."""
    return getattr(model, _PREPARED, None)


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise GptwoError(
            f"quantization '{quantize}' is not supported", f"use one of {', '.join(QUANTIZATIONS)}, or leave it out"
        )


def _linears(model: GPT) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every linear layer of the blocks and the head."""
    found = [
        (parent, name, child)
        for parent in model.transformer.h.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    return found + [(model, "lm_head", model.lm_head)]


@torch.no_grad()
def prepare_model(
    model: GPT,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    transpose: bool = True,
    native_kernels: bool = True,
) -> GPT:
    """`model` (changed in place, eval mode) with its weights in `dtype` and its linears re-laid for decoding.

    `quantize="int8"`: weight-only int8 with per-output-channel scales (activations stay in `dtype`).
    `transpose`: store float weights (in, out), which batch-1 decoding reads faster (docs/inference.md).
    `native_kernels`: use gptwo's own CPU kernels where they build (False, or GPTWO_NATIVE=0: torch's matmul).
    """
    check_quantize(quantize)
    if prepared_settings(model) is not None:
        raise GptwoError("the model is already prepared for inference", "prepare a freshly loaded model once")
    torch_dtype = parse_dtype(dtype) or model.lm_head.weight.dtype
    model.to(torch_dtype).eval()
    kind = _native_kind(model, torch_dtype, quantize) if native_kernels else None
    if kind is None and model.lm_head.weight.device.type == "cpu":
        _note_slow_precision(torch_dtype, quantize)
    for parent, name, linear in _linears(model):
        if kind is not None:
            replacement = NativeLinear(linear, kind)
        elif quantize == "int8":
            # torch's int8 kernel: bf16 activations only where bf16 is native
            # (fp32 is more accurate and no slower elsewhere)
            replacement = Int8Linear(
                linear,
                torch.bfloat16
                if torch_dtype == torch.bfloat16 or linear.weight.device.type != "cpu" or native.native_bf16()
                else torch.float32,
            )
        elif transpose:
            replacement = TransposedLinear(linear)
        else:
            continue
        setattr(parent, name, replacement)
    if isinstance(model.lm_head, (Int8Linear, NativeLinear, TransposedLinear)):
        model.lm_head.weight = model.transformer.wte.weight  # still tied: dtype/device readers and save paths see wte
    if kind is not None:
        _weights_into_arena(model)
    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, _PREPARED, {"dtype": dtype_name(torch_dtype), "quantize": quantize})
    return model


def _weights_into_arena(model: GPT) -> None:
    """The native linears' weights and the embeddings moved into one huge-page arena (infer/arena.py), ties kept.

    One tensor at a time: each is copied in and every holder re-pointed before the next, so the old
    storage is freed as the arena fills and the peak stays near one model's size.
    """
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    natives = [m for m in model.modules() if isinstance(m, NativeLinear)]
    unique: dict[int, torch.Tensor] = {}
    for t in [wte.data, wpe.data, *(m.w for m in natives)]:
        if t.is_contiguous():
            unique.setdefault(t.data_ptr(), t)
    views = arena_views(list(unique.values()))
    if views is None:
        return
    for (where, old), view in zip(list(unique.items()), views, strict=True):
        view.copy_(old)
        for m in natives:
            if m.w.data_ptr() == where:
                m.w = view
        for p in (wte, wpe):
            if p.data_ptr() == where:
                p.data = view
        del unique[where], old


_noted: set[str] = set()


def slow_precision(dtype: torch.dtype, quantize: str | None) -> str | None:
    """Why bf16 or int8 weights would decode slower than fp32 on this CPU without the native kernels, or None."""
    if native.native_bf16():
        return None
    if quantize == "int8":
        return "--quantize int8 runs torch's int8 kernel, which on a CPU without native bf16 can be slower than fp32"
    if dtype == torch.bfloat16:
        return "bf16 weights run torch's emulated bf16 matmuls on this CPU (no AVX-512 BF16 or AMX), slower than fp32"
    return None


def _note_slow_precision(dtype: torch.dtype, quantize: str | None) -> None:
    """Say once per process that an asked-for precision is slower here than fp32 (it still works)."""
    why = slow_precision(dtype, quantize)
    if why is not None and why not in _noted:
        _noted.add(why)
        off = native.why_off() or "off"
        print(
            f"note: {why} (gptwo's native kernels: {off}); use --dtype fp32 for speed, or see `gptwo kernels info`",
            file=sys.stderr,
        )


def _native_kind(model: GPT, dtype: torch.dtype, quantize: str | None) -> int | None:
    """The native kernel for this model's weights, or None for torch's matmul (not on CPU, fp16, or no kernels here)."""
    if model.lm_head.weight.device.type != "cpu" or (quantize is None and dtype not in (torch.float32, torch.bfloat16)):
        return None
    return native.kind_for("int8" if quantize == "int8" else {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype])
