"""`gptwo bench lora --quality`: how much of full fine-tuning's loss improvement LoRA recovers, on a held-out
domain (`--task domain`) or on a synthetic instruction set (`--task instruct`).

The built-in corpus has two parts (gptwo.data.builtin): the standard library's module docstrings and the
language reference topics behind `help()`. The base (the cpu preset, the quickstart's optimizer) trains on
the docstrings only, with a BPE trained on them only. From that base, full fine-tuning (AdamW, every
parameter) and LoRA (adapters only) train for the same steps, batch and schedule, each `gptwo train` in its
own process, and every model is then evaluated the same way, in this process:
  domain    train on the reference topics, the domain the base never saw; the loss is the mean over the
            whole validation split of the domain (and of the docstrings, to show what fine-tuning forgot).
  instruct  train on the synthetic instruction set's train conversations (gptwo.bench.instruct), prepared as
            `gptwo prepare chat` prepares them (the loss counts the assistant's tokens only) in the base's
            tokenizer; the loss is the mean over the assistant's tokens of the held-out conversations (their
            right answers), and each model answers every held-out instruction greedily (exact match per kind).
recovery = (base - lora) / (base - full), the best lr of each against the other.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Sequence

from gptwo.errors import GptwoError

TASKS = ("domain", "instruct")
BASE_STEPS = 400  # the base: about 3 minutes on 2 shared cores
FINETUNE_STEPS = {"domain": 150, "instruct": 450}
FULL_LRS = {"domain": (1e-3,), "instruct": (1e-3, 3e-3)}
# domain: the best of 3e-3, 1e-2, 3e-2, 5e-2, 1e-1 (docs/results/training-log.md)
LORA_LRS = {"domain": (3e-2,), "instruct": (1e-2, 2e-2)}
# instruct: the best of a sweep at 450 steps (docs/results/training-log.md): full 3e-3 (1e-3 and 6e-3 worse),
# LoRA 2e-2 (1e-2, 3e-2 worse); at 150 steps LoRA reached 0.839 of full. AdamW's decoupled weight decay is
# swept like the lr for both methods: 0.3 helped LoRA (1.016 against 1.210 at 0.1; 0 and 1.0 worse), not full.
WEIGHT_DECAYS = {"domain": (0.1,), "instruct": (0.1, 0.3)}
PRESET_WEIGHT_DECAY = 0.1  # TrainConfig's: runs at it keep their names from before the sweep
VOCAB_SIZE = 4096  # the quickstart's
BASE_VAL_FRACTION, DOMAIN_VAL_FRACTION = 0.05, 0.2
INSTRUCT_CONVERSATIONS, INSTRUCT_HELDOUT_PER_KIND, INSTRUCT_VAL_FRACTION = 12_000, 100, 0.02
ANSWER_TOKENS = 16  # greedy answers stop at <|endoftext|> or after this many tokens


def lora_quality(
    out_dir: str = "runs/bench-lora",
    task: str = "domain",
    base_steps: int | None = None,
    steps: int | None = None,
    full_lrs: tuple[float, ...] | None = None,
    lora_lrs: tuple[float, ...] | None = None,
    full_wds: tuple[float, ...] | None = None,
    lora_wds: tuple[float, ...] | None = None,
    rank: int = 8,
    alpha: float | None = None,
    targets: tuple[str, ...] | None = None,
    threads: int = 0,
    progress: bool = True,
    base: str | None = None,
    conversations: int | None = None,
    heldout_per_kind: int | None = None,
) -> dict:
    """Train (or read back) the base and the fine-tuning runs in `out_dir`; evaluate them; return the report.

    instruct only: `base` fine-tunes that model folder (its tokenizer prepares the data) instead of training the
    cpu-preset base; `conversations` and `heldout_per_kind` size the instruction set."""
    from gptwo.lora import DEFAULT_TARGETS

    if task not in TASKS:
        raise GptwoError(f"--task {task!r} is not one of {', '.join(TASKS)}", "use --task domain or --task instruct")
    if task == "domain" and (base is not None or conversations is not None or heldout_per_kind is not None):
        raise GptwoError(
            "--base and the instruction set's size belong to --task instruct",
            "add --task instruct, or drop them (the domain task trains its own base)",
        )
    if base is not None and base_steps is not None:
        raise GptwoError("--base-steps sets the base that --base replaces", "drop one of them")
    steps = steps or FINETUNE_STEPS[task]
    full_lrs, lora_lrs = tuple(full_lrs or FULL_LRS[task]), tuple(lora_lrs or LORA_LRS[task])
    wds = {"full": tuple(full_wds or WEIGHT_DECAYS[task]), "lora": tuple(lora_wds or WEIGHT_DECAYS[task])}
    targets = tuple(targets or DEFAULT_TARGETS)
    alpha = float(alpha if alpha is not None else rank)
    start = time.perf_counter()
    settings = _settings(threads)
    if base is None:
        base_steps = base_steps or BASE_STEPS
        base_dir, base_run = _docstrings_base(out_dir, base_steps, settings, progress)
    else:
        base_dir, base_steps, base_run = base, None, {"wall_s": None}
    lora = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    if task == "domain":
        base_data, domain_data = os.path.join(out_dir, "data-base"), os.path.join(out_dir, "data-domain")
        runs = _finetune(domain_data, out_dir, base_dir, steps, full_lrs, lora_lrs, wds, lora, settings, progress)
        threads_used = _eval_threads(threads)
        fields, base_eval, key = _domain_eval(out_dir, base_dir, base_data, domain_data, runs)
    else:
        out_dir = os.path.join(out_dir, "instruct")
        size = conversations or INSTRUCT_CONVERSATIONS, heldout_per_kind or INSTRUCT_HELDOUT_PER_KIND
        data_dir, heldout = prepare_instruct(out_dir, base_dir, *size)
        runs = _finetune(data_dir, out_dir, base_dir, steps, full_lrs, lora_lrs, wds, lora, settings, progress)
        threads_used = _eval_threads(threads)
        fields, base_eval, key = _instruct_eval(out_dir, base_dir, data_dir, heldout, runs)
        fields = {"description": fields.pop("description"), "train_conversations": size[0], **fields}
    report = {
        "bench": "lora-quality",
        "task": task,
        **fields,
        "base_model": base_dir,
        "base_steps": base_steps,
        "finetune_steps": steps,
        "warmup_steps": _warmup(steps),
        "tokens_per_step": runs[0]["tokens_per_step"],
        "lora": lora,
        "threads": threads_used,
        "base": {**base_eval, "train_s": base_run["wall_s"]},
        "runs": runs,
        **_recovery(base_eval[key], runs, key),
        "target": 0.9,
        "wall_s": time.perf_counter() - start,
    }
    from gptwo.fileio import atomic_write

    atomic_write(os.path.join(out_dir, "report.json"), (json.dumps(report, indent=1) + "\n").encode())
    return report


def _docstrings_base(out_dir: str, base_steps: int, settings: list[str], progress: bool) -> tuple[str, dict]:
    """The base every task starts from (trained once per `out_dir`): the cpu preset on the docstrings."""
    base_data, domain_data = os.path.join(out_dir, "data-base"), os.path.join(out_dir, "data-domain")
    prepare_domains(out_dir, base_data, domain_data)
    base_dir = os.path.join(out_dir, "base")
    overrides = [*settings, *_quickstart_optimizer(), *_schedule(base_steps)]
    return base_dir, _train(base_data, base_dir, overrides, progress)


def _warmup(steps: int) -> int:
    return max(1, steps // 10)


def _finetune(
    data_dir: str,
    runs_dir: str,
    base_dir: str,
    steps: int,
    full_lrs: Sequence[float],
    lora_lrs: Sequence[float],
    wds: dict[str, Sequence[float]],
    lora: dict,
    settings: list[str],
    progress: bool,
) -> list[dict]:
    """Full fine-tuning at each of `full_lrs` and LoRA at each of `lora_lrs` from the base, each at every weight
    decay of `wds[method]`, the same steps, batch and schedule (AdamW, warm-up a tenth, cosine), each run in
    `runs_dir` trained or read back (a run at the preset's weight decay keeps the name it had without it)."""
    rank, alpha = lora["rank"], lora["alpha"]
    lora_keys = [f"lora_rank={rank}", f"lora_alpha={alpha!r}", f"lora_targets={','.join(lora['targets'])}"]
    kinds = [("full", "full", full_lrs, []), (f"lora-r{rank}-a{alpha:g}", "lora", lora_lrs, lora_keys)]
    runs = []
    for prefix, method, lrs, extra in kinds:
        for wd in wds[method]:
            for lr in lrs:
                name = f"{prefix}-lr{lr:g}" + ("" if wd == PRESET_WEIGHT_DECAY else f"-wd{wd:g}")
                overrides = [*settings, f"init_from={base_dir}", f"lr={lr!r}", f"warmup_steps={_warmup(steps)}"]
                overrides += [f"weight_decay={wd!r}", *_schedule(steps), *extra]
                run = _train(data_dir, os.path.join(runs_dir, name), overrides, progress)
                runs.append({"name": name, "method": method, "lr": lr, "weight_decay": wd, **run})
    return runs


def _recovery(base_loss: float, runs: list[dict], key: str) -> dict:
    """Each run's recovery = (base - run) / (base - best full) on `key`'s loss, and the best of each method."""
    best_full = min((r for r in runs if r["method"] == "full"), key=lambda r: r[key])
    gain = base_loss - best_full[key]
    for run in runs:
        run["recovery"] = (base_loss - run[key]) / gain if gain > 0 else None
    best_lora = min((r for r in runs if r["method"] == "lora"), key=lambda r: r[key])
    return {"best_full": best_full["name"], "best_lora": best_lora["name"], "recovery": best_lora["recovery"]}


def _domain_eval(
    out_dir: str, base_dir: str, base_data: str, domain_data: str, runs: list[dict]
) -> tuple[dict, dict, str]:
    """The domain task's fields, the base's evaluation (each run's added to it), and the loss recovery is on."""
    base_eval = evaluate(base_dir, domain_data, base_data)
    for run in runs:
        run.update(evaluate(os.path.join(out_dir, run["name"]), domain_data, base_data))
    fields = {
        "description": "base: the cpu preset on the standard library's docstrings (its own BPE); domain: the "
        "language reference topics, which the base never saw",
        "domain_train_tokens": _tokens(domain_data, "train"),
        "domain_val_tokens": _tokens(domain_data, "val"),
    }
    return fields, base_eval, "domain_loss"


def _usable(texts: list[str]) -> list[str]:
    """The non-empty documents that encode as UTF-8 (a few docstrings hold lone surrogates)."""
    kept = []
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            continue
        if text.strip():
            kept.append(text.strip())
    return kept


def prepare_domains(out_dir: str, base_data: str, domain_data: str) -> None:
    """The two data folders, once: docstrings (the base's) and reference topics (the domain), both tokenized with
    a BPE trained on the docstrings alone; each part shuffled (seeded) as the quickstart shuffles its corpus."""
    if all(os.path.isfile(os.path.join(d, "meta.json")) for d in (base_data, domain_data)):
        return
    from gptwo.data.builtin import pydoc_topics, stdlib_docstrings
    from gptwo.data.shard_corpus import prepare
    from gptwo.fileio import atomic_write
    from gptwo.tokenizer import Tokenizer

    base_docs, domain_docs = _usable(stdlib_docstrings()), _usable(pydoc_topics())
    for docs in (base_docs, domain_docs):
        random.Random(0).shuffle(docs)
    print(f"training a {VOCAB_SIZE}-token BPE on the standard library's docstrings...", file=sys.stderr)
    tokenizer = Tokenizer.train(base_docs, vocab_size=VOCAB_SIZE)
    for docs, data_dir, fraction, name in (
        (base_docs, base_data, BASE_VAL_FRACTION, "docstrings"),
        (domain_docs, domain_data, DOMAIN_VAL_FRACTION, "reference"),
    ):
        corpus = os.path.join(out_dir, "corpus", f"{name}.jsonl")
        atomic_write(corpus, "".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
        prepare([corpus], data_dir, tokenizer=tokenizer, val_fraction=fraction, progress=False, overwrite=True)


def _settings(threads: int) -> list[str]:
    """What every run shares on top of the cpu preset: no samples, the quickstart's dtype, the given threads."""
    from gptwo.train.speed import native_bf16

    return [
        "sample_tokens=0",
        "eval_batches=1000",
        f"dtype={'bfloat16' if native_bf16() else 'float32'}",
        f"threads={threads}",
    ]


def _quickstart_optimizer() -> list[str]:
    from gptwo.train.quickstart import OPTIMIZER

    return list(OPTIMIZER)


def _schedule(steps: int) -> list[str]:
    """A run of `steps` steps evaluated and saved once, at its end."""
    return [f"max_steps={steps}", f"eval_every={steps}", f"checkpoint_every={steps}", "log_every=10"]


# the keys that make a run what it is (threads, eval_batches and the like do not)
RECIPE_KEYS = (
    *("init_from", "optimizer", "lr", "weight_decay", "max_steps", "warmup_steps"),
    *("lora_rank", "lora_alpha", "lora_targets"),
)


def _check_recipe(run_dir: str, overrides: list[str]) -> None:
    """Refuse a run folder in `--out` that another recipe made (say a base of other --base-steps): read back or
    resumed, it would stand for a run it is not."""
    path = os.path.join(run_dir, "train_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f).get("config", {})
    for key, _, value in (o.partition("=") for o in overrides):
        if key not in RECIPE_KEYS or key not in saved or _same(saved[key], value):
            continue
        raise GptwoError(
            f"{run_dir} holds a run trained with {key}={saved[key]}, not the {key}={value} this bench asks for",
            "use a fresh --out (or the options that made that folder), or delete that run",
        )


def _same(saved: object, value: str) -> bool:
    try:
        return float(saved) == float(value)
    except (TypeError, ValueError):
        return str(saved) == value


def _train(data_dir: str, run_dir: str, overrides: list[str], progress: bool) -> dict:
    """`gptwo train` of one run in its own process (read back if it finished before)."""
    import subprocess

    from gptwo.bench.train import _finished, _train_command
    from gptwo.fileio import atomic_write

    steps = int(next(o for o in overrides if o.startswith("max_steps=")).split("=")[1])
    _check_recipe(run_dir, overrides)
    wall = 0.0
    if not _finished(run_dir, steps):
        start = time.perf_counter()
        done = subprocess.run(_train_command(data_dir, run_dir, overrides), capture_output=True, text=True)
        wall = time.perf_counter() - start
        atomic_write(run_dir + ".log", (done.stdout + done.stderr).encode())
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise GptwoError(f"the bench run {os.path.basename(run_dir)} failed ({last})", f"see {run_dir}.log")
    with open(os.path.join(run_dir, "checkpoints", f"step_{steps}", "trainer.json"), encoding="utf-8") as f:
        config = json.load(f)["config"]
    from gptwo.train.metrics import read_metrics

    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    run_val = [row["val_loss"] for row in rows if "val_loss" in row]
    result = {
        "tokens_per_step": config["batch_size"] * config["block_size"] * config["grad_accum"],
        "wall_s": wall or None,
        "run_val_loss": run_val[-1] if run_val else None,
    }
    if progress:
        shown = f"{result['run_val_loss']:.4f}" if run_val else "n/a"
        print(f"{os.path.basename(run_dir)}: val loss {shown} after {steps} steps ({wall:.0f} s)", file=sys.stderr)
    return result


def _eval_threads(threads: int) -> int:
    import torch

    from gptwo.train.loop import cpu_cores

    torch.set_num_threads(threads or cpu_cores())
    return torch.get_num_threads()


def evaluate(model_dir: str, domain_data: str, base_data: str) -> dict:
    """A model's mean loss (nats/token) over the whole validation split of the domain and of the base's data,
    batches of the cpu preset's shape, as `gptwo train` evaluates."""
    import torch

    from gptwo.config import TRAIN_PRESETS
    from gptwo.data.loader import ShardLoader
    from gptwo.train.loop import loss_fn
    from gptwo.weights import load_model

    model, _ = load_model(model_dir, device="cpu")
    model.eval()
    batch, block = TRAIN_PRESETS["cpu"]["batch_size"], TRAIN_PRESETS["cpu"]["block_size"]
    out = {}
    for key, data_dir in (("domain_loss", domain_data), ("base_data_loss", base_data)):
        loader = ShardLoader(data_dir, "val", batch_size=batch, block_size=block)
        with torch.no_grad():
            losses = [float(loss_fn(model, x, y)) for x, y in loader.iter_eval_batches()]
        out[key] = sum(losses) / len(losses)
    return out


def prepare_instruct(work: str, base_dir: str, conversations: int, heldout_per_kind: int) -> tuple[str, list[dict]]:
    """The instruction set's train conversations as `gptwo prepare chat` prepares them (gptwo's template, the loss
    on the assistant's tokens) in the base's tokenizer, under `work`, once; returns (data folder, held-out items).

    work/instruct.json records what the data was made from; a folder made from anything else is refused, so
    its finished runs are never read back as runs of other data."""
    from gptwo.bench.instruct import instruction_set
    from gptwo.data.chat import prepare_chat
    from gptwo.fileio import atomic_write
    from gptwo.tokenizer import load_tokenizer

    tok = load_tokenizer(base_dir)
    spec = {"conversations": conversations, "heldout_per_kind": heldout_per_kind, "seed": 0, "tokenizer": tok.identity}
    data_dir, spec_path = os.path.join(work, "data"), os.path.join(work, "instruct.json")
    heldout_path = os.path.join(work, "heldout.jsonl")
    if os.path.isfile(spec_path):
        with open(spec_path, encoding="utf-8") as f:
            made = json.load(f)
        if made != spec:
            raise GptwoError(
                f"{work} holds runs on an instruction set made from {made}, not {spec}",
                "use another --out, or delete that folder",
            )
        with open(heldout_path, encoding="utf-8") as f:
            return data_dir, [json.loads(line) for line in f]
    train, heldout = instruction_set(conversations, heldout_per_kind, seed=spec["seed"])
    train_path = os.path.join(work, "train.jsonl")
    for path, rows in ((train_path, train), (heldout_path, heldout)):
        atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows).encode())
    prepare_chat(
        [train_path], data_dir, tokenizer=tok, val_fraction=INSTRUCT_VAL_FRACTION, progress=False, overwrite=True
    )
    atomic_write(spec_path, (json.dumps(spec) + "\n").encode())  # last: the data is complete
    return data_dir, heldout


def _instruct_eval(
    out_dir: str, base_dir: str, data_dir: str, heldout: list[dict], runs: list[dict]
) -> tuple[dict, dict, str]:
    """The instruct task's fields, the base's evaluation (each run's added to it), and the loss recovery is on."""
    from gptwo.bench.instruct import KINDS
    from gptwo.data.loader import read_meta

    base_eval = evaluate_instruct(base_dir, heldout)
    for run in runs:
        run.update(evaluate_instruct(os.path.join(out_dir, run["name"]), heldout))
    train = read_meta(data_dir)["splits"]["train"]
    fields = {
        "description": "the synthetic instruction set (reverse letters, add numbers, name capitals) as chat "
        "conversations, the loss on the assistant's tokens; held out: instructions that never occur in train",
        "train_tokens": int(train["tokens"]),
        "counted_train_tokens": int(train["counted_tokens"]),
        "heldout": {kind: sum(item["kind"] == kind for item in heldout) for kind in KINDS},
        "heldout_counted_tokens": base_eval.pop("counted_tokens"),
    }
    for run in runs:
        del run["counted_tokens"]
    return fields, base_eval, "heldout_loss"


def evaluate_instruct(model_dir: str, heldout: list[dict]) -> dict:
    """A model's mean loss over the assistant's tokens of the held-out conversations (with their right answers),
    and its greedy answers' exact-match accuracy per kind."""
    from gptwo.bench.instruct import accuracy, greedy_answers
    from gptwo.chat import CHAT_TEMPLATE
    from gptwo.weights import load_model

    model, tok = load_model(model_dir, device="cpu")
    model.eval()
    loss, counted = heldout_loss(model, tok, heldout)
    answers = greedy_answers(model, tok, heldout, CHAT_TEMPLATE, ANSWER_TOKENS)
    return {"heldout_loss": loss, "counted_tokens": counted, "accuracy": accuracy(heldout, answers)}


def heldout_loss(model, tok, heldout: list[dict], batch: int = 64) -> tuple[float, int]:
    """(mean loss in nats over the counted tokens, their number): each held-out conversation with its answer,
    encoded by `encode_chat` with gptwo's template, the loss on what its mask counts, as training counts it."""
    import torch

    from gptwo.bench.instruct import answered
    from gptwo.chat import CHAT_TEMPLATE, encode_chat
    from gptwo.data.loader import IGNORE
    from gptwo.train.loop import loss_fn

    rows = []
    for item in heldout:
        ids, mask = encode_chat(tok, answered(item), CHAT_TEMPLATE)
        rows.append((ids[:-1], [token if counts else IGNORE for token, counts in zip(ids[1:], mask[1:])]))
    width = max(len(x) for x, _ in rows)
    if width > model.config.block_size:
        raise GptwoError(
            f"a held-out conversation is {width} tokens, longer than the base's context of {model.config.block_size}",
            "use a base with a longer context",
        )
    x = torch.tensor([x + [tok.eot_token] * (width - len(x)) for x, _ in rows])
    y = torch.tensor([y + [IGNORE] * (width - len(y)) for _, y in rows])
    with torch.no_grad():
        total = sum(
            float(loss_fn(model, x[i : i + batch], y[i : i + batch], "sum")) for i in range(0, len(rows), batch)
        )
    counted = int((y != IGNORE).sum())
    return total / counted, counted


def _tokens(data_dir: str, split: str) -> int:
    from gptwo.data.loader import read_meta

    return int(read_meta(data_dir)["splits"][split]["tokens"])


def render_quality(report: dict) -> str:
    """The quality report as a table."""
    if report["task"] == "instruct":
        return _render_instruct(report)
    from gptwo.bench import render_table

    lora = report["lora"]
    head = [
        f"LoRA quality: {report['description']}",
        f"{report['domain_train_tokens']:,} domain training tokens, {report['domain_val_tokens']:,} validation; "
        f"base {report['base_steps']} steps; every fine-tuning run {report['finetune_steps']} steps x "
        f"{report['tokens_per_step']:,} tokens (warm-up {report['warmup_steps']}, cosine), AdamW; LoRA "
        f"r={lora['rank']} alpha={lora['alpha']:g} on {','.join(lora['targets'])}",
    ]
    rows = [{"name": "base", "method": "-", **report["base"]}] + report["runs"]
    columns = [
        ("name", "run", ""),
        ("method", "method", ""),
        ("lr", "lr", "g"),
        ("weight_decay", "wd", "g"),
        ("domain_loss", "domain val loss", ".4f"),
        ("base_data_loss", "docstrings val loss", ".4f"),
        ("recovery", "recovery", ".3f"),
    ]
    tail = f"recovery = (base - LoRA) / (base - full) on the domain's val loss, best of each: {_verdict(report)}"
    return "\n".join([*head, render_table(rows, columns), tail])


def _render_instruct(report: dict) -> str:
    from gptwo.bench import render_table

    lora, heldout = report["lora"], report["heldout"]
    base = f"base {report['base_steps']} steps" if report["base_steps"] else f"base {report['base_model']}"
    head = [
        f"LoRA quality: {report['description']}",
        f"{report['train_conversations']:,} train conversations (the train split: {report['train_tokens']:,} tokens, "
        f"the loss counts {report['counted_train_tokens']:,}); held out: "
        + ", ".join(f"{n} {kind}" for kind, n in heldout.items())
        + f" ({report['heldout_counted_tokens']:,} counted tokens); {base}; every fine-tuning run "
        f"{report['finetune_steps']} steps x {report['tokens_per_step']:,} tokens (warm-up {report['warmup_steps']}, "
        f"cosine), AdamW; LoRA r={lora['rank']} alpha={lora['alpha']:g} on {','.join(lora['targets'])}",
    ]
    rows = [{"name": "base", "method": "-", **report["base"]}] + report["runs"]
    rows = [{**row, **{f"accuracy_{kind}": value for kind, value in row["accuracy"].items()}} for row in rows]
    columns = [
        ("name", "run", ""),
        ("method", "method", ""),
        ("lr", "lr", "g"),
        ("weight_decay", "wd", "g"),
        ("heldout_loss", "held-out loss", ".4f"),
        *((f"accuracy_{kind}", kind, ".1%") for kind in [*heldout, "all"]),
        ("recovery", "recovery", ".3f"),
    ]
    tail = (
        "recovery = (base - LoRA) / (base - full) on the held-out assistant tokens' loss, best of each: "
        f"{_verdict(report)}; accuracy: greedy exact match on the held-out instructions"
    )
    return "\n".join([*head, render_table(rows, columns), tail])


def _verdict(report: dict) -> str:
    recovery = report["recovery"]
    verdict = "n/a" if recovery is None else f"{recovery:.3f} ({'meets' if recovery >= 0.9 else 'below'} 0.90)"
    return f"{report['best_lora']} vs {report['best_full']}: {verdict}"
