"""LoRA (Hu et al. 2021): low-rank updates `W + (alpha/r)·B·A` of a finished GPT's linear layers, in peft's format.

Applied from outside model.py by swapping modules, as gptwo.infer.prepare does: each targeted linear layer
becomes a `LoraLinear` holding the frozen layer as `base_layer` and the trainable `lora_A` (r x in, Kaiming)
and `lora_B` (out x r, zero, so training starts from the base model). Names are peft's (`base_layer`,
`lora_A`, `lora_B`); a target matches a layer's name or the end of it (`c_proj` is attn.c_proj and
mlp.c_proj), as peft's `target_modules` do. GPT-2's Conv1D stores weights transposed (`fan_in_fan_out`), but
peft's A and B are laid out as for nn.Linear in both cases, so the files' tensors are ours unchanged.

An adapter folder is `adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.transformer.h.N.<layer>.lora_{A,B}.weight`, what `peft.PeftModel.from_pretrained` reads
for transformers' GPT2LMHeadModel. The token embedding (which is also the head) is never adapted.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptwo.errors import GptwoError
from gptwo.fileio import atomic_write
from gptwo.infer.linear import quantize_int8
from gptwo.infer.multilora import AdapterRows, MultiLoraLinear, adapter_rows, attach_rows
from gptwo.model import GPT

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# the linear layers of a block, by their names inside it (transformers' GPT-2 names)
LAYER_NAMES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")
BASES = ("fp32", "bf16", "int8")  # how the frozen base is kept while adapters train (the adapters: fp32)
_SETTINGS = "lora_settings"  # attribute set on a model carrying adapters


@dataclass(frozen=True)
class LoraSettings:
    """An adapter's shape: rank r, alpha (the update is scaled by alpha/r, or alpha/sqrt(r) with rsLoRA),
    dropout on the adapter's input, and the targeted layers (names or name endings, or one regex)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] | str = DEFAULT_TARGETS
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoraLinear(nn.Module):
    """`base_layer(x) + scaling · B(A(dropout(x)))`, the adapter in float32 whatever the base layer's precision."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, settings: LoraSettings):
        super().__init__()
        device = next(itertools.chain(base_layer.parameters(), base_layer.buffers())).device
        self.base_layer = base_layer
        self.lora_dropout = nn.Dropout(settings.dropout) if settings.dropout else nn.Identity()
        self.lora_A = nn.Linear(in_features, settings.rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(settings.rank, out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default (nn.Linear's own init)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = settings.scaling
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        a, b = self.lora_A.weight, self.lora_B.weight
        update = F.linear(F.linear(self.lora_dropout(x).to(a.dtype), a), b) * self.scaling
        return y + update.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B·A (out, in), the change to the base layer's nn.Linear weight."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())


class _Int8MatMul(torch.autograd.Function):
    """x @ (q · scales)ᵀ, dequantizing in the forward and again in the backward, so only the int8 weight is
    kept between them; gives the input's gradient only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, scales)
        ctx.x_dtype = x.dtype
        return F.linear(x, q.to(x.dtype) * scales.to(x.dtype)[:, None])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, scales = ctx.saved_tensors
        weight = q.to(grad.dtype) * scales.to(grad.dtype)[:, None]
        return (grad @ weight).to(ctx.x_dtype), None, None


class FrozenInt8Linear(nn.Module):
    """A frozen linear layer kept as int8 weights with one float32 scale per output channel (gptwo.infer's
    quantization) that gradients flow through to its input: the base of LoRA training from an int8 model."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scales = quantize_int8(linear.weight)
        self.register_buffer("qweight", q.to(linear.weight.device))
        self.register_buffer("scales", scales.to(linear.weight.device))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Int8MatMul.apply(x, self.qweight, self.scales.float())
        return y if self.bias is None else y + self.bias.to(y.dtype)


# ---------------------------------------------------------------- applying, merging
def lora_settings(model: nn.Module) -> LoraSettings | None:
    """The settings of the adapters `model` carries (applied by `apply_lora` or `load_adapter`), or None."""
    return getattr(model, _SETTINGS, None)


def target_layers(model: GPT, targets: tuple[str, ...] | str) -> list[str]:
    """The names (transformer.h.N.attn.c_attn, ...) of the blocks' linear layers `targets` select, as peft
    selects them: a regex string must match the whole name; a list's item must equal the name or its end."""
    names = [f"transformer.h.{i}.{layer}" for i in range(model.config.n_layer) for layer in LAYER_NAMES]
    if isinstance(targets, str):
        chosen = [n for n in names if re.fullmatch(targets, n)]
    else:
        chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        shown = targets if isinstance(targets, str) else ",".join(targets)
        raise GptwoError(
            f"LoRA targets {shown!r} name none of GPT-2's linear layers",
            "target c_attn, c_proj and/or c_fc (attn.c_proj or mlp.c_proj for one of the two c_proj)",
        )
    return chosen


