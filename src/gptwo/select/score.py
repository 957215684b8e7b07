"""Losses of sequences and documents under a model, and `gptwo select score`.

A document is scored as `[eot] + tokens`: every token is predicted from the ones before it, in
windows of the model's context that do not overlap (each window starts fresh, as a training row
does). `loss` is the mean negative log-likelihood in nats per token. The output is JSON lines, one
per non-empty document, written and flushed as each batch finishes; rerunning the same command
after a kill keeps the complete lines and continues after the last scored document.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from gptwo.data.loader import IGNORE  # padding targets here, and the targets a loss mask does not count
from gptwo.errors import GptwoError


def forward_flops_per_token(n_layer: int, n_embd: int, n_params: int, seq_len: int) -> float:
    """Forward-pass FLOPs per token: 2N for the weight matmuls plus 4·L·C·T for attention
    (a third of the 6N + 12·L·C·T training count, PaLM appendix B)."""
    return 2 * n_params + 4 * n_layer * n_embd * seq_len


def model_forward_flops(model: torch.nn.Module, seq_len: int) -> float:
    """`forward_flops_per_token` for a GPT; N counts the output matrix once, whether or not it is tied to
    the embedding."""
    n_params = model.num_params()
    if model.lm_head.weight is not model.transformer.wte.weight:
        n_params -= model.transformer.wte.weight.numel()  # the embedding lookup itself costs no FLOPs
    return forward_flops_per_token(model.config.n_layer, model.config.n_embd, n_params, seq_len)


@torch.no_grad()
def sequence_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of each row of a batch, (B,); targets equal to IGNORE are skipped."""
    nll = token_nll(model, x, y)
    counts = (y != IGNORE).sum(dim=1).clamp(min=1)
    return nll.sum(dim=1) / counts


