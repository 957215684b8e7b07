"""Hugging Face GPT-2 checkpoints in and out: `config.json` + `model.safetensors` (or `pytorch_model.bin`).

Names match transformers' `GPT2LMHeadModel`; its `Conv1D` layers store weights as (in, out), the
transpose of our `nn.Linear`. Weights never load through pickle: safetensors, or
`torch.load(weights_only=True)` for old `.bin` files. Every file is written atomically.

The loading layer (docs/core.md, Layers): `GPT` here is `gptwo.model.GPT` with the conveniences that
need loading, saving and sampling (`from_pretrained`, `save_pretrained`, `generate`); it is the class
`from gptwo import GPT` gives, and every loader builds it.
"""

from __future__ import annotations

import json
import os
import re

import torch

import gptwo.model
from gptwo import sampling
from gptwo.chat import read_chat_template
from gptwo.config import GPTConfig
from gptwo.errors import GptwoError
from gptwo.fileio import atomic_write
from gptwo.gguf import is_gguf_spec, read_gguf, read_gguf_chat_template
from gptwo.infer.prepare import prepare_model, prepared_settings
from gptwo.lora import load_adapter, lora_settings, merged_state
from gptwo.model import SHAPE_FIX, describe, expected_shapes, param_count
from gptwo.runtime import check_memory, resolve_device
from gptwo.tokenizer import EOT, Tokenizer, load_tokenizer

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB_FILES = [
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",  # and chat_template.jinja: the chat template, when the model has one
    "chat_template.jinja",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class GPT(gptwo.model.GPT):
    """GPT-2 (`gptwo.model.GPT`) with conveniences from the layers above the model: load, save, sample."""

    @classmethod
    def from_pretrained(cls, path_or_id: str, **kwargs) -> GPT:
        """Load Hugging Face GPT-2 format weights from a folder or a hub id (see `load_pretrained`)."""
        return load_pretrained(path_or_id, **kwargs)

    def save_pretrained(self, directory: str, **kwargs) -> None:
        """Write `config.json` + `model.safetensors` in the Hugging Face GPT-2 layout (see `save_pretrained`)."""
        save_pretrained(self, directory, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Continue `idx` (B, T) by `max_new_tokens` tokens; see `gptwo.sampling.generate` for all options."""
        return sampling.generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, **kwargs)


# ---------------------------------------------------------------- config
def config_from_hf(hf: dict) -> GPTConfig:
    """GPTConfig from a transformers GPT-2 `config.json` dict; refuses variants we would compute wrongly."""
    if not isinstance(hf, dict):
        raise TypeError(f"it holds a JSON {type(hf).__name__}, not an object")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise GptwoError(
            f"model type '{hf.get('model_type')}' is not GPT-2", "use a GPT-2 checkpoint (model_type gpt2)"
        )
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": hf.get("n_inner") not in (None, 4 * hf["n_embd"]),
        "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx")),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is False,
        "add_cross_attention": bool(hf.get("add_cross_attention")),
    }
    for key, bad in unsupported.items():
        if bad:
            raise GptwoError(
                f"config.json sets {key}={hf.get(key)!r}, which GPT-2 does not use", "use a standard GPT-2 checkpoint"
            )
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        dropout=0.0,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def config_to_hf(config: GPTConfig, eot_token: int | None = None) -> dict:
    eot = config.vocab_size - 1 if eot_token is None else eot_token
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


# ---------------------------------------------------------------- state dicts
def state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel/GPT2Model names and layouts → ours."""
    ours = {}
    for name, tensor in hf_state.items():
        key = _our_name(name)
        if key is None:
            continue  # causal-mask buffers; the head is tied to wte
        ours[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
    return ours


def state_dict_to_hf(model: gptwo.model.GPT) -> dict[str, torch.Tensor]:
    """Our names and layouts → HF's (contiguous, lm_head left out as it is tied to wte)."""
    out = {}
    state, settings = model.state_dict(), lora_settings(model)
    if settings is not None:  # unmerged LoRA adapters: saved merged into the weights
        state = merged_state(state, settings)
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach().cpu()
        out[name] = (tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor).contiguous()
    return out


def _our_name(name: str) -> str | None:
    """An HF tensor name as ours, or None for the causal-mask buffers and the (tied) head."""
    if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
        return None
    return name if name.startswith("transformer.") else "transformer." + name


def shapes_from_hf(hf_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """HF tensor shapes (e.g. a safetensors header's) under our names and layouts, as `state_dict_from_hf` maps them."""
    ours = {}
    for name, shape in hf_shapes.items():
        key = _our_name(name)
        if key is not None:
            ours[key] = tuple(reversed(shape)) if key.endswith(CONV1D_WEIGHTS) else tuple(shape)
    return ours


def check_shapes(config: GPTConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """The tensors' shapes (our names) must be those of a GPT of `config`; one line names the first that is not.

    Runs before a model is built, so a config.json that claims more than the weights hold (100,000
    layers over weights for 2) is refused at once instead of being allocated.
    """
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("transformer.h.") and k.split(".")[2].isdigit()}
    if layers and len(layers) != config.n_layer:
        raise GptwoError(
            f"the config of {source} says n_layer={config.n_layer:,} but its weights are for "
            f"{len(layers)} layer{'s' if len(layers) != 1 else ''}",
            "check that config.json matches the weights (or re-save the model)",
        )
    for name, dims in (
        ("transformer.wte.weight", "vocab_size, n_embd"),
        ("transformer.wpe.weight", "n_positions, n_embd"),
    ):
        want = (config.vocab_size, config.n_embd) if "wte" in name else (config.block_size, config.n_embd)
        if name in shapes and tuple(shapes[name]) != want:
            raise GptwoError(
                f"the config of {source} says ({dims}) = {want} but {name} has shape {tuple(shapes[name])}",
                "check that config.json matches the weights (or re-save the model)",
            )
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise GptwoError(
            f"weights in {source} do not fit a GPT-2 of this config ({what})",
            "use weights saved from the same model shape",
        )
    for name, shape in shapes.items():
        if tuple(shape) != expected[name]:
            raise GptwoError(
                f"{name} in {source} has shape {tuple(shape)} but the config needs {expected[name]}",
                "check that config.json matches the weights",
            )


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity: such a model samples garbage (or fails) at every step."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise GptwoError(
                f"weights in {source} are damaged: {name} holds {bad:,} NaN or infinite values (of {tensor.numel():,})",
                "re-save the model from a good checkpoint, or re-download it",
            )


def model_from_state(config: GPTConfig, state: dict[str, torch.Tensor], source: str) -> GPT:
    """A CPU GPT of `config` holding `state` (our names; the head comes from wte): every load path builds models here.

    The model is built on the meta device (no random init of weights about to be overwritten), then
    given real tensors; `to_empty` replaces each parameter, which unties the head from the embedding,
    so the tie is restored before the weights are copied in.
    """
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    check_shapes(config, {k: tuple(v.shape) for k, v in state.items()}, source)
    check_memory(param_count(config) * torch.get_default_dtype().itemsize, describe(config), SHAPE_FIX)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]}, strict=True)
    return model