def layer_shape(n_embd: int, name: str) -> tuple[int, int]:
    """(out, in) of a block's linear layer by its name (as nn.Linear; the base may be kept in another form)."""
    widths = {"attn.c_attn": (3, 1), "attn.c_proj": (1, 1), "mlp.c_fc": (4, 1), "mlp.c_proj": (1, 4)}
    out, inner = widths[name.split(".", 3)[3]]
    return out * n_embd, inner * n_embd


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


@torch.no_grad()
def apply_lora(model: GPT, settings: LoraSettings, base: str = "fp32") -> GPT:
    """`model` (in place) with every parameter frozen, its base kept in `base` precision (fp32, bf16, or int8
    for the blocks' linear layers with bf16 for the rest) and fresh adapters on the targeted layers."""
    if base not in BASES:
        raise GptwoError(f"LoRA base {base!r} is unknown", f"use one of {', '.join(BASES)}")
    if lora_settings(model) is not None:
        raise GptwoError("the model already carries LoRA adapters", "apply adapters to a plain model once")
    targets = target_layers(model, settings.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    if base == "int8":  # from the float weights, before the rest is cast
        for block in model.transformer.h:
            for layer in LAYER_NAMES:
                parent, attr = _parent(block, layer)
                setattr(parent, attr, FrozenInt8Linear(getattr(parent, attr)))
    if base != "fp32":
        model.to(torch.bfloat16)
        for m in model.modules():
            if isinstance(m, FrozenInt8Linear):
                m.scales = m.scales.float()
    for name in targets:
        parent, attr = _parent(model, name)
        out_features, in_features = layer_shape(model.config.n_embd, name)
        setattr(parent, attr, LoraLinear(getattr(parent, attr), in_features, out_features, settings))
    setattr(model, _SETTINGS, settings)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Name (transformer.h.N.attn.c_attn, ...) → LoraLinear, for the adapters `model` carries."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Add each adapter's update into its (float) base layer's weight; the adapters stop being applied."""
    for name, m in lora_layers(model).items():
        if not m.merged:
            _float_base(m, name).weight += m.delta_weight().to(m.base_layer.weight.dtype)
            m.merged = True


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Undo `merge`: subtract each update from its base layer's weight; the adapters apply again."""
    for name, m in lora_layers(model).items():
        if m.merged:
            _float_base(m, name).weight -= m.delta_weight().to(m.base_layer.weight.dtype)
            m.merged = False


def merge_and_unload(model: GPT) -> GPT:
    """`model` (in place) as a plain GPT: updates merged into the weights, the LoraLinear wrappers removed."""
    merge(model)
    for name, m in lora_layers(model).items():
        parent, attr = _parent(model, name)
        setattr(parent, attr, m.base_layer)
    if hasattr(model, _SETTINGS):
        delattr(model, _SETTINGS)
    return model


def _float_base(m: LoraLinear, name: str) -> nn.Linear:
    if not isinstance(m.base_layer, nn.Linear):
        raise GptwoError(
            f"{name} is kept as {type(m.base_layer).__name__}, into which an adapter cannot merge",
            "merge into a float model (load it without --quantize), or keep the adapter unmerged",
        )
    return m.base_layer


def merged_state(state: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict (our names, `base_layer` and `lora_A/B` inside) → a plain GPT's, in float32,
    each adapted weight W + scaling·B·A. Works from a full state dict, so also for DDP and FSDP models."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if ".lora_A." in key or ".lora_B." in key or key.endswith((".qweight", ".scales")):
            continue
        out[key.replace(".base_layer.", ".")] = tensor.detach().float()
    for key, tensor in state.items():
        if key.endswith(".qweight"):  # an int8 base layer (adapted or not)
            prefix = key[: -len(".qweight")]
            weight = tensor.float() * state[prefix + ".scales"].float()[:, None]
            out[prefix.replace(".base_layer", "") + ".weight"] = weight
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        layer = key[: -len(".lora_A.weight")]
        a, b = state[key].float(), state[layer + ".lora_B.weight"].float()
        out[layer + ".weight"] = out[layer + ".weight"] + settings.scaling * (b @ a)
    return out


# ---------------------------------------------------------------- adapter folders (peft's format)
def adapter_config(settings: LoraSettings, base_model: str = "") -> dict:
    """adapter_config.json as peft writes it for a LoRA of GPT2LMHeadModel (the fields peft reads)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": settings.targets if isinstance(settings.targets, str) else list(settings.targets),
        "fan_in_fan_out": True,  # GPT-2's Conv1D keeps weights (in, out)
        "bias": "none",
        "use_rslora": settings.use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": {
            "base_model_class": "GPT2LMHeadModel",
            "parent_library": "transformers.models.gpt2.modeling_gpt2",
        },
    }


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a LoRA model's state dict under peft's keys (base_model.model.…lora_A.weight)."""
    return {
        PEFT_PREFIX + key: tensor.detach().float().cpu().contiguous()
        for key, tensor in state.items()
        if key.endswith((".lora_A.weight", ".lora_B.weight"))
    }


def save_adapter(directory: str, settings: LoraSettings, state: dict[str, torch.Tensor], base_model: str = "") -> None:
    """Write an adapter folder (adapter_config.json + adapter_model.safetensors) from a LoRA model's state
    dict; each file atomically, the config last."""
    from safetensors.torch import save

    os.makedirs(directory, exist_ok=True)
    data = save(adapter_tensors(state), metadata={"format": "pt"})
    atomic_write(os.path.join(directory, ADAPTER_WEIGHTS), data)
    text = json.dumps(adapter_config(settings, base_model), indent=2) + "\n"
    atomic_write(os.path.join(directory, ADAPTER_CONFIG), text.encode())


def read_adapter(directory: str) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
    """An adapter folder's settings and tensors (our names: transformer.h.N.….lora_A.weight), checked; gptwo's
    and peft's LoRA adapters of GPT-2 (GPT2LMHeadModel or GPT2Model keys) load."""
    fix = "pass a folder holding adapter_config.json and adapter_model.safetensors (e.g. RUN/adapter)"
    config_path, weights_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isdir(directory):
        raise GptwoError(f"adapter folder {directory} does not exist", fix)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise GptwoError(f"{directory} has no {os.path.basename(path)}, so it is not an adapter folder", fix)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise GptwoError(f"{config_path} is not valid JSON ({err})", "re-save the adapter") from None
    settings = _settings_from_config(config, config_path)
    from safetensors.torch import load_file

    try:
        raw = load_file(weights_path)
    except Exception as err:
        raise GptwoError(
            f"adapter file {weights_path} is corrupt or truncated ({err})", "re-save the adapter"
        ) from None
    tensors = {}
    for key, tensor in raw.items():
        name = key.removeprefix(PEFT_PREFIX)
        name = re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", name)  # peft's in-memory name
        if not name.startswith("transformer."):
            name = "transformer." + name  # keys of a GPT2Model
        if not re.fullmatch(
            r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_[AB]\.weight", name
        ):
            raise GptwoError(
                f"{weights_path} holds {key}, which is not a LoRA A or B matrix of a GPT-2 block's linear layer",
                "use a LoRA adapter of c_attn, c_proj and/or c_fc (no trained embeddings, head or biases)",
            )
        tensors[name] = tensor
    for name in tensors:
        other = name[: -len("A.weight")] + ("B.weight" if ".lora_A." in name else "A.weight")
        if other not in tensors:
            raise GptwoError(f"{weights_path} has {name} without its partner {other}", "re-save the adapter")
    return settings, tensors


def _settings_from_config(config: dict, path: str) -> LoraSettings:
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise GptwoError(f"{path} is not a LoRA adapter (peft_type {kind!r})", "use a LoRA adapter (peft_type LORA)")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "layers_to_transform": config.get("layers_to_transform") is not None,
        "lora_bias": bool(config.get("lora_bias")),
    }
    for key, bad in unsupported.items():
        if bad:
            raise GptwoError(
                f"{path} sets {key}={config.get(key)!r}, which gptwo does not load",
                "use a plain LoRA adapter (no DoRA, trained biases, extra modules or per-layer ranks)",
            )
    try:
        rank, alpha = int(config["r"]), float(config.get("lora_alpha", 8))
        targets = config.get("target_modules") or ["c_attn"]
    except (KeyError, TypeError, ValueError) as err:
        raise GptwoError(f"{path} has no valid LoRA rank r ({err})", "re-save the adapter") from None
    if rank <= 0:
        raise GptwoError(f"{path} has rank r={rank}", "use an adapter of rank 1 or more")
    return LoraSettings(
        rank=rank,
        alpha=alpha,
        dropout=float(config.get("lora_dropout") or 0.0),
        targets=targets if isinstance(targets, str) else tuple(targets),
        use_rslora=bool(config.get("use_rslora")),
    )


def _adapter_layers(model: GPT, directory: str, settings: LoraSettings, tensors: dict[str, torch.Tensor]) -> list[str]:
    """The layers (transformer.h.N.attn.c_attn, ...) an adapter read from `directory` adapts, checked against
    `model`: each must be one of its layers, with A (r, in) and B (out, r) of its shape and the adapter's rank."""
    layers = sorted({name.rsplit(".", 2)[0] for name in tensors})
    known = {f"transformer.h.{i}.{layer}" for i in range(model.config.n_layer) for layer in LAYER_NAMES}
    for name in layers:
        if name not in known:
            raise GptwoError(
                f"the adapter in {directory} is for {name}, which this {model.config.n_layer}-layer model lacks",
                "load the adapter onto the base model it was trained from",
            )
        out_features, in_features = layer_shape(model.config.n_embd, name)
        for part, want in (("A", (settings.rank, in_features)), ("B", (out_features, settings.rank))):
            shape = tuple(tensors[f"{name}.lora_{part}.weight"].shape)
            if shape != want:
                raise GptwoError(
                    f"{name}.lora_{part} in {directory} has shape {shape}, but rank r={settings.rank} on this "
                    f"model's layer needs {want}",
                    "load the adapter onto the base model it was trained from (and check its config's r)",
                )
    return layers


@torch.no_grad()
def load_adapter(model: GPT, directory: str, merge_weights: bool = True) -> GPT:
    """`model` (in place) with the adapter of `directory` applied: merged into its weights (a plain GPT), or
    kept as LoraLinear layers beside the unchanged base. The adapter's layers must be the model's."""
    settings, tensors = read_adapter(directory)
    layers = _adapter_layers(model, directory, settings, tensors)
    # the layers the file holds (a regex matching exactly their names)
    apply_lora(model, dataclasses.replace(settings, targets="|".join(re.escape(n) for n in layers)))
    for name, m in lora_layers(model).items():
        for part in "AB":
            getattr(m, f"lora_{part}").weight.copy_(tensors[f"{name}.lora_{part}.weight"])
    return merge_and_unload(model) if merge_weights else model.eval()


@torch.no_grad()
def load_adapters(model: GPT, adapters: Sequence[tuple[str, str]]) -> GPT:
    """`model` (in place, eval mode) carrying the adapters `adapters` ((name, folder) pairs) at once, unmerged,
    for batches whose rows use different ones (gptwo.infer.multilora): adapter i is slot i + 1, the base slot 0.

    Each adapted layer becomes a MultiLoraLinear over its unchanged base layer (float, prepared or int8), the
    adapters stacked in float32 and padded to the largest rank, each one's scaling folded into its B; an
    adapter that leaves a layer alone has zeros there."""
    names = [name for name, _ in adapters]
    for name in names:
        if not name or names.count(name) > 1:
            raise GptwoError(
                f"the adapter name {name!r} is " + ("empty" if not name else "given twice"),
                "give each adapter its own name (NAME=DIR)",
            )
    if lora_settings(model) is not None or adapter_rows(model) is not None:
        raise GptwoError("the model already carries LoRA adapters", "load adapters onto a plain model once")
    loaded = []
    for _, directory in adapters:
        settings, tensors = read_adapter(directory)
        loaded.append((settings, tensors, _adapter_layers(model, directory, settings, tensors)))
    rank = max(settings.rank for settings, _, _ in loaded)
    rows = AdapterRows(tuple(names))
    for name in sorted({layer for _, _, layers in loaded for layer in layers}):
        parent, attr = _parent(model, name)
        base = getattr(parent, attr)
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        out_features, in_features = layer_shape(model.config.n_embd, name)
        a = torch.zeros(len(loaded) + 1, rank, in_features, device=device)
        b = torch.zeros(len(loaded) + 1, out_features, rank, device=device)
        for slot, (settings, tensors, layers) in enumerate(loaded, start=1):
            if name in layers:
                a[slot, : settings.rank] = tensors[f"{name}.lora_A.weight"].float()
                b[slot, :, : settings.rank] = tensors[f"{name}.lora_B.weight"].float() * settings.scaling
        setattr(parent, attr, MultiLoraLinear(base, a, b, rows))
    attach_rows(model, rows)
    return model.eval()
