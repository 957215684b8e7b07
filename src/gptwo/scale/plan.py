"""IsoFLOP plans (Chinchilla's approach 2): for each compute budget, a few model shapes and the tokens each trains for.

Compute per run is C = 6·N·D (Kaplan et al. 2020, section 2.1; Hoffmann et al. 2022): N = `params`, every
weight except the position embeddings (the tied token embedding counts once: it is the output head's
matmul, run on every token), D = tokens trained = max_steps · batch_size · block_size. Attention's own
FLOPs (12·L·d·T per token) are left out of C, as in both papers, and recorded beside it. Each run also
states its parameters counted the other two ways: `params_total` (all weights) and
`params_non_embedding` (without token and position embeddings, Kaplan's N).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from gptwo.errors import GptwoError

# A ladder of small GPT-2 shapes (n_layer, n_head, n_embd) for CPU-sized sweeps, ~10x apart end to end.
DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = (
    (1, 1, 16),
    (1, 1, 32),
    (2, 2, 48),
    (2, 2, 64),
    (3, 2, 80),
    (4, 3, 96),
    (4, 4, 128),
    (5, 5, 160),
    (6, 6, 192),
    (8, 8, 256),
)
# Settings every run of a plan shares (TrainConfig keys); the plan file holds them and can be edited.
DEFAULT_TRAIN = dict(
    block_size=64,
    batch_size=16,
    grad_accum=1,
    sampling="random",
    lr=3e-3,
    min_lr_ratio=0.1,
    eval_batches=1000,
    sample_tokens=0,
    log_every=50,
    keep_checkpoints=1,
    device="cpu",
)
FORMULA = (
    "C = 6*N*D, N = params (all weights but the position embeddings; the tied token embedding counted once), "
    "D = tokens = max_steps*batch_size*block_size*grad_accum; attention FLOPs (12*n_layer*n_embd*block_size per token) not in C"
)


@dataclass(frozen=True)
class ParamCounts:
    """A shape's parameters counted three ways."""

    params: int  # for C = 6·N·D and the fit: all but position embeddings
    total: int
    non_embedding: int


def count_params(n_layer: int, n_head: int, n_embd: int, vocab_size: int, block_size: int) -> ParamCounts:
    """Parameters of a GPT of this shape, counted on the model itself (built on the meta device: no memory, no time)."""
    import torch

    from gptwo.config import GPTConfig
    from gptwo.model import GPT

    with torch.device("meta"):
        model = GPT(
            GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        )
    total = model.num_params(non_embedding=False)
    return ParamCounts(
        model.num_params(), total, total - model.transformer.wte.weight.numel() - model.transformer.wpe.weight.numel()
    )


def run_flops(params: int, tokens: int) -> float:
    """Training compute of one run by the plan's formula, C = 6·N·D."""
    return 6.0 * params * tokens


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'LxHxD,...' (n_layer x n_head x n_embd) → shapes, e.g. '2x2x64,4x4x128'."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            layer, head, embd = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise GptwoError(
                f"shape '{item}' is not n_layer x n_head x n_embd", "write shapes like 2x2x64,4x4x128"
            ) from None
        if min(layer, head, embd) <= 0 or embd % head:
            raise GptwoError(f"shape '{item}' is invalid (all positive, n_embd a multiple of n_head)", "e.g. 4x4x128")
        shapes.append((layer, head, embd))
    if not shapes:
        raise GptwoError("no shapes given", "write shapes like 2x2x64,4x4x128")
    return shapes