@torch.no_grad()
def token_nll(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of every target token, (B, T), 0 where the target is IGNORE."""
    logits = model(x).float()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE, reduction="none").view(
        y.shape
    )


def document_windows(tokens: Sequence[int], eot: int, block_size: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows covering every token of `[eot] + tokens` after the first, block_size at a time."""
    stream = [eot, *tokens]
    windows = []
    for start in range(0, len(stream) - 1, block_size):
        end = min(start + block_size, len(stream) - 1)  # inputs and targets of equal length
        windows.append((stream[start:end], stream[start + 1 : end + 1]))
    return windows


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def document_nll(
    models: Sequence[torch.nn.Module],
    documents: Sequence[list[int]],
    eot: int,
    block_size: int,
    device: torch.device,
    rows_per_forward: int = 8,
) -> list[list[float]]:
    """Total NLL (nats) of each document under each model, result[m][d]; at most `rows_per_forward` windows
    per forward pass."""
    windows, owner = [], []
    for index, tokens in enumerate(documents):
        for window in document_windows(tokens, eot, block_size):
            windows.append(window)
            owner.append(index)
    totals = [torch.zeros(len(documents), dtype=torch.float64, device=device) for _ in models]
    for start in range(0, len(windows), rows_per_forward):
        chunk = windows[start : start + rows_per_forward]
        x, y = _pad([w[0] for w in chunk], eot).to(device), _pad([w[1] for w in chunk], IGNORE).to(device)
        owners = torch.tensor(owner[start : start + rows_per_forward], device=device)
        for total, model in zip(totals, models):
            total.index_add_(0, owners, token_nll(model, x, y).double().sum(dim=1))
    return [total.tolist() for total in totals]


# ---------------------------------------------------------------- gptwo select score
_ROW_START = b'{"id": '  # how every row this command writes begins (json.dumps of a dict with "id" first)


def _is_score_row(line: bytes) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return (
        isinstance(row, dict)
        and all(isinstance(row.get(k), int) and not isinstance(row.get(k), bool) for k in ("id", "tokens"))
        and isinstance(row.get("loss"), (int, float))
        and not isinstance(row.get("loss"), bool)
    )


def _scored_so_far(out: str, overwrite: bool = False) -> tuple[int, int | None]:
    """How many complete rows `out` holds and the last one's id; a score row cut short by a kill is removed.

    A file that is not this command's output (a line that is no score row) is refused, never truncated or
    appended to; with `overwrite` it counts as empty (the caller replaces it).
    """
    if not os.path.lexists(out):
        return 0, None
    if not os.path.isfile(out):
        raise GptwoError(f"--out {out} is not a file", "give a file name for the scores, e.g. scores.jsonl")
    with open(out, "rb") as f:
        data = f.read()
    keep = data[: data.rfind(b"\n") + 1]
    tail = data[len(keep) :]
    lines = keep.splitlines()
    ours = all(_is_score_row(line) for line in lines) and (not tail or tail.startswith(_ROW_START))
    if not ours:
        if overwrite:
            return 0, None
        raise GptwoError(
            f"--out {out} exists and is not a score file of 'gptwo select score'",
            "choose another --out, or pass --overwrite to replace it",
        )
    if overwrite:
        return 0, None
    if tail:
        with open(out, "r+b") as f:
            f.truncate(len(keep))
    return len(lines), (int(json.loads(lines[-1])["id"]) if lines else None)


def _batches(
    inputs: Sequence[str], text_field: str, tokenizer, done: tuple[int, int | None], out: str, batch_tokens: int
) -> Iterator[list[tuple[int, list[int]]]]:
    """(id, tokens) of the non-empty documents after the `done` ones already in `out`, in batches of about
    `batch_tokens`."""
    from gptwo.data.sources import iter_documents

    skip, last_id = done
    batch, size, seen = [], 0, 0
    for doc_id, text in enumerate(iter_documents(inputs, text_field)):
        if not text.strip():
            continue
        seen += 1
        if seen == skip and doc_id != last_id:
            raise GptwoError(
                f"{out} was written for other inputs (its row {skip} is document {last_id}, here it is {doc_id})",
                "score these inputs into a new --out",
            )
        if seen <= skip:
            continue
        tokens = tokenizer.encode(text)
        batch.append((doc_id, tokens))
        size += len(tokens) + 1
        if size >= batch_tokens:
            yield batch
            batch, size = [], 0
    if seen == 0:
        raise GptwoError("the inputs hold no documents with text", "check the input paths (and --text-field)")
    if seen < skip:
        raise GptwoError(
            f"{out} holds {skip} rows but these inputs only {seen} documents", "score these inputs into a new --out"
        )
    if batch:
        yield batch


def score_documents(
    model_path: str,
    inputs: Sequence[str],
    out: str,
    reference: str | None = None,
    batch_tokens: int = 4096,
    device: str = "auto",
    text_field: str = "text",
    progress: bool = True,
    overwrite: bool = False,
) -> int:
    """Write `{id, tokens, loss[, reference_loss, reducible]}` per non-empty document of `inputs` to `out`
    (JSON lines), continuing after the rows already there; returns the number of rows written now."""
    from gptwo.progress import progress_bar
    from gptwo.select.offline import check_not_an_input
    from gptwo.weights import load_model

    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise GptwoError(f"--batch-tokens {batch_tokens} must be a positive integer", "use e.g. --batch-tokens 4096")
    check_not_an_input(out, inputs)
    done = _scored_so_far(out, overwrite)  # checked before the models load: a wrong --out fails fast
    model, tokenizer = load_model(model_path, device=device)
    models = [model]
    if reference:
        ref_model, ref_tok = load_model(reference, device=device)
        if ref_tok.identity != tokenizer.identity:
            raise GptwoError(
                f"{reference} uses tokenizer '{ref_tok.identity}' but {model_path} uses '{tokenizer.identity}'",
                "score with a reference model trained with the same tokenizer",
            )
        models.append(ref_model)
    block = min(m.config.block_size for m in models)
    device_t = next(model.parameters()).device
    written = 0
    with (
        contextlib.ExitStack() as stack,
        progress_bar(
            "scoring",
            total=_count_documents(inputs, text_field) if progress else None,
            initial=done[0],
            unit="doc",
            enabled=progress,
            delay=0.5,
        ) as bar,
    ):
        f = None
        for batch in _batches(inputs, text_field, tokenizer, done, out, batch_tokens):
            if f is None:  # opened at the first batch: inputs with no documents leave no file behind
                f = stack.enter_context(open(out, "a" if done[0] else "w", encoding="utf-8"))
            totals = document_nll(
                models,
                [tokens for _, tokens in batch],
                tokenizer.eot_token,
                block,
                device_t,
                max(1, batch_tokens // block),
            )
            for row, (doc_id, tokens) in enumerate(batch):
                f.write(json.dumps(_score_row(doc_id, len(tokens), [t[row] for t in totals])) + "\n")
            f.flush()
            written += len(batch)
            bar.update(len(batch))
    return written


def _count_documents(inputs: Sequence[str], text_field: str) -> int | None:
    """The non-empty documents of local inputs (a quick pass, for the bar's total and ETA); None for hf: datasets."""
    from gptwo.data.sources import iter_documents

    if any(path.startswith("hf:") for path in inputs):
        return None
    return sum(1 for text in iter_documents(inputs, text_field) if text.strip())


def _score_row(doc_id: int, n_tokens: int, nll: list[float]) -> dict:
    """One output row: mean nats per token under the model (and the reference, and their difference)."""
    row = {"id": doc_id, "tokens": n_tokens, "loss": nll[0] / n_tokens}  # `[eot] + tokens` predicts each token once
    if len(nll) > 1:
        row["reference_loss"] = nll[1] / n_tokens
        row["reducible"] = row["loss"] - row["reference_loss"]
    return row
