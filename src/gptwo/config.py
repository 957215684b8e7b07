"""Model configuration: GPT-2's shape as a dataclass, with the four published sizes as presets."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from gptwo.errors import GptwoError

# GPT-2 paper, Table 2 (Radford et al., 2019): 117M/345M/762M/1542M as published, 124M/355M/774M/1.5B as counted.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


# Sane maxima of a model's shape, far above any GPT-2 (XL: 48 layers, 1600 wide, 1024 context, 50,257
# tokens) and GPT-3 (96 layers, 12288 wide): past them a config is a typo or a hostile file, and a
# model of that shape would take minutes to build or more memory than a machine has.
MAX_SHAPE = {"vocab_size": 1 << 22, "block_size": 1 << 20, "n_layer": 1024, "n_head": 1024, "n_embd": 1 << 16}
MAX_SELECTION_POOL = 64  # a pool of K batches is scored (K forward passes) for every micro-batch


def check_shape_bounds(values: dict, what: str = "model config") -> None:
    """Refuse a shape field beyond MAX_SHAPE, naming it and the limit."""
    for name, limit in MAX_SHAPE.items():
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise GptwoError(
                f"{what} {name}={value:,} is more than {limit:,}",
                f"use a smaller {name} (GPT-2 XL has n_layer=48, n_embd=1600, block_size=1024, vocab_size=50257)",
            )


@dataclass
class GPTConfig:
    """The shape of a GPT-2 model. Defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257
    block_size: int = 1024  # context length (HF: n_positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):  # TypeError: loaders name the file it came from
                raise TypeError(f"model config {name}={value!r} is not an integer")
            if value <= 0:
                raise GptwoError(
                    f"model config {name}={getattr(self, name)} must be positive", "set it to a positive integer"
                )
        check_shape_bounds(self.to_dict())
        if self.n_embd % self.n_head:
            raise GptwoError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}",
                "choose n_embd as a multiple of n_head (e.g. 64 per head)",
            )
        if not isinstance(self.layer_norm_eps, (int, float)) or not 0 < self.layer_norm_eps < 1:
            raise GptwoError(f"layer_norm_eps={self.layer_norm_eps!r} is not a small positive number", "use e.g. 1e-5")
        if not 0.0 <= self.dropout < 1.0:
            raise GptwoError(f"dropout={self.dropout} is out of range", "use a value in [0, 1)")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """One of gpt2, gpt2-medium, gpt2-large, gpt2-xl (hub-style ids like openai-community/gpt2 work too)."""
        key = name.split("/")[-1]
        if key not in MODEL_PRESETS:
            raise GptwoError(f"unknown model preset '{name}'", f"use one of: {', '.join(MODEL_PRESETS)}")
        return cls(**{**MODEL_PRESETS[key], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# ---------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Everything `gptwo train` needs besides the data: model shape, batch, optimizer, schedule, logging.

    Global batch in tokens = batch_size * block_size * grad_accum * world_size. With `batch_tokens`
    set, grad_accum is derived from it so the same config runs on 1 or N processes.
    """

    # model shape (vocab_size comes from the data's tokenizer; ignored with init_from)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 128
    dropout: float = 0.0
    init_from: str = ""  # "" = random init; else gpt2 / a model folder / a hub id
    # batch
    batch_size: int = 16  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches per step, per process
    batch_tokens: int = 0  # if > 0: global tokens per step; grad_accum is derived from it
    sampling: str = "sequential"  # sequential: the loader's order; random: rows from random places (small corpora)
    # data selection (docs/selection.md): train on the top batch_size rows of selection_pool batches
    # uniform: the loader's batch; loss: highest current loss; reducible: loss minus a reference's
    selection: str = "uniform"
    selection_pool: int = 4  # candidates per micro-batch = selection_pool * batch_size (loss and reducible only)
    selection_reference: str = ""  # model or run folder scoring the reference loss (selection=reducible)
    # optimizer and schedule (GPT-3 paper, section 2.3 and appendix B)
    # adamw: AdamW for every parameter; muon: Muon for the blocks' matrices, AdamW for the rest (docs/training.md)
    optimizer: str = "adamw"
    max_steps: int = 1000
    # if > 0: seconds of training; max_steps is cut to fit, from the speed measured by warm-up's end
    max_time: float = 0.0
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1  # on 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    # LoRA (docs/training.md, LoRA): lora_rank > 0 trains low-rank adapters on the init_from model, which stays frozen
    lora_rank: int = 0
    lora_alpha: float = 0.0  # the update is scaled by lora_alpha / lora_rank; 0 = lora_rank (a scale of 1)
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = "c_attn,c_proj,c_fc"  # comma-separated layer names (c_proj: the attention's and the MLP's)
    lora_base: str = "fp32"  # the frozen base's precision: fp32, bf16, or int8 (blocks' linears; bf16 elsewhere)
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_batches: int = 20
    sample_tokens: int = 48  # tokens per sample shown at each evaluation (0: none)
    sample_prompt: str = "The"
    log_every: int = 1
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # system
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 elsewhere; or float32 / bfloat16
    compile: str = "auto"  # auto: torch.compile on CUDA only; or true / false
    parallel: str = "ddp"  # ddp or fsdp (when launched under torchrun)
    threads: int = 0  # CPU threads for torch; 0 = all cores (split between local processes)
    peak_flops: float = 0.0  # accelerator peak FLOP/s for MFU; 0 = look up the GPU

    def __post_init__(self) -> None:
        for name, value in self.to_dict().items():
            if isinstance(value, float) and not math.isfinite(value):
                raise GptwoError(f"train config {name}={value} is not a finite number", f"give {name} a finite value")
        for name in (
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_every",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_batches",
            "selection_pool",
        ):
            if getattr(self, name) <= 0:
                raise GptwoError(
                    f"train config {name}={getattr(self, name)} must be positive", f"set {name} to a positive integer"
                )
        for name in (
            "warmup_steps",
            "batch_tokens",
            "sample_tokens",
            "threads",
            "weight_decay",
            "grad_clip",
            "peak_flops",
            "max_time",
            "lora_rank",
            "lora_alpha",
        ):
            if getattr(self, name) < 0:
                raise GptwoError(f"train config {name}={getattr(self, name)} is negative", f"set {name} to 0 or more")
        check_shape_bounds(self.to_dict(), "train config")
        if self.selection_pool > MAX_SELECTION_POOL:
            raise GptwoError(
                f"train config selection_pool={self.selection_pool:,} is more than {MAX_SELECTION_POOL}: every "
                f"micro-batch would score {self.selection_pool:,} x batch_size rows before one training step",
                f"use selection_pool=2 to {MAX_SELECTION_POOL} (docs/selection.md uses 4)",
            )
        if not 0 <= self.seed < 2**63:
            raise GptwoError(
                f"train config seed={self.seed} is outside [0, 2**63)", "use a non-negative seed, e.g. seed=0"
            )
        if not self.lr > 0:
            raise GptwoError(f"train config lr={self.lr} must be positive", "use e.g. lr=6e-4")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise GptwoError(f"min_lr_ratio={self.min_lr_ratio} is outside [0, 1]", "use e.g. 0.1")
        if self.parallel not in ("ddp", "fsdp"):
            raise GptwoError(f"parallel={self.parallel!r} is unknown", "use parallel=ddp or parallel=fsdp")
        if self.optimizer not in ("adamw", "muon"):
            raise GptwoError(f"optimizer={self.optimizer!r} is unknown", "use optimizer=adamw or optimizer=muon")
        if self.sampling not in ("sequential", "random"):
            raise GptwoError(f"sampling={self.sampling!r} is unknown", "use sampling=sequential or sampling=random")
        if self.selection not in ("uniform", "loss", "reducible"):
            raise GptwoError(f"selection={self.selection!r} is unknown", "use selection=uniform, loss or reducible")
        if (self.selection == "reducible") != bool(self.selection_reference):
            raise GptwoError(
                "selection=reducible and selection_reference=PATH go together",
                "give both (the reference is a model folder), or neither",
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise GptwoError(f"lora_dropout={self.lora_dropout} is out of range", "use a value in [0, 1)")
        if self.lora_base not in ("fp32", "bf16", "int8"):
            raise GptwoError(f"lora_base={self.lora_base!r} is unknown", "use lora_base=fp32, bf16 or int8")
        if not self.lora_target_names:
            raise GptwoError("lora_targets is empty", "name the layers to adapt, e.g. lora_targets=c_attn,c_proj,c_fc")
        if self.compile not in ("auto", "true", "false"):
            raise GptwoError(f"compile={self.compile!r} is unknown", "use compile=auto, true or false")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise GptwoError(f"dtype={self.dtype!r} is unknown", "use dtype=auto, float32 or bfloat16")
        if self.init_from == "" and self.n_embd % self.n_head:
            raise GptwoError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}",
                "choose n_embd as a multiple of n_head",
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        """lora_targets as a tuple of layer names."""
        return tuple(name.strip() for name in self.lora_targets.split(",") if name.strip())

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPT shape this config trains from scratch."""
        return GPTConfig(
            vocab_size=vocab_size,
            block_size=self.block_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            dropout=self.dropout,
        )


def _gpt2_recipe(size: str, lr: float, batch_size: int) -> dict:
    """GPT-2 shape trained with GPT-3's recipe (Brown et al., 2020, table 2.1 and appendix B): 0.5M-token
    batches, linear warm-up over 375M tokens, cosine decay to 10%, AdamW(0.9, 0.95), wd 0.1, clip 1.0.
    Steps default to 10B tokens (19,073 steps), as in llm.c's GPT-2 reproductions."""
    return dict(
        **MODEL_PRESETS[size],
        block_size=1024,
        batch_size=batch_size,
        batch_tokens=524288,
        lr=lr,
        warmup_steps=715,
        max_steps=19073,
        eval_every=250,
        eval_batches=20,
        checkpoint_every=1000,
        log_every=10,
        sample_tokens=64,
    )


TRAIN_PRESETS: dict[str, dict] = {
    # A small GPT-2 that learns real English in minutes on a 2-core CPU (the quickstart's model).
    "cpu": dict(
        n_layer=4,
        n_head=2,
        n_embd=128,
        block_size=128,
        batch_size=16,
        grad_accum=1,
        sampling="random",
        lr=3e-3,
        warmup_steps=100,
        max_steps=3000,
        eval_every=250,
        eval_batches=20,
        checkpoint_every=500,
        log_every=10,
        device="cpu",
    ),
    "gpt2": _gpt2_recipe("gpt2", 6e-4, 16),
    "gpt2-medium": _gpt2_recipe("gpt2-medium", 3e-4, 8),
    "gpt2-large": _gpt2_recipe("gpt2-large", 2.5e-4, 4),
    "gpt2-xl": _gpt2_recipe("gpt2-xl", 2e-4, 2),
}


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _parse_value(name: str, text: str, kind: type):
    """A `key=value` override's value as the field's type, or an error naming the type."""
    try:
        if kind is bool:
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return text
    except ValueError:
        raise GptwoError(
            f"{name}={text!r} is not {_KIND_NAMES[kind]}", f"give {name} {_KIND_NAMES[kind]} value"
        ) from None


def _read_config_file(path: str) -> dict:
    """A JSON or TOML file (by extension) holding TrainConfig fields; may name a `preset`."""
    import json
    import tomllib

    kind = "TOML" if path.endswith(".toml") else "JSON"
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "not found"
        raise GptwoError(f"config file {path} {what}", f"pass a {kind} file of config fields with --config")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        values = tomllib.loads(raw.decode("utf-8")) if kind == "TOML" else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise GptwoError(f"config file {path} is not valid {kind} ({err})", "fix its syntax") from None
    if not isinstance(values, dict):
        raise GptwoError(
            f"config file {path} holds a {type(values).__name__}, not an object of config fields",
            'write e.g. {"lr": 3e-4, "n_layer": 6}',
        )
    return values


def train_fields() -> dict[str, type]:
    """TrainConfig's field names and their types (for overrides and --help)."""
    kinds = {"int": int, "float": float, "str": str}
    return {f.name: kinds[f.type] if isinstance(f.type, str) else f.type for f in dataclasses.fields(TrainConfig)}


def _pretrained_shape(spec: str) -> dict:
    """n_layer/n_head/n_embd of a pretrained model without loading it (a folder's config.json, or a GPT-2
    preset); {} if unknown."""
    import json

    if os.path.isdir(spec):
        try:
            with open(os.path.join(spec, "config.json"), encoding="utf-8") as f:
                hf = json.load(f)
            return {key: hf[key] for key in ("n_layer", "n_head", "n_embd")} if isinstance(hf, dict) else {}
        except (OSError, ValueError, KeyError):
            return {}
    return MODEL_PRESETS.get(spec.split("/")[-1], {})


def _refuse_shape_with_init(values: dict, explicit: list[str]) -> None:
    """A fine-tune keeps the pretrained model's shape: an explicit shape setting that differs from it is an error."""
    init_from = values.get("init_from")
    shape = _pretrained_shape(init_from) if init_from else {}
    for key in ("n_layer", "n_head", "n_embd"):
        if init_from and key in explicit and shape.get(key) != values[key]:
            known = f"its {key} is {shape[key]}" if key in shape else "its shape is not known before loading"
            raise GptwoError(
                f"{key}={values[key]} cannot apply with --init-from {init_from} "
                f"({known}; a fine-tune keeps the pretrained shape)",
                f"drop {key}, or train from scratch without --init-from",
            )


def load_train_config(
    preset: str | None = None, config_file: str | None = None, overrides: list[str] | dict | None = None
) -> TrainConfig:
    """TrainConfig from a preset and/or a JSON/TOML file, then `key=value` overrides (type-checked)."""
    fields = train_fields()
    values: dict = {}
    file_values = _read_config_file(config_file) if config_file else {}
    preset = preset or file_values.pop("preset", None)
    if preset is not None:
        if preset not in TRAIN_PRESETS:
            raise GptwoError(f"unknown training preset '{preset}'", f"use one of: {', '.join(TRAIN_PRESETS)}")
        values.update(TRAIN_PRESETS[preset])
    given: dict = dict(file_values)
    where = {key: f"config file {config_file}" for key in file_values}
    if isinstance(overrides, dict):
        given.update(overrides)
    else:
        for item in overrides or []:
            key, sep, text = item.partition("=")
            if not sep:
                raise GptwoError(f"override '{item}' is not key=value", "write e.g. lr=3e-4")
            if key.strip() not in fields:
                raise GptwoError(f"unknown config key '{key}'", f"valid keys: {' '.join(fields)}")
            given[key.strip()] = _parse_value(key, text.strip(), fields[key.strip()])
            where[key.strip()] = "the command line"
    for key, value in given.items():
        source = f" (in {where[key]})" if key in where else ""
        if key not in fields:
            raise GptwoError(f"unknown config key '{key}'{source}", f"valid keys: {' '.join(fields)}")
        kind = fields[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise GptwoError(
                f"config key {key}={value!r}{source} is not {_KIND_NAMES[kind]}",
                f"give {key} {_KIND_NAMES[kind]} value",
            )
        values[key] = value
    _refuse_shape_with_init(values, [key for key in given if key in where])
    if "grad_accum" in given and "batch_tokens" not in given:
        values["batch_tokens"] = 0  # an explicit grad_accum wins over a preset's token budget
    return TrainConfig(**values)
