"""Online batch selection: the trainer asks a `Selector` for each micro-batch.

`uniform` hands over the loader's next batch. `loss` and `reducible` draw `selection_pool` batches
from the loader (K × batch_size rows), score every row without gradients and return the
batch_size rows with the highest score: the row's current loss (Loshchilov & Hutter 2015), or its
reducible loss, current loss minus the loss under a fixed reference model (RHO-LOSS, Mindermann et
al. 2022). Each rank selects from its own pool; the pool comes from the loader, so resuming the
loader's position (and the weights) resumes the selection exactly. Scoring runs in eval mode, so it
draws no random numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from gptwo.errors import GptwoError
from gptwo.select.score import model_forward_flops, sequence_losses

SELECTIONS = ("uniform", "loss", "reducible")


class Selector:
    """Picks each training micro-batch: the loader's own (uniform) or the top-scoring rows of a pool."""

    def __init__(
        self,
        loader,
        strategy: str = "uniform",
        pool: int = 1,
        reference: torch.nn.Module | None = None,
        device: torch.device | str = "cpu",
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        if strategy not in SELECTIONS:
            raise GptwoError(f"selection={strategy!r} is unknown", f"use selection={' or selection='.join(SELECTIONS)}")
        if strategy == "reducible" and reference is None:
            raise GptwoError(
                "selection=reducible needs a reference model", "set selection_reference=PATH (a model or run folder)"
            )
        self.loader, self.strategy, self.reference, self.device, self.autocast = (
            loader,
            strategy,
            reference,
            torch.device(device),
            autocast,
        )
        self.pool = 1 if strategy == "uniform" else pool

    def next_batch(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) micro-batch on the selector's device; `model` scores the pool (any wrapper of a GPT)."""
        if self.strategy == "uniform":
            x, y = self.loader.next_batch()
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        batches = [self.loader.next_batch() for _ in range(self.pool)]
        x = torch.cat([b[0] for b in batches]).to(self.device, non_blocking=True)
        y = torch.cat([b[1] for b in batches]).to(self.device, non_blocking=True)
        rows = len(batches[0][0])
        top = top_rows(self.scores(model, x, y, rows), rows)
        return x[top], y[top]

    def scores(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rows: int) -> torch.Tensor:
        """Score of every pool row, (K·B,): its loss, minus the reference's loss for `reducible`.

        Rows are scored `rows` (= batch_size) at a time: the training shape, so compiled blocks are reused."""
        from gptwo.runtime import unwrap

        scores = self._losses(unwrap(model), x, y, rows)
        if self.strategy == "reducible":
            scores = scores - self._losses(self.reference, x, y, rows)
        return scores

    def _losses(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rows: int) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with self.autocast():
                return torch.cat(
                    [sequence_losses(model, x[i : i + rows], y[i : i + rows]) for i in range(0, len(x), rows)]
                )
        finally:
            model.train(was_training)

    def scoring_flops(self, model: torch.nn.Module, batch_size: int, block_size: int) -> float:
        """FLOPs spent scoring one micro-batch's pool: K·B·T tokens, forward under the model (and the reference)."""
        if self.strategy == "uniform":
            return 0.0
        per_token = model_forward_flops(model, block_size)
        if self.strategy == "reducible":
            per_token += model_forward_flops(self.reference, block_size)
        return per_token * self.pool * batch_size * block_size


def top_rows(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in pool order (ties: the earlier row wins)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:count]
    return torch.sort(order).values


def load_reference(path: str, tokenizer_identity: str, block_size: int, device: torch.device) -> torch.nn.Module:
    """The fixed reference model for `reducible`, in eval mode, checked against the training data's tokenizer."""
    from gptwo.weights import load_model

    model, tokenizer = load_model(path, device=str(device))
    if tokenizer.identity != tokenizer_identity:
        raise GptwoError(
            f"selection_reference {path} uses tokenizer '{tokenizer.identity}' "
            f"but the data uses '{tokenizer_identity}'",
            "train the reference model on data prepared with the same tokenizer",
        )
    if model.config.block_size < block_size:
        raise GptwoError(
            f"selection_reference {path} has a context of {model.config.block_size}, "
            f"shorter than block_size={block_size}",
            f"use block_size={model.config.block_size} or a reference with a longer context",
        )
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def make_selector(
    config, loader, device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager]
) -> Selector:
    """The selector a TrainConfig asks for (uniform unless `selection` says otherwise)."""
    reference = None
    if config.selection == "reducible":
        reference = load_reference(config.selection_reference, loader.tokenizer_identity, config.block_size, device)
    return Selector(loader, config.selection, config.selection_pool, reference, device, autocast)