def stored_shapes(directory: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes in `model.safetensors` (HF names), read from its header without loading; None for other formats."""
    st_path = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(st_path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(st_path, framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as err:
        raise GptwoError(
            f"weight file {st_path} is corrupt or truncated ({err})", "re-save or re-download the model"
        ) from None


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """Tensors of `model.safetensors`, else of `pytorch_model.bin` (loaded with weights_only=True)."""
    st_path = os.path.join(directory, "model.safetensors")
    bin_path = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(st_path):
        from safetensors.torch import load_file

        try:
            return load_file(st_path)
        except Exception as err:
            raise GptwoError(
                f"weight file {st_path} is corrupt or truncated ({err})", "re-save or re-download the model"
            ) from None
    if os.path.isfile(bin_path):
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise GptwoError(
                f"weight file {bin_path} could not be read safely ({str(err).splitlines()[0]})",
                "convert it to model.safetensors",
            ) from None
    raise GptwoError(
        f"no weights in {directory} (model.safetensors or pytorch_model.bin)", "point --model at a saved model folder"
    )


def _weights_bytes(directory: str) -> int:
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return os.path.getsize(path)
    return 0


# ---------------------------------------------------------------- folders and hub ids
def looks_like_a_path(spec: str) -> bool:
    """True for a --model that can only mean a local path: it starts with ./, ../, / or ~, ends with a
    separator, or its first component is a folder here (runs/nope when runs/ exists)."""
    seps = tuple({os.sep, "/"})
    if spec.startswith(("./", "../", "~", *seps)) or spec.endswith(seps):
        return True
    first = spec.replace(os.sep, "/").split("/")[0]
    return "/" in spec.replace(os.sep, "/") and os.path.isdir(first)


def _missing_folder(spec: str) -> GptwoError:
    parent = os.path.dirname(os.path.normpath(os.path.expanduser(spec))) or "."
    if os.path.isdir(parent):
        names = sorted(n for n in os.listdir(parent) if os.path.isdir(os.path.join(parent, n)) and n[0] != ".")
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        fix = f"check the path ({parent} holds {shown or 'no folders'})"
    else:
        fix = f"check the path ({parent} does not exist either)"
    return GptwoError(f"model folder {spec} does not exist", fix)


def resolve_model_dir(path_or_id: str) -> str:
    """A local folder with config.json: `path_or_id` itself, or a hub snapshot downloaded on demand.

    A missing path (see `looks_like_a_path`) is reported as such, never tried as a hub id."""
    if path_or_id.startswith("~"):
        path_or_id = os.path.expanduser(path_or_id)
    if os.path.isdir(path_or_id):
        if not os.path.isfile(os.path.join(path_or_id, "config.json")):
            raise GptwoError(
                f"{path_or_id} has no config.json, so it is not a model folder",
                "pass a folder written by save_pretrained or gptwo train",
            )
        return path_or_id
    if not os.path.exists(path_or_id) and looks_like_a_path(path_or_id):
        raise _missing_folder(path_or_id)
    if os.path.exists(path_or_id) or not _HUB_ID.match(path_or_id):
        raise GptwoError(
            f"model '{path_or_id}' is neither a model folder nor a hub id",
            "pass a saved model folder or an id such as openai-community/gpt2",
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=path_or_id, allow_patterns=HUB_FILES)
    except Exception as err:
        raise GptwoError(
            f"could not get '{path_or_id}' from the Hugging Face hub ({type(err).__name__})",
            "check the id and the network, or pass a local model folder",
        ) from None


def model_chat_template(path_or_id: str) -> str | None:
    """The chat template a model carries, or None: a folder's (chat_template.jinja or tokenizer_config.json;
    hub ids resolve to folders) or a GGUF file's tokenizer.chat_template."""
    if is_gguf_spec(path_or_id):
        return read_gguf_chat_template(path_or_id)
    return read_chat_template(resolve_model_dir(path_or_id))


