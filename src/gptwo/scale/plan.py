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
import re
from dataclasses import astuple, dataclass

from gptwo.errors import GptwoError
from gptwo.tokenizer import MAX_VOCAB

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
# Bounds on what a plan may ask for: beyond them a plan is a typo, not a sweep (200,000 layers, a million budgets).
MAX_LAYERS = 1024
MAX_EMBD = 65536
MAX_SHAPES = 100
MAX_BUDGETS = 100
MAX_RUNS = 10000
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
    "D = tokens = max_steps*batch_size*block_size*grad_accum; "
    "attention FLOPs (12*n_layer*n_embd*block_size per token) not in C"
)


@dataclass(frozen=True)
class ParamCounts:
    """A shape's parameters counted three ways."""

    params: int  # for C = 6·N·D and the fit: all but position embeddings
    total: int
    non_embedding: int


def count_params(n_layer: int, n_head: int, n_embd: int, vocab_size: int, block_size: int) -> ParamCounts:
    """Parameters of a GPT of this shape, counted on the model itself (built on the meta device: no memory).

    Blocks are alike, so one- and two-block models are counted and the difference scaled to `n_layer`
    (building every block of a deep model on the meta device takes ~13 ms a block).
    """
    check_shape(n_layer, n_head, n_embd, f"{n_layer}x{n_head}x{n_embd}")
    one = _counted(1, n_head, n_embd, vocab_size, block_size)
    if n_layer == 1:
        return one
    two = _counted(2, n_head, n_embd, vocab_size, block_size)
    return ParamCounts(*(a + (b - a) * (n_layer - 1) for a, b in zip(astuple(one), astuple(two))))


def _counted(n_layer: int, n_head: int, n_embd: int, vocab_size: int, block_size: int) -> ParamCounts:
    import torch

    from gptwo.config import GPTConfig
    from gptwo.model import GPT

    with torch.device("meta"):
        model = GPT(
            GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        )
    total = model.num_params(non_embedding=False)
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return ParamCounts(model.num_params(), total, total - embeddings)


