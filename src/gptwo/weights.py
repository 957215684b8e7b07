"""Hugging Face GPT-2 checkpoints in and out: `config.json` + `model.safetensors` (or `pytorch_model.bin`).

Names match transformers' `GPT2LMHeadModel`; its `Conv1D` layers store weights as (in, out), the
transpose of our `nn.Linear`. Weights never load through pickle: safetensors, or
`torch.load(weights_only=True)` for old `.bin` files. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import re

import torch

from gptwo.config import GPTConfig
from gptwo.errors import GptwoError
from gptwo.fileio import atomic_write
from gptwo.model import GPT
from gptwo.tokenizer import EOT, Tokenizer, load_tokenizer

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB_FILES = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.json", "merges.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers; the head is tied to wte
        key = name if name.startswith("transformer.") else "transformer." + name
        ours[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
    return ours


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our names and layouts → HF's (contiguous, lm_head left out as it is tied to wte)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach().cpu()
        out[name] = (tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor).contiguous()
    return out


def load_state_dict_into(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, naming the first missing, unexpected or mis-shaped tensor."""
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise GptwoError(
            f"weights in {source} do not fit a GPT-2 of this config ({what})",
            "use weights saved from the same model shape",
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise GptwoError(
                f"{name} in {source} has shape {tuple(tensor.shape)} but the config needs {tuple(expected[name].shape)}",
                "check that config.json matches the weights",
            )
    model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]}, strict=True)


def model_from_state(config: GPTConfig, state: dict[str, torch.Tensor], source: str) -> GPT:
    """A CPU GPT of `config` holding `state` (our names; the head comes from wte): every load path builds models here.

    The model is built on the meta device (no random init of weights about to be overwritten), then
    given real tensors; `to_empty` replaces each parameter, which unties the head from the embedding,
    so the tie is restored before the weights are copied in.
    """
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    load_state_dict_into(model, {k: v for k, v in state.items() if k != "lm_head.weight"}, source)
    return model


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


# ---------------------------------------------------------------- folders and hub ids
def resolve_model_dir(path_or_id: str) -> str:
    """A local folder with config.json: `path_or_id` itself, or a hub snapshot downloaded on demand."""
    if os.path.isdir(path_or_id):
        if not os.path.isfile(os.path.join(path_or_id, "config.json")):
            raise GptwoError(
                f"{path_or_id} has no config.json, so it is not a model folder",
                "pass a folder written by save_pretrained or gptwo train",
            )
        return path_or_id
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


def load_pretrained(
    path_or_id: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
) -> GPT:
    """A GPT from a Hugging Face GPT-2 folder or hub id, in eval mode.

    A dtype named as text ('fp32', 'bf16') or `quantize="int8"` also prepares it for inference (gptwo.infer).
    """
    directory = resolve_model_dir(path_or_id)
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
        config = config_from_hf(hf_config)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise GptwoError(
            f"{config_path} is not a valid GPT-2 config ({type(err).__name__}: {err})", "re-save the model"
        ) from None
    model = model_from_state(config, state_dict_from_hf(read_weights(directory)), directory)
    if quantize is not None or isinstance(dtype, str):
        from gptwo.infer import prepare_model

        return prepare_model(model.to(device=device or "cpu"), dtype=dtype, quantize=quantize)
    model.to(device=device or "cpu", dtype=dtype)
    return model.eval()


def save_pretrained(model: GPT, directory: str, tokenizer: Tokenizer | None = None) -> None:
    """Write `config.json` + `model.safetensors` (+ `tokenizer.json`) so transformers can load the folder."""
    from safetensors.torch import save

    if getattr(
        model, "inference_prepared", None
    ):  # set by gptwo.infer.prepare_model: its layers no longer match the format
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
        atomic_write(os.path.join(directory, "tokenizer_config.json"), json.dumps(tokenizer_config, indent=2).encode())
    eot = tokenizer.eot_token if tokenizer is not None else None
    config = json.dumps(config_to_hf(model.config, eot), indent=2).encode()
    atomic_write(os.path.join(directory, "config.json"), config)


# ---------------------------------------------------------------- model + tokenizer together
def resolve_device(device: str | None = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GptwoError(f"unknown device '{device}'", "use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GptwoError(
            "CUDA was asked for but is not available", "use --device cpu, or install a CUDA build of torch"
        )
    return dev


def load_model(
    path_or_id: str, device: str | None = "auto", dtype: torch.dtype | str | None = None, quantize: str | None = None
) -> tuple[GPT, Tokenizer]:
    """The model and its tokenizer: the folder's tokenizer.json or vocab.json+merges.txt, else GPT-2's BPE."""
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
    model = load_pretrained(directory, device=resolve_device(device), dtype=dtype, quantize=quantize)
    check_vocab(model.config, tokenizer)
    return model, tokenizer


def check_vocab(config: GPTConfig, tokenizer: Tokenizer) -> None:
    """The model must have an output for every token id the tokenizer can produce."""
    if tokenizer.n_vocab > config.vocab_size:
        raise GptwoError(
            f"the tokenizer has {tokenizer.n_vocab} tokens but the model's vocabulary is {config.vocab_size}",
            "use the tokenizer the model was trained with (the tokenizer.json in its folder)",
        )