def read_config(directory: str) -> GPTConfig:
    """The GPTConfig of a model folder's config.json, or one line naming the file and what is wrong."""
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
        return config_from_hf(hf_config)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise GptwoError(
            f"{config_path} is not a valid GPT-2 config ({type(err).__name__}: {err})", "re-save the model"
        ) from None
    except GptwoError as err:
        raise GptwoError(f"{config_path}: {err.what}", err.fix) from None


def load_pretrained(
    path_or_id: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    adapter: str | None = None,
    merge: bool = False,
) -> GPT:
    """A GPT from a Hugging Face GPT-2 folder, a hub id or a GGUF file, in eval mode.

    A dtype named as text ('fp32', 'bf16') or `quantize="int8"` also prepares it for inference (gptwo.infer).
    `adapter`: a LoRA adapter folder (gptwo's RUN/adapter or peft's) applied to it, kept beside the unchanged
    weights in float32 (gptwo.lora.LoraLinear: it runs on the torch decode step), or with `merge` merged into
    the float weights before any dtype or quantization (one matmul per layer, the native step where it applies).
    """
    if is_gguf_spec(path_or_id):
        return _load_gguf(path_or_id, device, dtype, quantize, adapter, merge)[0]
    directory = resolve_model_dir(path_or_id)
    config = read_config(directory)
    shapes = stored_shapes(directory)
    if shapes is not None:  # before reading the weights or building the model
        check_shapes(config, shapes_from_hf(shapes), directory)
    check_memory(
        _weights_bytes(directory) + param_count(config) * torch.get_default_dtype().itemsize,
        f"loading {directory} ({describe(config)})",
        "load it on a machine with more memory",
    )
    state = state_dict_from_hf(read_weights(directory))
    check_finite(state, directory)
    return _placed(model_from_state(config, state, directory), device, dtype, quantize, adapter, merge)


def _placed(
    model: GPT,
    device: str | torch.device | None,
    dtype: torch.dtype | str | None,
    quantize: str | None,
    adapter: str | None = None,
    merge: bool = False,
) -> GPT:
    """`model` on `device` in eval mode: prepared for inference for a dtype named as text or `quantize`, else cast;
    with an `adapter` merged into it first, or applied (unmerged) after."""
    if adapter is not None and merge:
        model = load_adapter(model, adapter, merge_weights=True)
    if quantize is not None or isinstance(dtype, str):
        model = prepare_model(model.to(device=device or "cpu"), dtype=dtype, quantize=quantize)
    else:
        model = model.to(device=device or "cpu", dtype=dtype).eval()
    if adapter is not None and not merge:
        model = load_adapter(model, adapter, merge_weights=False)
    return model


