"""Run an IsoFLOP plan: every run an ordinary `gptwo train` run folder, finished ones skipped, killed ones resumed.

OUT/runs/NAME is each run's folder (checkpoints, metrics.jsonl, loss.png, train.log); OUT/runs/NAME/scale.json
marks it finished with its record; OUT/results.jsonl holds one record per finished run (params counted three
ways, tokens, FLOPs, final held-out loss, wall and CPU seconds), rewritten after each run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from gptwo.errors import GptwoError
from gptwo.scale.plan import count_params, read_plan, run_flops, vocab_size_of

RESULTS = "results.jsonl"
MARKER = "scale.json"  # a finished run's record
STARTED = "scale-run.json"  # written before a run trains: the folder is this sweep's, to resume


def run_sweep(plan_path: str, data_dir: str, out_dir: str, parallel: int = 1, threads: int = 0) -> list[dict]:
    """Train every unfinished run of the plan (`parallel` processes at once, each `threads` torch threads);
    return all records."""
    plan = read_plan(plan_path)
    vocab = vocab_size_of(data_dir)
    if plan.get("vocab_size", vocab) != vocab:
        raise GptwoError(
            f"the plan counts parameters for a {plan['vocab_size']}-token vocabulary but {data_dir} has {vocab}",
            f"make the plan with --data {data_dir} (or --vocab-size {vocab})",
        )
    if parallel < 1:
        raise GptwoError(f"--parallel {parallel} must be at least 1", "use --parallel 1 or more")
    threads = threads or max(1, (os.cpu_count() or 1) // parallel)
    _check_sweep_folder(out_dir)
    jobs = [_job(plan, run, data_dir, out_dir, threads, vocab) for run in plan["runs"]]
    _check_held_out(data_dir, jobs)
    records = {job["name"]: rec for job in jobs if (rec := finished_record(job)) is not None}
    pending = [job for job in jobs if job["name"] not in records]
    for job in pending:
        check_run_folder(job)
    print(
        f"{len(records)} of {len(jobs)} runs already finished; training {len(pending)} "
        f"({parallel} at a time, {threads} thread(s) each)",
        file=sys.stderr,
    )
    for record in _train_all(pending, parallel):
        records[record["name"]] = record
        _write_results(out_dir, [records[job["name"]] for job in jobs if job["name"] in records])
        print(
            f"[{len(records)}/{len(jobs)}] {record['name']}: held-out loss {record['loss']:.4f} "
            f"(N={record['params']:,}, D={record['tokens']:,}, "
            f"C={record['flops']:.3g}, {record['wall_s']:.0f} s wall, {record['cpu_s']:.0f} s CPU)",
            file=sys.stderr,
        )
    return [records[job["name"]] for job in jobs]


def _job(plan: dict, run: dict, data_dir: str, out_dir: str, threads: int, vocab: int) -> dict:
    """Everything one run needs: its folder, its trainer overrides and the counts its record states."""
    from gptwo.config import load_train_config, train_fields

    fields = train_fields()
    run_dir = _confined(out_dir, run["name"])
    settings = {**plan.get("train", {}), **{k: v for k, v in run.items() if k in fields}}
    settings.setdefault("eval_every", run["max_steps"])
    settings.setdefault("checkpoint_every", max(1, min(run["max_steps"], max(50, run["max_steps"] // 5))))
    settings.setdefault("threads", threads)
    config = load_train_config(overrides=settings)  # checks every value now, before any run starts
    counts = count_params(config.n_layer, config.n_head, config.n_embd, vocab, config.block_size)
    tokens = config.max_steps * config.batch_size * config.block_size * config.grad_accum
    record = {
        "name": run["name"],
        "budget": run.get("budget"),
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "params": counts.params,
        "params_total": counts.total,
        "params_non_embedding": counts.non_embedding,
        "tokens": tokens,
        "flops": run_flops(counts.params, tokens),
        "flops_attention": 12.0 * config.n_layer * config.n_embd * config.block_size * tokens,
        "steps": config.max_steps,
        "seed": config.seed,
        "unique_tokens": _train_tokens(data_dir),
    }
    return {
        "name": run["name"],
        "data_dir": data_dir,
        "run_dir": run_dir,
        "batch_tokens": config.batch_size * config.block_size,
        "overrides": [f"{k}={v}" for k, v in settings.items()],
        "record": record,
    }


def _train_tokens(data_dir: str) -> int:
    """The unique training tokens of a data folder (for fits that count repeated tokens: `--repeats`)."""
    from gptwo.data.loader import read_meta

    return int(read_meta(data_dir)["train_tokens"])


def _check_held_out(data_dir: str, jobs: list[dict]) -> None:
    """Every run is measured by its held-out loss: refuse, before training, data whose validation split is
    under one batch."""
    from gptwo.data.loader import read_meta

    val_tokens = read_meta(data_dir).get("val_tokens", 0)
    batch = max(job["batch_tokens"] for job in jobs)
    if val_tokens <= batch:
        raise GptwoError(
            f"{data_dir} holds {val_tokens} held-out tokens, not more than one batch of {batch}; "
            "the sweep measures held-out loss",
            "prepare the data with a larger --val-fraction, or lower batch_size/block_size in the plan",
        )


_SHAPE_KEYS = ("name", "n_layer", "n_head", "n_embd", "steps", "tokens")


def _changed(record: dict, job: dict) -> list[str]:
    """The shape fields in which a run folder's record differs from its plan entry now."""
    return [k for k in _SHAPE_KEYS[1:] if record.get(k) != job["record"][k]]