def parse_budgets(text: str) -> list[float]:
    """'1e11,3e11,...' → sorted compute budgets in FLOPs."""
    try:
        budgets = sorted(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise GptwoError(f"--budgets '{text}' is not a list of numbers", "write FLOPs like 2e11,6e11,2e12") from None
    if not budgets or min(budgets) <= 0:
        raise GptwoError("--budgets needs positive FLOP counts", "write FLOPs like 2e11,6e11,2e12")
    return budgets


def make_plan(
    budgets: list[float],
    vocab_size: int,
    shapes: list[tuple[int, int, int]] | None = None,
    per_budget: int = 5,
    tokens_per_param: float = 20.0,
    train: dict | None = None,
) -> dict:
    """An IsoFLOP plan: per budget, the `per_budget` shapes nearest (in log N) to its guessed optimum N = sqrt(C / (6·r)).

    r = `tokens_per_param` (Chinchilla's ~20) only centres the window; the sweep measures where the optimum lies.
    """
    settings = {**DEFAULT_TRAIN, **(train or {})}
    tokens_per_step = settings["batch_size"] * settings["block_size"] * settings["grad_accum"]
    ladder = sorted(
        ((count_params(*s, vocab_size, settings["block_size"]), s) for s in (shapes or DEFAULT_SHAPES)),
        key=lambda x: x[0].params,
    )
    if per_budget < 1 or per_budget > len(ladder):
        raise GptwoError(
            f"--per-budget {per_budget} is not between 1 and the {len(ladder)} shapes",
            "lower --per-budget or give more --shapes",
        )
    runs = []
    for budget in budgets:
        guess = math.sqrt(budget / (6 * tokens_per_param))
        centre = min(range(len(ladder)), key=lambda i: abs(math.log(ladder[i][0].params / guess)))
        start = max(0, min(len(ladder) - per_budget, centre - per_budget // 2))
        for counts, (n_layer, n_head, n_embd) in ladder[start : start + per_budget]:
            steps = round(budget / (6 * counts.params * tokens_per_step))
            if steps < 1:
                raise GptwoError(
                    f"budget {budget:.3g} FLOPs is less than one step of the {n_layer}x{n_head}x{n_embd} model",
                    "raise --budgets or use smaller --shapes",
                )
            runs.append(_run(budget, (n_layer, n_head, n_embd), counts, steps, tokens_per_step))
    return {"formula": FORMULA, "vocab_size": vocab_size, "train": settings, "runs": runs}


def _run(budget: float, shape: tuple[int, int, int], counts: ParamCounts, steps: int, tokens_per_step: int) -> dict:
    n_layer, n_head, n_embd = shape
    tokens = steps * tokens_per_step
    return {
        "name": f"C{budget:.3g}-{n_layer}x{n_head}x{n_embd}".replace("+", ""),
        "budget": budget,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "max_steps": steps,
        "warmup_steps": max(1, min(100, steps // 10)),
        "params": counts.params,
        "params_total": counts.total,
        "params_non_embedding": counts.non_embedding,
        "tokens": tokens,
        "flops": run_flops(counts.params, tokens),
    }


def vocab_size_of(data_dir: str) -> int:
    """The vocabulary size of a prepared data folder's tokenizer."""
    from gptwo.tokenizer import Tokenizer

    path = os.path.join(data_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise GptwoError(
            f"{data_dir} holds no tokenizer.json", "pass a folder made by 'gptwo prepare', or --vocab-size N"
        )
    return Tokenizer.from_file(path).n_vocab


def write_plan(plan: dict, path: str) -> None:
    """Save a plan as indented JSON (atomically), for a person to read and edit."""
    from gptwo.fileio import atomic_write

    atomic_write(path, (json.dumps(plan, indent=2) + "\n").encode())


def read_plan(path: str) -> dict:
    """Load a plan file, checking the fields a sweep needs."""
    try:
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
    except FileNotFoundError:
        raise GptwoError(
            f"plan file {path} not found", "make one with 'gptwo scale plan --budgets ... --out PLAN'"
        ) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise GptwoError(
            f"plan file {path} is not valid JSON ({err})", "fix it, or make a new one with 'gptwo scale plan'"
        ) from None
    runs = plan.get("runs") if isinstance(plan, dict) else None
    if not isinstance(runs, list) or not runs:
        raise GptwoError(f"plan file {path} has no runs", "make one with 'gptwo scale plan --budgets ... --out PLAN'")
    needed = ("name", "n_layer", "n_head", "n_embd", "max_steps")
    for run in runs:
        missing = [k for k in needed if k not in run]
        if missing:
            raise GptwoError(
                f"a run in {path} lacks {', '.join(missing)}",
                "each run needs name, n_layer, n_head, n_embd and max_steps",
            )
    names = [run["name"] for run in runs]
    if len(set(names)) != len(names):
        raise GptwoError(f"plan file {path} names two runs alike", "give each run its own name")
    return plan
