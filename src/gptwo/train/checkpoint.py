"""Checkpoints that resume exactly and load anywhere.

`RUN/checkpoints/step_N/` holds the weights in Hugging Face's GPT-2 layout (config.json,
model.safetensors, tokenizer.json: `gptwo generate --model` and transformers read it), the
optimizer's tensors (optimizer.safetensors) and everything else as JSON (trainer.json: step,
config, data-loader positions and RNG states of every rank). A checkpoint is built in
`step_N.tmp-*` and renamed into place, so a crash or a full disk never leaves one that loads
wrong. RUN itself always holds the latest weights, so `--model RUN` works too.

A LoRA run (lora_rank=R) saves its model merged (base + adapters, the same files) and its adapters
alone in `adapter/` (peft's adapter_config.json + adapter_model.safetensors), in each checkpoint
and in RUN; it resumes from the adapters onto its base, loaded again from init_from.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from gptwo.errors import GptwoError
from gptwo.fileio import atomic_write
from gptwo.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraSettings,
    lora_settings,
    merged_state,
    read_adapter,
    save_adapter,
)
from gptwo.model import GPT
from gptwo.tokenizer import Tokenizer
from gptwo.train.distributed import Dist, barrier, gather_objects, unwrap
from gptwo.weights import check_finite, model_from_state, read_weights, save_pretrained, state_dict_from_hf

CHECKPOINTS = "checkpoints"
ADAPTER_DIR = "adapter"  # a LoRA run's adapter, in the checkpoint and in RUN (peft's layout)
# copied to RUN in this order, config last
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "model.safetensors", "config.json")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in a run, oldest first."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root) if (m := _STEP_DIR.match(name))]
    return sorted(p for p in found if os.path.isfile(os.path.join(p[1], "trainer.json")))


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ---------------------------------------------------------------- RNG states (JSON-able)
def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """This process's torch (CPU and CUDA), numpy and python RNG states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---------------------------------------------------------------- save
def _write_bytes(path: str, data: bytes) -> None:
    """Write a file inside a checkpoint being built (the folder rename makes it atomic)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _optimizer_files(optim_state: dict) -> tuple[bytes, dict]:
    """Optimizer state as safetensors bytes (tensors, keyed 'param::name') and a JSON-able rest."""
    from safetensors.torch import save

    tensors, scalars = {}, {}
    for param, values in optim_state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}::{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param}::{name}"] = value
    return save(tensors), {"param_groups": optim_state["param_groups"], "scalars": scalars}


def _export_model(model: torch.nn.Module, model_state: dict) -> GPT:
    """A plain CPU GPT holding `model_state` (needed when the training model is sharded, and merged from
    a LoRA model's base and adapters)."""
    inner = unwrap(model)
    settings = lora_settings(inner)
    if settings is not None:
        return model_from_state(inner.config, merged_state(model_state, settings), "the training model")
    if not any(type(p).__name__ == "DTensor" for p in inner.parameters()):
        return inner
    return model_from_state(inner.config, model_state, "the training model")


def save_checkpoint(
    run_dir: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    tokenizer: Tokenizer,
    trainer: dict,
    info: Dist,
    loader_state: dict,
    keep: int,
    chat_template: str | None = None,
) -> str | None:
    """Write RUN/checkpoints/step_N atomically (all ranks call this; rank 0 writes); returns its path on rank 0.

    `chat_template` (the data's, for chat data) goes into tokenizer_config.json, as transformers reads it."""
    model_state, optim_state = get_state_dict(
        unwrap(model), optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    per_rank = gather_objects({"loader": loader_state, "rng": rng_state()}, info)
    path = None
    if info.is_main:
        settings = lora_settings(unwrap(model))
        path = _write_checkpoint(
            run_dir,
            step,
            _export_model(model, model_state),
            optim_state,
            tokenizer,
            {**trainer, "step": step, "world_size": info.world_size, "ranks": per_rank},
            None if settings is None else (settings, model_state),
            chat_template,
        )
        _prune(run_dir, keep)
    barrier(info)
    return path


def _write_checkpoint(
    run_dir: str,
    step: int,
    model: GPT,
    optim_state: dict,
    tokenizer: Tokenizer,
    trainer: dict,
    lora: tuple[LoraSettings, dict] | None = None,
    chat_template: str | None = None,
) -> str:
    """The checkpoint folder, then RUN's copy of its model files (and of its LoRA adapter, RUN/adapter/)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    final = os.path.join(root, f"step_{step}")
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f"step_{step}.tmp-")
    what = f"could not write checkpoint step_{step}"
    try:
        save_pretrained(model, tmp, tokenizer=tokenizer, chat_template=chat_template)
        if lora is not None:  # the adapter alone, in peft's layout (the model files hold it merged)
            save_adapter(os.path.join(tmp, ADAPTER_DIR), *lora, base_model=trainer["config"].get("init_from", ""))
        optim_bytes, optim_json = _optimizer_files(optim_state)
        _write_bytes(os.path.join(tmp, "optimizer.safetensors"), optim_bytes)
        _write_bytes(os.path.join(tmp, "trainer.json"), json.dumps({**trainer, "optimizer": optim_json}).encode())
        if os.path.exists(final):  # the same step saved again (e.g. the last step): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        what = f"could not update the model files in {run_dir}"  # the checkpoint itself is complete
        for name in MODEL_FILES:  # RUN itself: the latest weights, one atomic file at a time
            with open(os.path.join(final, name), "rb") as f:
                atomic_write(os.path.join(run_dir, name), f.read())
        if lora is not None:
            os.makedirs(os.path.join(run_dir, ADAPTER_DIR), exist_ok=True)
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):  # config last
                with open(os.path.join(final, ADAPTER_DIR, name), "rb") as f:
                    atomic_write(os.path.join(run_dir, ADAPTER_DIR, name), f.read())
    except (OSError, GptwoError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = _reason(err)
        last = latest_checkpoint(run_dir)
        kept = f"; {os.path.basename(last)} is intact, continue from it with --resume" if last else ""
        fix = (
            "free disk space"
            if isinstance(err, OSError) and err.errno == errno.ENOSPC or "space" in reason
            else "check the output folder"
        )
        raise GptwoError(f"{what} ({reason}){kept}", fix) from None
    return final


def _reason(err: Exception) -> str:
    """The system's words for a failed write ('No space left on device'), also inside a GptwoError."""
    if isinstance(err, OSError):
        return os.strerror(err.errno) if err.errno else str(err)
    found = re.search(r"\(([^()]*)\)\s*$", getattr(err, "what", ""))
    return found.group(1) if found else str(err)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(run_dir: str, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove older ones and leftovers of interrupted writes."""
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    root = os.path.join(run_dir, CHECKPOINTS)
    for name in os.listdir(root):
        if ".tmp-" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# ---------------------------------------------------------------- load
def read_trainer_state(checkpoint_dir: str) -> dict:
    """trainer.json of a checkpoint, or an error naming it."""
    path = os.path.join(checkpoint_dir, "trainer.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise GptwoError(
            f"checkpoint file {path} is unreadable ({err})",
            "delete that checkpoint folder to resume from the one before",
        ) from None


def load_checkpoint(
    checkpoint_dir: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    info: Dist,
) -> dict:
    """Restore weights, optimizer state and this rank's RNG state; return trainer.json (loader states inside).

    `optimizer` may be several (Muon and AdamW): their state is keyed by parameter name, so each takes its own.
    """
    from safetensors.torch import load_file

    trainer = read_trainer_state(checkpoint_dir)
    lora = lora_settings(unwrap(model)) is not None
    if lora:  # the adapters only: the frozen base was loaded from init_from
        weights = read_adapter(os.path.join(checkpoint_dir, ADAPTER_DIR))[1]
        check_finite(weights, os.path.join(checkpoint_dir, ADAPTER_DIR))
    else:
        weights = state_dict_from_hf(read_weights(checkpoint_dir))
        check_finite(weights, checkpoint_dir)
        weights["lm_head.weight"] = weights["transformer.wte.weight"]
    try:
        tensors = load_file(os.path.join(checkpoint_dir, "optimizer.safetensors"))
    except Exception as err:
        raise GptwoError(
            f"optimizer state in {checkpoint_dir} is unreadable ({err})",
            "delete that checkpoint folder to resume from the one before",
        ) from None
    state: dict = {}
    for key, value in {**tensors, **trainer["optimizer"]["scalars"]}.items():
        param, name = key.split("::")
        state.setdefault(param, {})[name] = value
    optim_state = _without_untied_head(
        {"state": state, "param_groups": trainer["optimizer"]["param_groups"]}, checkpoint_dir, info
    )
    set_state_dict(
        unwrap(model),
        optimizer,
        model_state_dict=weights,
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True, strict=not lora),
    )
    ranks = trainer["ranks"]
    set_rng_state(ranks[info.rank if info.rank < len(ranks) else 0]["rng"])  # a resume may use another world size
    return trainer


def _without_untied_head(optim_state: dict, checkpoint_dir: str, info: Dist) -> dict:
    """Optimizer state for the tied model, also from fine-tuning checkpoints written before the tied-weights fix.

    Those trained a model whose head had come untied from its embedding on loading (a bug); their
    weight files hold only the embedding (which both roles now share), and their optimizer state has an
    extra entry for the head. That entry is dropped: the run resumes tied, from the saved embedding.
    """
    head = "lm_head.weight"
    if not any(head in group["params"] for group in optim_state["param_groups"]):
        return optim_state
    if info.is_main:
        print(
            f"note: {checkpoint_dir} was written with an untied output layer (a bug since fixed); "
            "its separately trained head was not saved, "
            "so training resumes with the head tied to the saved embedding again",
            file=sys.stderr,
        )
    groups = [{**group, "params": [p for p in group["params"] if p != head]} for group in optim_state["param_groups"]]
    return {"state": {k: v for k, v in optim_state["state"].items() if k != head}, "param_groups": groups}