def _confined(out_dir: str, name: str) -> str:
    """OUT/runs/NAME, refused unless its resolved path lies inside OUT/runs (no '..', no absolute name,
    no link out)."""
    from gptwo.scale.plan import check_run_name

    check_run_name(name, "the plan")
    runs = os.path.realpath(os.path.join(out_dir, "runs"))
    run_dir = os.path.join(out_dir, "runs", name)
    resolved = os.path.realpath(run_dir)
    if os.path.dirname(resolved) != runs:
        raise GptwoError(
            f"run {name}'s folder {run_dir} resolves to {resolved}, outside the sweep folder {runs}",
            "remove that link, or rename the run in the plan",
        )
    return run_dir


def _check_sweep_folder(out_dir: str) -> None:
    """--out is a folder (new, or a sweep's): its results.jsonl, if any, is a sweep's, rewritten after each run."""
    from gptwo.fileio import read_json_lines

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise GptwoError(f"--out {out_dir} is a file", "give a folder for the sweep (new, or this sweep's to resume)")
    runs = os.path.join(out_dir, "runs")
    if os.path.exists(runs) and not os.path.isdir(runs):
        raise GptwoError(f"{runs} is a file, where the sweep keeps its run folders", "choose another --out")
    results = os.path.join(out_dir, RESULTS)
    if os.path.exists(results):
        fix = "choose another --out: this one holds a results.jsonl that 'gptwo scale run' did not write"
        for number, row in read_json_lines(results, fix):
            if not all(k in row for k in ("name", "params", "tokens", "loss")):
                raise GptwoError(f"{results}:{number} is not a sweep result (name, params, tokens, loss)", fix)


def check_run_folder(job: dict) -> None:
    """A run trains into a new or empty folder, or resumes one this sweep started for the same plan entry;
    a folder of other files (the user's, another command's run or model) is refused, never trained over."""
    from gptwo.fileio import read_json_file

    run_dir = job["run_dir"]
    if not os.path.lexists(run_dir):
        return
    if not os.path.isdir(run_dir):
        raise GptwoError(f"{run_dir} is a file, where run {job['name']} would train", "move it, or rename the run")
    if not os.listdir(run_dir):
        return
    started = os.path.join(run_dir, STARTED)
    fix = "choose another --out, or rename the run in the plan (nothing in that folder was changed)"
    if not os.path.isfile(started):
        if os.path.isfile(os.path.join(run_dir, "train.log")):
            return  # a run this command started before it wrote the marker: resumed as before
        raise GptwoError(f"{run_dir} holds files that 'gptwo scale run' did not start there", fix)
    record = read_json_file(started, f"the run marker {started}", "delete that run folder to retrain the run")
    if not isinstance(record, dict) or record.get("name") != job["name"]:
        raise GptwoError(f"{started} was written for another run than {job['name']}", fix)
    changed = _changed(record, job)
    if changed:
        raise GptwoError(
            f"{run_dir} was started with {changed[0]}={record.get(changed[0])}, "
            f"the plan now says {job['record'][changed[0]]}",
            "delete that run folder to retrain it, or rename the run in the plan",
        )