def check_shape(n_layer, n_head, n_embd, where: str) -> None:
    """A model shape a plan may hold: positive integers within MAX_LAYERS / MAX_EMBD, n_embd a multiple of n_head."""
    values = (n_layer, n_head, n_embd)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise GptwoError(f"shape {where} is not three integers n_layer, n_head, n_embd", "e.g. 4x4x128")
    if min(values) <= 0 or n_embd % n_head:
        raise GptwoError(f"shape {where} is invalid (all positive, n_embd a multiple of n_head)", "e.g. 4x4x128")
    if n_layer > MAX_LAYERS or n_embd > MAX_EMBD:
        raise GptwoError(
            f"shape {where} is beyond this planner's range (n_layer at most {MAX_LAYERS}, n_embd at most {MAX_EMBD:,})",
            "plan smaller shapes (a sweep trains every one of them)",
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
        check_shape(layer, head, embd, f"'{item}'")
        shapes.append((layer, head, embd))
        if len(shapes) > MAX_SHAPES:
            raise GptwoError(f"--shapes lists more than {MAX_SHAPES} shapes", "give fewer shapes")
    if not shapes:
        raise GptwoError("no shapes given", "write shapes like 2x2x64,4x4x128")
    return shapes


def parse_budgets(text: str) -> list[float]:
    """'1e11,3e11,...' → sorted compute budgets in FLOPs (positive and finite, at most MAX_BUDGETS)."""
    try:
        budgets = sorted(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise GptwoError(f"--budgets '{text}' is not a list of numbers", "write FLOPs like 2e11,6e11,2e12") from None
    check_budgets(budgets, "--budgets")
    return budgets


def check_budgets(budgets: list[float], what: str = "budgets") -> None:
    if not budgets:
        raise GptwoError(f"{what} holds no budgets", "write FLOPs like 2e11,6e11,2e12")
    bad = [b for b in budgets if not (math.isfinite(b) and b > 0)]
    if bad:
        raise GptwoError(f"{what} {bad[0]:g} is not a positive, finite FLOP count", "write FLOPs like 2e11,6e11,2e12")
    if len(budgets) > MAX_BUDGETS:
        raise GptwoError(f"{what} lists {len(budgets)} budgets, more than {MAX_BUDGETS}", "give fewer budgets")


def make_plan(
    budgets: list[float],
    vocab_size: int,
    shapes: list[tuple[int, int, int]] | None = None,
    per_budget: int = 5,
    tokens_per_param: float = 20.0,
    train: dict | None = None,
) -> dict:
    """An IsoFLOP plan: per budget, the `per_budget` shapes nearest (in log N) to its guessed optimum
    N = sqrt(C / (6·r)).

    r = `tokens_per_param` (Chinchilla's ~20) only centres the window; the sweep measures where the optimum lies.
    """
    check_budgets(list(budgets))
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= MAX_VOCAB:
        raise GptwoError(
            f"vocabulary size {vocab_size!r} is not an integer in [1, {MAX_VOCAB:,}]", "e.g. --vocab-size 50257"
        )
    if not (isinstance(tokens_per_param, (int, float)) and math.isfinite(tokens_per_param) and tokens_per_param > 0):
        raise GptwoError(
            f"--tokens-per-param {tokens_per_param} is not a positive, finite number", "e.g. 20 (Chinchilla's)"
        )
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
    """Save a plan as indented JSON (atomically), for a person to read and edit; an existing file is replaced
    only when it is a plan itself (anything else might be the user's)."""
    from gptwo.fileio import atomic_write

    if os.path.isfile(path) and not _is_plan(path):
        raise GptwoError(
            f"--out {path} exists and is not a plan file", "choose another --out, or delete that file first"
        )
    atomic_write(path, (json.dumps(plan, indent=2) + "\n").encode())


def _is_plan(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(plan, dict) and isinstance(plan.get("runs"), list) and "formula" in plan


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@,-]*")
_MAKE = "make one with 'gptwo scale plan --budgets ... --out PLAN'"


def check_run_name(name, where: str) -> str:
    """A run name is one plain folder name (letters, digits, `_.+=@,-`, not starting with a dot or dash)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 200:
        raise GptwoError(
            f"{where} has run name {name!r}, which is not a plain folder name",
            "name runs with letters, digits and _.+=@,- only (no '/', no '..', not empty), e.g. C1e12-2x2x64",
        )
    return name


def _positive(value, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return math.isfinite(value) and value > 0


def read_plan(path: str) -> dict:
    """Load a plan file, checking the fields a sweep needs: an object with `runs` (objects with a plain name,
    a shape in range and max_steps) and, if given, `train` (an object of settings)."""
    from gptwo.fileio import read_json_file

    plan = read_json_file(path, f"plan file {path}", f"fix it, or {_MAKE}")
    if not isinstance(plan, dict):
        raise GptwoError(f"plan file {path} holds a JSON {type(plan).__name__}, not a plan object", _MAKE)
    runs = plan.get("runs")
    if not isinstance(runs, list) or not runs:
        raise GptwoError(f"plan file {path} has no runs", _MAKE)
    if len(runs) > MAX_RUNS:
        raise GptwoError(
            f"plan file {path} holds {len(runs)} runs, more than {MAX_RUNS}", "split it into several plans"
        )
    if not isinstance(plan.get("train", {}), dict):
        raise GptwoError(
            f"plan file {path}: 'train' is a {type(plan['train']).__name__}, not an object of settings",
            'write it like "train": {"block_size": 64, "batch_size": 16}',
        )
    if "vocab_size" in plan and not _positive(plan["vocab_size"], integer=True):
        raise GptwoError(f"plan file {path}: vocab_size {plan['vocab_size']!r} is not a positive integer", _MAKE)
    needed = ("name", "n_layer", "n_head", "n_embd", "max_steps")
    for number, run in enumerate(runs, 1):
        where = f"run {number} of {path}"
        if not isinstance(run, dict):
            raise GptwoError(
                f"{where} is a JSON {type(run).__name__}, not an object",
                f"each run is an object like those of a plan: {_MAKE}",
            )
        missing = [k for k in needed if k not in run]
        if missing:
            raise GptwoError(
                f"{where} lacks {', '.join(missing)}", "each run needs name, n_layer, n_head, n_embd and max_steps"
            )
        check_run_name(run["name"], where)
        check_shape(run["n_layer"], run["n_head"], run["n_embd"], f"of {where} ({run['name']})")
        if not _positive(run["max_steps"], integer=True):
            raise GptwoError(f"{where}: max_steps {run['max_steps']!r} is not a positive integer", "fix that run")
        for key in ("budget", "flops", "params", "params_total", "params_non_embedding", "tokens"):
            if run.get(key) is not None and not _positive(run[key], integer=False):
                raise GptwoError(
                    f"{where}: {key} {run[key]!r} is not a positive number", "fix that run, or drop the field"
                )
    names = [run["name"] for run in runs]
    if len(set(names)) != len(names):
        raise GptwoError(f"plan file {path} names two runs alike", "give each run its own name")
    return plan
