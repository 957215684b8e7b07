"""The optimizers (AdamW with GPT-3's settings, or Muon for the hidden matrices), the learning-rate schedule,
and the FLOPs count behind MFU."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

# torch's functional Muon: the momentum, Newton-Schulz and update arithmetic of torch.optim.Muon.step; its
# Newton-Schulz iteration and lr scaling alone, for the matrices FSDP shards (SplitMuon._step_sharded)
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
from torch.optim._muon import muon as muon_update

from gptwo.config import GPTConfig, TrainConfig

if torch.distributed.is_available():  # FSDP's parameters (a torch built without distributed has none)
    from torch.distributed.tensor import DTensor, distribute_tensor
else:
    DTensor = ()  # isinstance(x, ()) is False

# Dense bf16 peak FLOP/s by GPU name (vendor data sheets), for MFU.
PEAK_BF16_FLOPS = {
    "H200": 989.5e12,
    "H100": 989.5e12,
    "A100": 312e12,
    "L40S": 362.05e12,
    "A10G": 70e12,
    "L4": 121e12,
    "4090": 165.2e12,
    "3090": 71e12,
}
# GPT-2's fused query/key/value projection: its weight is (3C, C), Q, K and V stacked by rows.
QKV_WEIGHT = "attn.c_attn.weight"
# Moonshot's scaling (Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv:2502.16982): the update of an
# A x B matrix times 0.2·sqrt(max(A, B)), an RMS of 0.2 like AdamW's, so Muon takes AdamW's lr and weight decay.
MUON_ADJUST_LR = "match_rms_adamw"


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, fused: bool = False
) -> torch.optim.AdamW | MuonWithAdamW:
    """config.optimizer: AdamW for everything, or Muon for the hidden matrices and AdamW for the rest.

    AdamW decays 2-D weights only (matmuls and embeddings), not biases or LayerNorms.
    """
    groups = param_groups(model, config)
    adamw = torch.optim.AdamW(
        groups["adamw"], lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8, fused=fused or None
    )
    if config.optimizer == "adamw":
        return adamw
    device = next(model.parameters()).device
    muon = SplitMuon(
        groups["muon"],
        lr=config.lr,
        weight_decay=config.weight_decay,
        adjust_lr_fn=MUON_ADJUST_LR,
        ns_dtype=newton_schulz_dtype(device),
    )
    return MuonWithAdamW(muon, adamw)


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 (torch.optim.Muon's choice) where the hardware multiplies it natively; float32 on other CPUs, where
    emulated bf16 made Muon's step 8x slower than AdamW's (AVX2 Zen 3, the quickstart's shapes)."""
    from gptwo.runtime import native_bf16

    return torch.bfloat16 if device.type != "cpu" or native_bf16() else torch.float32