def finished_record(job: dict) -> dict | None:
    """The record of a run already trained to the end of this plan entry, or None; an entry changed since
    is an error."""
    from gptwo.fileio import read_json_file

    path = os.path.join(job["run_dir"], MARKER)
    if not os.path.isfile(path):
        return None
    fix = "delete that run folder to retrain the run"
    record = read_json_file(path, f"the finished-run marker {path}", fix)
    loss = record.get("loss") if isinstance(record, dict) else None
    if not isinstance(loss, (int, float)) or isinstance(loss, bool):
        raise GptwoError(f"{path} is not a finished run's record (no numeric loss)", fix)
    changed = _changed(record, job)
    if changed:
        raise GptwoError(
            f"{job['run_dir']} was trained with {changed[0]}={record.get(changed[0])}, "
            f"the plan now says {job['record'][changed[0]]}",
            "delete that run folder to retrain it, or rename the run in the plan",
        )
    return record


def _train_all(jobs: list[dict], parallel: int):
    """Yield each job's record as it finishes: in this process, or in `parallel` fresh processes."""
    if parallel == 1 or len(jobs) <= 1:
        yield from map(train_job, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_job, job) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def train_job(job: dict) -> dict:
    """Train (or resume, or just read back) one run with the ordinary trainer; write its finished-marker;
    return its record."""
    from gptwo.fileio import atomic_write
    from gptwo.train.loop import run_training

    check_run_folder(job)
    os.makedirs(job["run_dir"], exist_ok=True)
    started = os.path.join(job["run_dir"], STARTED)
    if not os.path.isfile(started):
        atomic_write(started, (json.dumps({k: job["record"][k] for k in _SHAPE_KEYS}) + "\n").encode())
    wall, cpu = time.perf_counter(), time.process_time()
    with open(os.path.join(job["run_dir"], "train.log"), "a", encoding="utf-8") as log, contextlib.redirect_stderr(log):
        # check_run_folder has already refused a folder this sweep did not start; the trainer's own check
        # (which knows nothing of scale-run.json) is therefore told to let it through
        summary = run_training(
            job["data_dir"], job["run_dir"], overrides=job["overrides"], resume=True, progress=False, overwrite=True
        )
    loss = summary.get("val_loss", _final_val_loss(job))
    if loss is None:
        raise GptwoError(
            f"run {job['name']} has no held-out loss", "prepare the data with a validation split larger than one batch"
        )
    record = {
        **job["record"],
        "loss": loss,
        "train_loss": summary.get("loss"),
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
    }
    atomic_write(os.path.join(job["run_dir"], MARKER), (json.dumps(record) + "\n").encode())
    return record


def _final_val_loss(job: dict) -> float | None:
    """The held-out loss logged at the last step (a run killed after finishing but before its marker)."""
    from gptwo.train.metrics import read_metrics

    rows = read_metrics(os.path.join(job["run_dir"], "metrics.jsonl"))
    return next(
        (row["val_loss"] for row in reversed(rows) if "val_loss" in row and row["step"] == job["record"]["steps"]), None
    )


def _write_results(out_dir: str, records: list[dict]) -> None:
    from gptwo.fileio import atomic_write

    atomic_write(os.path.join(out_dir, RESULTS), "".join(json.dumps(r) + "\n" for r in records).encode())
