"""Data parallelism on torch's own engine, applied from outside the model (torchtitan style).

Launch with `torchrun`: it sets RANK, WORLD_SIZE and LOCAL_RANK. DDP replicates the model and
averages gradients; FSDP (`fully_shard`, a.k.a. FSDP2) shards parameters, gradients and
optimizer state across ranks. nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gptwo.runtime import unwrap  # noqa: F401 - train's modules import it from here with the wrappers


@dataclass
class Dist:
    """Where this process stands: rank among world_size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (if any); returns this rank's Dist and device."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(), device
    info = Dist(
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=30), device_id=device if device.type == "cuda" else None
        )
    return info, device


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: torch.nn.Module, info: Dist, parallel: str, device: torch.device) -> torch.nn.Module:
    """Wrap a finished model for data parallel training: DDP, or FSDP2 with one unit per block."""
    if not info.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def grad_sync(model: torch.nn.Module, sync: bool):
    """Context for one micro-batch's backward: gradient all-reduce only on the last one of a step."""
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def mean_across(value: float, info: Dist, device: torch.device) -> float:
    """The mean of a float over all ranks."""
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / info.world_size


def gather_objects(obj, info: Dist) -> list:
    """Every rank's JSON-able `obj`, in rank order (on every rank)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_error(message: str | None, info: Dist) -> str | None:
    """Rank 0's error message (or None) on every rank, so all ranks stop together."""
    if not info.enabled:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()