def newton_schulz(grad: torch.Tensor, ns: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The orthogonalised update: torch.optim.Muon's own iteration in bf16, else the same quintic iteration
    (Jordan et al. 2024) computed in `dtype`."""
    if dtype == torch.bfloat16:
        return _zeropower_via_newtonschulz(grad, *ns)
    (a, b, c), steps, eps = ns
    x = grad.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def param_groups(model: torch.nn.Module, config: TrainConfig) -> dict[str, list[dict]]:
    """The parameter groups of each optimizer: {"adamw": [...], "muon": [...]} ("muon" empty for optimizer=adamw).

    Muon takes the hidden matrices, the 2-D weights of the blocks' linear layers: c_attn's as `split` = 3 row
    blocks (Q, K, V), the others whole. AdamW takes the rest: the token embedding (which is also the tied head),
    the position embedding, biases and LayerNorms. Muon is for the matrices that map hidden states to hidden
    states; an embedding's rows are looked up one token at a time, and the head is that same matrix.
    """
    params = {id(p): (name, p) for name, p in model.named_parameters() if p.requires_grad}  # the tied head once
    hidden = {id(p) for p in _hidden_matrices(model)} if config.optimizer == "muon" else set()
    rest = [p for key, (_, p) in params.items() if key not in hidden]
    adamw = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    if not hidden:
        return {"adamw": adamw, "muon": []}
    qkv = [p for key, (name, p) in params.items() if key in hidden and name.endswith(QKV_WEIGHT)]
    whole = [p for key, (name, p) in params.items() if key in hidden and not name.endswith(QKV_WEIGHT)]
    return {"adamw": adamw, "muon": [{"params": qkv, "split": 3}, {"params": whole, "split": 1}]}


def _hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of the linear layers that are not also an embedding (the tied head is the token embedding)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m.weight.requires_grad and id(m.weight) not in embeddings
    ]


class SplitMuon(torch.optim.Muon):
    """torch.optim.Muon, where a group's `split` = k orthogonalises each of its matrices as k equal row blocks.

    GPT-2 fuses its query, key and value projections into one (3C, C) matrix, c_attn. Orthogonalising it whole
    would balance the update's singular values across Q, K and V together; the three are separate maps (Q and K
    only meet in their product, V in another path), so each is orthogonalised and its lr scaled as a (C, C)
    matrix of its own, as modded-nanogpt does for its Q/K/V weights (Jordan et al. 2024). Only the
    Newton-Schulz step and the lr's shape factor see the blocks; momentum and weight decay are elementwise, and
    the state stays one momentum buffer per parameter, so checkpoints hold the model's own parameter names.
    """

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **settings):
        """`ns_dtype`: the Newton-Schulz iteration's precision (bf16 as torch.optim.Muon; newton_schulz_dtype)."""
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step of every group, each matrix (or each of its `split` row blocks) orthogonalised alone."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            has_complex = self._init_group(group, params, grads, buffers)
            split = group.get("split", 1)
            if params and isinstance(params[0], DTensor):
                self._step_sharded(group, params, grads, buffers, split, self.ns_dtype)
                continue
            if self.ns_dtype != torch.bfloat16:
                self._step_local(group, params, grads, buffers, split, self.ns_dtype)
                continue
            muon_update(
                _row_blocks(params, split),
                _row_blocks(grads, split),
                _row_blocks(buffers, split),
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                ns_coefficients=tuple(group["ns_coefficients"]),
                eps=group["eps"],
                ns_steps=group["ns_steps"],
                adjust_lr_fn=group["adjust_lr_fn"],
                has_complex=has_complex,
            )
        return loss

    @staticmethod
    def _step_local(group: dict, params: list, grads: list, buffers: list, split: int, dtype: torch.dtype) -> None:
        """torch.optim.Muon's step (momentum, Nesterov, weight decay, shape-scaled lr) with Newton-Schulz in
        `dtype`, each matrix (or row block) alone."""
        momentum, lr, decay = group["momentum"], group["lr"], group["weight_decay"]
        ns = (tuple(group["ns_coefficients"]), group["ns_steps"], group["eps"])
        for param, grad, buffer in zip(
            _row_blocks(params, split), _row_blocks(grads, split), _row_blocks(buffers, split)
        ):
            buffer.lerp_(grad, 1 - momentum)
            update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
            param.mul_(1 - lr * decay)
            param.add_(newton_schulz(update, ns, dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))

    @staticmethod
    def _step_sharded(
        group: dict, params: list, grads: list, buffers: list, split: int, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        """The same step where FSDP holds each rank's rows of every matrix, gradient and momentum buffer.

        Momentum, weight decay and the update are elementwise, so each rank applies them to its own rows; only
        the Newton-Schulz iteration needs a whole matrix. Each rank gathers the momentum-smoothed update (one
        all-gather per matrix, as many bytes as FSDP's own gather of the weight), orthogonalises it (or its row
        blocks) as torch.optim.Muon does, and keeps its rows: Moonshot's Distributed Muon (Liu et al. 2025), every
        rank computing every matrix.
        """
        momentum, lr, decay = group["momentum"], group["lr"], group["weight_decay"]
        ns = (tuple(group["ns_coefficients"]), group["ns_steps"], group["eps"])
        for param, grad, buffer in zip(params, grads, buffers):
            local_grad, local_buffer = grad.to_local(), buffer.to_local()
            local_buffer.lerp_(local_grad, 1 - momentum)
            local_update = local_grad.lerp(local_buffer, momentum) if group["nesterov"] else local_buffer
            update = DTensor.from_local(
                local_update, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
            ).full_tensor()
            blocks = update.chunk(split)
            update = torch.cat([newton_schulz(block, ns, dtype) for block in blocks])
            mine = distribute_tensor(update, param.device_mesh, param.placements, src_data_rank=None).to_local()
            local = param.to_local()
            local.mul_(1 - lr * decay)
            local.add_(mine, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], blocks[0].shape))


def _row_blocks(tensors: list[torch.Tensor], split: int) -> list[torch.Tensor]:
    """Each tensor as `split` views of equal row blocks (in-place updates of a view update the tensor)."""
    return [block for tensor in tensors for block in tensor.chunk(split)]


class MuonWithAdamW:
    """Muon and AdamW stepped as one optimizer over disjoint parameters.

    Iterating gives the two torch optimizers: torch.distributed.checkpoint's get_state_dict and set_state_dict
    take such an iterable and save and restore both, each parameter's state under its name.
    """

    def __init__(self, muon: SplitMuon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter((self.muon, self.adamw))

    @property
    def param_groups(self) -> list[dict]:
        """Muon's groups, then AdamW's (the same dicts: setting a group's lr sets the optimizer's)."""
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)


def optimizer_flops_per_step(optimizer: torch.optim.Optimizer | MuonWithAdamW) -> float:
    """FLOPs of Muon's Newton-Schulz iterations per step (0 for AdamW, whose elementwise work is not counted).

    Per iteration on an m x n block (m <= n): X·Xᵀ (2m²n), A·A (2m³) and B·X (2m²n).
    """
    if not isinstance(optimizer, MuonWithAdamW):
        return 0.0
    total = 0.0
    for group in optimizer.muon.param_groups:
        for p in group["params"]:
            rows, cols = p.shape[0] // group.get("split", 1), p.shape[1]
            m, n = min(rows, cols), max(rows, cols)
            total += group.get("split", 1) * group["ns_steps"] * (4 * m * m * n + 2 * m**3)
    return total


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine decay to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def flops_per_token(config: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls over weights plus 12·L·H·Q·T for attention
    (PaLM, Chowdhery et al. 2022, appendix B; as in nanoGPT's estimate_mfu)."""
    return 6 * n_params + 12 * config.n_layer * config.n_head * config.head_dim * seq_len


def peak_flops(device: torch.device, override: float = 0.0) -> float:
    """Peak bf16 FLOP/s of the accelerator, 0 when unknown (then MFU is not shown)."""
    if override:
        return override
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), 0.0)