def _load_gguf(
    path: str,
    device: str | torch.device | None,
    dtype: torch.dtype | str | None,
    quantize: str | None,
    adapter: str | None = None,
    merge: bool = False,
) -> tuple[GPT, Tokenizer]:
    """A GPT and its tokenizer from a gpt2 GGUF file (read by gptwo.gguf), checked and placed as a folder's are.

    q8_0 weights come back dequantized to float32; `quantize="int8"` then re-quantizes them as gptwo's
    per-channel int8, so the model stays about as small as the file.
    """
    config, state, tokenizer = read_gguf(path)
    check_vocab(config, tokenizer)
    check_finite(state, path)
    return _placed(model_from_state(config, state, path), device, dtype, quantize, adapter, merge), tokenizer


def save_pretrained(
    model: gptwo.model.GPT, directory: str, tokenizer: Tokenizer | None = None, chat_template: str | None = None
) -> None:
    """Write `config.json` + `model.safetensors` (+ `tokenizer.json`, with `chat_template` in its config) so
    transformers can load the folder."""
    from safetensors.torch import save

    if prepared_settings(model) is not None:  # re-laid or quantized layers no longer match the format
        raise GptwoError(
            "a model prepared for inference (quantized or re-laid) cannot be saved",
            "save the model before preparing it",
        )

    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, "model.safetensors"), save(state_dict_to_hf(model), metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, "tokenizer.json"))
        special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "model_max_length": model.config.block_size,
        }
        if chat_template is not None:
            tokenizer_config["chat_template"] = chat_template
        atomic_write(os.path.join(directory, "tokenizer_config.json"), json.dumps(tokenizer_config, indent=2).encode())
    eot = tokenizer.eot_token if tokenizer is not None else None
    config = json.dumps(config_to_hf(model.config, eot), indent=2).encode()
    atomic_write(os.path.join(directory, "config.json"), config)


# ---------------------------------------------------------------- model + tokenizer together
def load_model(
    path_or_id: str,
    device: str | None = "auto",
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    adapter: str | None = None,
    merge: bool = False,
) -> tuple[GPT, Tokenizer]:
    """The model and its tokenizer: the folder's tokenizer.json or vocab.json+merges.txt, else GPT-2's BPE.
    `adapter` and `merge`: a LoRA adapter applied to the model, as `load_pretrained` applies it."""
    if is_gguf_spec(path_or_id):
        return _load_gguf(path_or_id, resolve_device(device), dtype, quantize, adapter, merge)
    directory = resolve_model_dir(path_or_id)
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        tokenizer = load_tokenizer(directory)
    elif os.path.isfile(os.path.join(directory, "vocab.json")) and os.path.isfile(
        os.path.join(directory, "merges.txt")
    ):
        tokenizer = Tokenizer.from_bpe_files(
            os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
        )
    else:
        tokenizer = Tokenizer.gpt2()
    check_vocab(read_config(directory), tokenizer)  # before the weights are read
    model = load_pretrained(
        directory, device=resolve_device(device), dtype=dtype, quantize=quantize, adapter=adapter, merge=merge
    )
    return model, tokenizer


_TOKENIZER_PROBE = "Speculative decoding needs one tokenizer: 1234 café\n\tdef f(x): return x ** 2  # ok"


def check_draft_tokenizer(draft_tokenizer: Tokenizer, tokenizer: Tokenizer, draft_spec: str) -> None:
    """A draft model (speculative decoding) must share the target's tokenizer: same size, same ids for a probe."""
    if draft_tokenizer.n_vocab != tokenizer.n_vocab or draft_tokenizer.encode(_TOKENIZER_PROBE) != tokenizer.encode(
        _TOKENIZER_PROBE
    ):
        raise GptwoError(
            f"the draft model {draft_spec} has another tokenizer than the model",
            "use a draft trained with the model's tokenizer (e.g. on the same prepared data)",
        )


def check_vocab(config: GPTConfig, tokenizer: Tokenizer) -> None:
    """The model and its tokenizer must agree on the vocabulary.

    A model needs an output for every token id the tokenizer can produce, and the tokenizer text for
    every id the model can sample (an id past the tokenizer's last one would fail when sampled).
    """
    if tokenizer.n_vocab > config.vocab_size:
        raise GptwoError(
            f"the tokenizer has {tokenizer.n_vocab} tokens but the model's vocabulary is {config.vocab_size}",
            "use the tokenizer the model was trained with (the tokenizer.json in its folder)",
        )
    if tokenizer.n_vocab < config.vocab_size:
        raise GptwoError(
            f"the model's vocabulary is {config.vocab_size} but its tokenizer has only {tokenizer.n_vocab} tokens, "
            f"so sampled ids {tokenizer.n_vocab} and above would have no text",
            "put the tokenizer the model was trained with (its tokenizer.json) in the model folder",
        )
