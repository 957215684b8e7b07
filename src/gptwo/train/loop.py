"""The training loop: data → model → optimizer steps (AdamW or Muon), with evaluation, samples, metrics and checkpoints.

One function, `train`, runs alone or as one rank under torchrun (DDP or FSDP). Rank 0 writes every
file and the progress bar; all ranks stop together on an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gptwo.config import GPTConfig, TrainConfig, load_train_config
from gptwo.data.loader import IGNORE
from gptwo.errors import GptwoError
from gptwo.fileio import atomic_write, read_json_file
from gptwo.lora import LoraSettings, apply_lora
from gptwo.model import GPT, describe, param_count
from gptwo.runtime import check_memory
from gptwo.select.online import make_selector
from gptwo.tokenizer import Tokenizer
from gptwo.train import checkpoint as ckpt
from gptwo.train.distributed import (
    Dist,
    close_distributed,
    gather_objects,
    grad_sync,
    init_distributed,
    mean_across,
    parallelize,
    unwrap,
)
from gptwo.train.metrics import MetricsLog, plot_losses
from gptwo.train.optim import flops_per_token, lr_at, make_optimizer, optimizer_flops_per_step, peak_flops
from gptwo.train.runfolder import RUN_CONFIG, check_run_folder, run_lock
from gptwo.train.speed import (
    autocast,
    compile_enabled,
    compile_model,
    compiled_loss,
    keep_freed_memory,
    use_bf16,
    use_fused_adamw,
    use_onednn_linears,
)
from gptwo.train.threads import ThreadTuner

# what a resumed run keeps: its model, and its optimizer (whose saved state is for that optimizer only)
# (and its adapters' shape and base: the checkpoint holds only the adapters, the base is init_from again)
FIXED_ON_RESUME = (
    "n_layer",
    "n_head",
    "n_embd",
    "dropout",
    "init_from",
    "optimizer",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "lora_base",
)


@dataclass
class Data:
    """The prepared data a run trains on: loaders, tokenizer and what meta.json says."""

    train: object
    val: object | None
    tokenizer: Tokenizer
    meta: dict = field(default_factory=dict)

    @property
    def identity(self) -> dict:
        return {
            "tokenizer": self.train.tokenizer_identity,
            "train_tokens": self.meta.get("train_tokens"),
            "val_tokens": self.meta.get("val_tokens"),
        }


def run_training(
    data_dir: str,
    out_dir: str,
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    init_from: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    require_run: bool = False,
) -> dict:
    """What `gptwo train` does: resolve the config (a resumed run starts from its saved one) and train.

    `resume` continues from the latest checkpoint or, before the first, from the config the run saved at
    step 0 (RUN/train_config.json), with `overrides` on top; with neither, it starts a new run, unless
    `require_run` (`gptwo train --resume`) makes that an error. `out_dir` must be new, empty or a run
    folder (see gptwo.train.runfolder), unless `overwrite`.
    """
    check_run_folder(out_dir, (data_dir, init_from or ""), overwrite)
    overrides = list(overrides or [])
    if max_steps is not None:
        overrides.append(f"max_steps={max_steps}")
    if init_from:
        overrides.append(f"init_from={init_from}")
    # the lock first: a second process is told the run is in use, not that it has nothing to resume
    with run_lock(out_dir, enabled=int(os.environ.get("RANK", "0")) == 0):
        config = _resolve_config(out_dir, preset, config_file, overrides, resume, require_run)
        return train(data_dir, out_dir, config, resume=resume, progress=progress, overwrite=overwrite)


def _resolve_config(
    out_dir: str,
    preset: str | None,
    config_file: str | None,
    overrides: list[str],
    resume: bool,
    require_run: bool,
) -> TrainConfig:
    """The run's config: its latest checkpoint's or its saved step-0 config (resuming), else preset/file/overrides."""
    last = ckpt.latest_checkpoint(out_dir) if resume else None
    started = read_run_config(out_dir) if resume and last is None else None
    if last is not None:
        saved = ckpt.read_trainer_state(last)["config"]
    elif started is not None:
        saved = started["config"]
    elif resume and require_run:
        raise GptwoError(
            f"--resume: {out_dir} holds no run to continue (no checkpoint and no {RUN_CONFIG})",
            "start the run without --resume (with its --preset or --config), or check --out",
        )
    else:
        return load_train_config(preset, config_file, overrides)
    config = load_train_config(overrides={**saved, **_parsed(overrides)})
    saved = {**TrainConfig().to_dict(), **saved}  # a run saved before a key existed ran with its default
    changed = [k for k in FIXED_ON_RESUME if getattr(config, k) != saved[k]]
    if changed:
        raise GptwoError(
            f"--resume cannot change {changed[0]} (the run was started with {changed[0]}={saved.get(changed[0])!r})",
            "drop that override, or start a new run with --init-from RUN",
        )
    return config


def read_run_config(run_dir: str) -> dict | None:
    """RUN/train_config.json ({"config", "data"}: what the run was started with, written at step 0), or None."""
    path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        return None
    fix = f"delete {path} and start the run again without --resume"
    saved = read_json_file(path, f"the run's saved config {path}", fix)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise GptwoError(f"the run's saved config {path} has no 'config' object", fix)
    return saved


def _parsed(overrides: list[str]) -> dict:
    """`key=value` strings as typed values (via load_train_config's checks)."""
    keys = {item.partition("=")[0].strip() for item in overrides}
    full = load_train_config(overrides=overrides).to_dict()
    return {k: full[k] for k in keys if k in full}


def train(
    data_dir: str,
    out_dir: str,
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train (or, with `resume`, continue) a GPT on prepared data; return a summary of the run.

    The run folder is checked (new, empty or a run's own, unless `overwrite`) and locked for the
    run: a second process training into it stops with an error naming the first.
    """
    from gptwo.weights import resolve_device

    inputs = (data_dir, config.init_from, config.selection_reference)
    check_run_folder(out_dir, inputs, overwrite)
    device = resolve_device(config.device)
    with run_lock(out_dir, enabled=int(os.environ.get("RANK", "0")) == 0):  # torchrun: rank 0 holds it
        info, device = init_distributed(device)
        try:
            return _Trainer(data_dir, out_dir, config, info, device, resume, progress).run()
        finally:
            close_distributed()


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (in nats) of a batch: the mean (or with reduction="sum", the sum) over its
    counted targets (targets equal to IGNORE, which a loss mask leaves out, are not counted)."""
    logits = model(x)
    return F.cross_entropy(
        logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE, reduction=reduction
    )


class _Trainer:
    def __init__(
        self,
        data_dir: str,
        out_dir: str,
        config: TrainConfig,
        info: Dist,
        device: torch.device,
        resume: bool,
        progress: bool,
    ):
        self.config, self.info, self.device, self.out_dir = config, info, device, out_dir
        self.progress = progress and info.is_main
        set_threads(config, info, device)
        keep_freed_memory(device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.data = open_data(data_dir, config, info)
        self.masked = bool(self.data.meta.get("loss_mask"))  # chat data: the loss counts some targets only
        self.resume_from = self._check_run_dir(resume)
        started = read_run_config(out_dir) if resume and not self.resume_from else None
        if started is not None and "data" in started:
            self._check_same_data(started["data"])
        torch.manual_seed(config.seed)
        model = self._build_model()
        self.grad_accum = grad_accum_for(config, info.world_size)
        self.model_config: GPTConfig = model.config
        self.n_params = model.num_params()
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model.to(device)
        use_onednn_linears(model, config, device)
        self.compiled = compile_enabled(config, device, config.max_steps - self._resumed_step())
        per_block = info.enabled and config.parallel == "fsdp"
        if self.compiled and per_block:
            compile_model(model, per_block=True)
        loss = functools.partial(self.loss_fn, reduction="sum") if self.masked else self.loss_fn
        self.train_loss = compiled_loss(loss, config, device) if self.compiled and not per_block else loss
        self.model = parallelize(model, info, config.parallel, device)
        self.optimizer = make_optimizer(
            self.model, config, fused=use_fused_adamw(device, config.parallel if info.enabled else None)
        )
        self.selector = make_selector(config, self.data.train, device, lambda: autocast(config, device))
        self.step = 0
        torch.manual_seed(config.seed + info.rank)  # dropout masks differ between ranks
        if self.resume_from:
            self._load(self.resume_from)  # restores each rank's RNG state as well
        self.log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), enabled=info.is_main)
        self.log.restart(self.step)  # earlier rows are kept; readers drop the ones this run will log again

    # ---------------------------------------------------------------- setup
    def _check_run_dir(self, resume: bool) -> str | None:
        last = ckpt.latest_checkpoint(self.out_dir)
        if last and not resume:
            raise GptwoError(
                f"{self.out_dir} already holds a run ({os.path.basename(last)})",
                "pass --resume to continue it, or choose a new --out",
            )
        if resume and last is None and self.info.is_main:
            again = read_run_config(self.out_dir) is not None
            what = "starting its run again from step 0 with its saved config" if again else "starting a new run"
            print(f"note: no checkpoint in {self.out_dir} yet; {what}", file=sys.stderr)
        return last

    def _resumed_step(self) -> int:
        return ckpt.read_trainer_state(self.resume_from)["step"] if self.resume_from else 0

    def _build_model(self) -> GPT:
        config, data = self.config, self.data
        if config.lora_rank and not config.init_from:
            raise GptwoError(
                f"lora_rank={config.lora_rank} trains adapters on a pretrained model, and none is given",
                "pass --init-from BASE (a model folder, run folder or gpt2), or drop lora_rank",
            )
        if self.resume_from and not config.lora_rank:  # a LoRA run resumes from its base and its saved adapters
            from gptwo.weights import check_shapes, read_config, shapes_from_hf, stored_shapes

            shape = dataclasses.replace(read_config(self.resume_from), dropout=config.dropout)
            stored = stored_shapes(self.resume_from)
            if stored is not None:  # the checkpoint's config against its weights, before building the model
                check_shapes(shape, shapes_from_hf(stored), self.resume_from)
            self._check_memory(shape)
            model = GPT(shape)
        elif config.init_from:
            from gptwo.weights import load_model

            _check_tokenizer(config.init_from, _known_tokenizer(config.init_from), data)  # before any download
            model, model_tok = load_model(config.init_from, device="cpu")
            _check_tokenizer(config.init_from, model_tok.identity, data)
            self._check_memory(model.config)  # loading was checked against host memory; training needs more
            _set_dropout(model, config.dropout)
            model.train()
        else:
            shape = config.model_config(data.train.n_vocab)
            self._check_memory(shape)
            model = GPT(shape)
        if config.block_size > model.config.block_size:
            raise GptwoError(
                f"block_size={config.block_size} is longer than the model's context of {model.config.block_size}",
                f"use block_size={model.config.block_size} or less",
            )
        if data.train.n_vocab > model.config.vocab_size:
            raise GptwoError(
                f"the data's tokenizer has {data.train.n_vocab} tokens but the model only {model.config.vocab_size}",
                "prepare the data with the model's tokenizer",
            )
        if config.lora_rank:
            settings = LoraSettings(
                rank=config.lora_rank,
                alpha=config.lora_alpha or float(config.lora_rank),
                dropout=config.lora_dropout,
                targets=config.lora_target_names,
            )
            apply_lora(model, settings, base=config.lora_base).train()
        return model

    def _check_memory(self, shape: GPTConfig) -> None:
        """Refuse a run whose model, gradients, AdamW state and activations cannot fit the device, before any
        allocation."""
        # LoRA: the frozen base in its precision (the adapters and their optimizer state are small)
        per_param = {"fp32": 4, "bf16": 2, "int8": 1}[self.config.lora_base] if self.config.lora_rank else 16
        need = training_bytes(shape, self.config.batch_size, self.config.block_size, per_param)
        check_memory(
            need,
            f"training {describe(shape)} on batch_size={self.config.batch_size} x block_size={self.config.block_size}",
            "choose a smaller model or batch_size, or free memory",
            self.device,
        )

    def _load(self, path: str) -> None:
        trainer = ckpt.read_trainer_state(path)
        self._check_same_data(trainer["data"])
        optimizer = trainer["config"].get("optimizer", "adamw")
        if optimizer != self.config.optimizer:
            raise GptwoError(
                f"the run was trained with optimizer={optimizer}, not optimizer={self.config.optimizer}",
                f"resume with optimizer={optimizer}, or start a new run with --init-from RUN",
            )
        trainer = ckpt.load_checkpoint(path, self.model, self.optimizer, self.info)
        self.step = trainer["step"]
        self.data.train.load_state_dict(trainer["ranks"][0]["loader"])  # slots consumed by all ranks together
        if self.info.is_main:
            print(f"resuming from {path} at step {self.step}", file=sys.stderr)

    def _check_same_data(self, saved: dict) -> None:
        """A resumed run reads the data it was started on (its tokenizer and token counts)."""
        now = self.data.identity
        if saved["tokenizer"] != now["tokenizer"]:
            raise GptwoError(
                f"the run was trained on data tokenized with '{saved['tokenizer']}', "
                f"but --data uses '{now['tokenizer']}'",
                "resume with the same --data, or start a new run with --init-from RUN",
            )
        if saved != now:
            raise GptwoError(
                f"--data differs from the data this run was trained on "
                f"({saved['train_tokens']} vs {now['train_tokens']} training tokens)",
                "resume with the same --data, or start a new run with --init-from RUN",
            )

    def _save_run_config(self) -> None:
        """RUN/train_config.json: the resolved config and data, so `--resume` before a checkpoint is this run."""
        if self.info.is_main:
            saved = {"config": self.config.to_dict(), "data": self.data.identity}
            atomic_write(os.path.join(self.out_dir, RUN_CONFIG), (json.dumps(saved, indent=1) + "\n").encode())

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict:
        config, info = self.config, self.info
        tokens_per_step = config.batch_size * config.block_size * self.grad_accum * info.world_size
        flops = flops_per_token(self.model_config, self.n_params, config.block_size) * tokens_per_step
        scoring = (
            self.selector.scoring_flops(unwrap(self.model), config.batch_size, config.block_size)
            * self.grad_accum
            * info.world_size
        )
        # cumulative `flops` in metrics.jsonl: training + selection scoring (docs/selection.md) + Muon's
        # Newton-Schulz iterations (docs/training.md); MFU counts the model's FLOPs only
        flops_per_step = flops + scoring + optimizer_flops_per_step(self.optimizer)
        peak = peak_flops(self.device, config.peak_flops) * info.world_size
        if info.is_main:
            print(
                f"model {self.n_params / 1e6:.2f}M params | {tokens_per_step:,} tokens/step = "
                f"{config.batch_size} seq x {config.block_size} tokens "
                f"x {self.grad_accum} accum x {info.world_size} procs | {config.max_steps} steps on {self.device}"
                + (f" ({torch.get_num_threads()} threads)" if self.device.type == "cpu" else "")
                + (
                    f" | LoRA r={config.lora_rank}: {self.trainable:,} trainable params, {config.lora_base} base"
                    if config.lora_rank
                    else ""
                ),
                file=sys.stderr,
            )
        bar = _progress_bar(self.step, config.max_steps, self.progress)
        summary: dict = {"run_dir": self.out_dir, "rank": info.rank, "planned_steps": config.max_steps}
        clock, window_steps = time.perf_counter(), 0
        start_time, start_step = time.perf_counter(), self.step
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # steps whose loss and norm are not yet read back
        budget = _TimeBudget(config, self.step, start_time) if config.max_time else None
        # under a time budget on a CPU with threads=0: fewer threads while other processes hold the cores
        tuner = None
        if budget is not None and self.device.type == "cpu" and not config.threads and info.world_size == 1:
            tuner = ThreadTuner.for_run(cpu_list(), self.step)
        self._save_run_config()
        stop = _StopSignals(info, self.device)
        try:
            while self.step < config.max_steps:
                first_at_new_count, began = tuner is not None and tuner.changed, time.perf_counter()
                pending.append(self.train_step())
                self.step += 1
                window_steps += 1
                bar.update(1)
                if tuner is not None:
                    if first_at_new_count:
                        tuner.settled(self.step)
                        budget.exclude(time.perf_counter() - began)
                    elif tuner.due(self.step) and (said := tuner.measure(self.step)) and info.is_main:
                        bar.write(said, file=sys.stderr)
                if budget is not None and budget.due(self.step):
                    config = self.config = self._fit_time_budget(budget, bar)
                logged = self.step % config.log_every == 0 or self.step == config.max_steps
                evaluated = self.step % config.eval_every == 0 or self.step == config.max_steps
                saved = self.step % config.checkpoint_every == 0 or self.step == config.max_steps
                stopping = stop.agreed(at_sync_point=logged)
                saved = saved or bool(stopping)
                if not (logged or evaluated or saved):
                    continue
                loss = summary["loss"] = self._check_finite(pending)
                pending.clear()
                if logged:
                    elapsed = time.perf_counter() - clock
                    row = {
                        "step": self.step,
                        "loss": loss,
                        "lr": lr_at(self.step - 1, config),
                        "tokens_per_s": tokens_per_step * window_steps / elapsed,
                        "flops": self.step * flops_per_step,
                    }
                    if peak:
                        row["mfu"] = flops * window_steps / elapsed / peak
                    self.log.write(row)
                    bar.set_postfix_str(
                        f"loss {loss:.3f} | {row['tokens_per_s']:,.0f} tok/s | {row['flops']:.2e} FLOPs"
                        + (f" | mfu {row['mfu']:.1%}" if peak else "")
                    )
                    clock, window_steps = time.perf_counter(), 0
                paused = time.perf_counter()
                if evaluated:
                    summary.update(self.evaluate(bar))
                    clock, window_steps = time.perf_counter(), 0  # tokens/s counts training only
                if saved:
                    self.save()
                    clock, window_steps = time.perf_counter(), 0
                if budget is not None and (evaluated or saved):
                    budget.pause(time.perf_counter() - paused)
                    if tuner is not None:
                        tuner.pause(time.perf_counter() - paused)
                if stopping and self.step < config.max_steps:
                    raise self._stopped(stopping, bar)
        finally:
            stop.close()
            bar.close()
        elapsed = time.perf_counter() - start_time
        summary.update(
            step=self.step,
            elapsed_s=elapsed,
            tokens=self.step * tokens_per_step,
            flops=self.step * flops_per_step,
            tokens_per_s=(self.step - start_step) * tokens_per_step / elapsed if elapsed > 0 else 0.0,
            dtype="bfloat16" if use_bf16(config, self.device) else "float32",
            threads=torch.get_num_threads() if self.device.type == "cpu" else None,
        )
        if tuner is not None:
            tuner.steps_at[tuner.threads] = tuner.steps_at.get(tuner.threads, 0) + self.step - tuner.since[0]
            summary["threads_steps"] = {n: steps for n, steps in sorted(tuner.steps_at.items()) if steps}
        return summary

    def _stopped(self, signum: int, bar) -> TrainingStopped:
        if self.info.is_main:
            name = signal.Signals(signum).name
            bar.write(
                f"{name}: stopped at step {self.step}, checkpoint saved in "
                f"{os.path.join(self.out_dir, ckpt.CHECKPOINTS, f'step_{self.step}')}",
                file=sys.stderr,
            )
        return TrainingStopped(signum)

    def _fit_time_budget(self, budget: _TimeBudget, bar) -> TrainConfig:
        """The config with max_steps cut so training ends within max_time (rank 0's measurement, on every rank)."""
        steps = gather_objects(budget.steps_that_fit(self.step, self.config.max_steps), self.info)[0]
        if steps >= self.config.max_steps:
            return self.config
        bar.total = steps
        if self.info.is_main:
            again = " again" if budget.cuts > 1 else ""
            bar.write(
                f"max_time={budget.max_time:g}s: training {steps} steps instead of {self.config.max_steps}{again} "
                f"({budget.rate:.1f} steps/s measured)",
                file=sys.stderr,
            )
        # saved so, a resumed run keeps this schedule
        self.config = dataclasses.replace(self.config, max_steps=steps, max_time=0.0)
        self._save_run_config()
        return self.config

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches: this rank's mean loss and the gradient norm, as tensors.

        Nothing is read back to the host here, so a GPU runs ahead; `_check_finite` reads them at log steps.
        """
        config, model = self.config, self.model
        lr = lr_at(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        if self.masked:
            return self._masked_step()
        total = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.selector.next_batch(model)  # on the device; selection (if any) scores a pool first
            with grad_sync(model, micro == self.grad_accum - 1):
                with autocast(config, self.device):
                    loss = self.train_loss(model, x, y)
                (loss / self.grad_accum).backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), config.grad_clip if config.grad_clip else float("inf")
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / self.grad_accum, norm

    def _masked_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`train_step` on data with a loss mask: the mean over the step's counted targets, on all ranks together.

        Micro-batches hold different numbers of counted targets, so each contributes its summed loss divided by
        the step's count over every micro-batch and rank (read first; one all-reduce under DDP/FSDP): a
        micro-batch with few counted targets weighs as little as they do. Under DDP/FSDP gradients are averaged
        over ranks, so each rank scales by world_size. A step with no counted target changes nothing but the
        optimizer's own state (weight decay, moments).
        """
        config, model = self.config, self.model
        batches = [self.selector.next_batch(model) for _ in range(self.grad_accum)]  # the model is fixed till the step
        counted = sum((y != IGNORE).sum() for _, y in batches).to(torch.float32)
        if self.info.enabled:
            torch.distributed.all_reduce(counted)
        scale = self.info.world_size / counted.clamp(min=1)
        total = torch.zeros((), device=self.device)
        for micro, (x, y) in enumerate(batches):
            with grad_sync(model, micro == self.grad_accum - 1):
                with autocast(config, self.device):
                    loss = self.train_loss(model, x, y) * scale
                loss.backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), config.grad_clip if config.grad_clip else float("inf")
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm  # the mean over ranks (as `_check_finite` takes it) is the step's mean loss

    def _check_finite(self, pending: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """The last pending step's loss (mean over ranks); stops at the first pending step whose loss or norm
        is not finite."""
        first = self.step - len(pending) + 1
        for offset, (loss, norm) in enumerate(pending):
            loss_value = mean_across(float(loss), self.info, self.device)
            norm_value = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                last = ckpt.latest_checkpoint(self.out_dir)
                what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {norm_value}"
                kept = f"; the last good checkpoint is {last}" if last else ""
                raise GptwoError(
                    f"training diverged at step {first + offset}: {what}{kept}",
                    "lower lr (or raise warmup_steps) and resume or restart",
                )
        return loss_value

    loss_fn = staticmethod(loss_fn)  # a class attribute, so tests can poison it

    # ---------------------------------------------------------------- evaluation, samples, checkpoints
    @torch.no_grad()
    def evaluate(self, bar, max_batches: int | None = None) -> dict:
        """Validation loss (and bits per byte), a sample, a metrics row and an updated loss plot."""
        config, model = self.config, self.model
        result: dict = {}
        if self.data.val is not None and self.masked:
            result["val_loss"] = self._masked_val_loss(max_batches)
            bpb = bits_per_byte(result["val_loss"], self.data.meta)
            if bpb is not None:
                result["val_bpb"] = bpb
        elif self.data.val is not None:
            model.eval()
            losses = []
            with autocast(config, self.device), _eager(self.compiled):
                for x, y in self.data.val.iter_eval_batches(max_batches or config.eval_batches):
                    losses.append(float(self.loss_fn(model, x.to(self.device), y.to(self.device))))
            if losses:
                result["val_loss"] = mean_across(sum(losses) / len(losses), self.info, self.device)
                bpb = bits_per_byte(result["val_loss"], self.data.meta)
                if bpb is not None:
                    result["val_bpb"] = bpb
        if config.sample_tokens:
            result["sample"] = self.sample(config.sample_prompt, config.sample_tokens)
        if self.info.is_main and result:
            self.log.write({"step": self.step, **result})
            text = " | ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "sample")
            bar.write(
                f"step {self.step}: {text}"
                + (f"\n  sample: {config.sample_prompt + result['sample']!r}" if "sample" in result else ""),
                file=sys.stderr,
            )
            try:
                plot_losses(self.log.path, os.path.join(self.out_dir, "loss.png"))
            except GptwoError as err:  # the plot is a convenience: a full disk is reported by the next checkpoint
                bar.write(f"warning: {err}", file=sys.stderr)
        return result

    def _masked_val_loss(self, max_batches: int | None) -> float:
        """Validation loss over the counted targets of the eval batches of all ranks (a loss mask's data)."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # summed loss, counted targets
        with autocast(self.config, self.device), _eager(self.compiled):
            for x, y in self.data.val.iter_eval_batches(max_batches or self.config.eval_batches):
                x, y = x.to(self.device), y.to(self.device)
                totals[0] += self.loss_fn(self.model, x, y, reduction="sum").double()
                totals[1] += (y != IGNORE).sum()
        if self.info.enabled:
            torch.distributed.all_reduce(totals)
        return float(totals[0] / totals[1].clamp(min=1))

    def sample(self, prompt: str, max_new_tokens: int, seed: int | None = None) -> str:
        """A continuation of `prompt` (every rank samples alike, so FSDP's collectives line up)."""
        from gptwo.generate import complete

        model = unwrap(self.model)
        model.eval()
        with torch.compiler.set_stance("force_eager"), torch.no_grad():
            text = complete(
                model,
                self.data.tokenizer,
                [prompt],
                max_new_tokens,
                temperature=0.8,
                top_k=50,
                seed=self.config.seed if seed is None else seed,
            )[0]
        model.train()
        return text

    def save(self) -> None:
        trainer = {"config": self.config.to_dict(), "data": self.data.identity}
        ckpt.save_checkpoint(
            self.out_dir,
            self.step,
            self.model,
            self.optimizer,
            self.data.tokenizer,
            trainer,
            self.info,
            self.data.train.state_dict(),
            self.config.keep_checkpoints,
            chat_template=self.data.meta.get("chat_template"),
        )


# ---------------------------------------------------------------- helpers
class TrainingStopped(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM, after saving a checkpoint; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM while training: the step under way finishes, a checkpoint is saved, the run
    stops. A second Ctrl-C stops at once. Alone, the signal is seen after the step; under torchrun the ranks
    agree at the next log step (a max over ranks), so all save the same step together. Handlers are installed
    only in the main thread (Python's rule) and the earlier ones are restored by `close`."""

    def __init__(self, info: Dist, device: torch.device):
        self.info, self.device, self.signum, self.noted = info, device, 0, False
        self.previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without the checkpoint
        self.signum = signum

    def agreed(self, at_sync_point: bool) -> int:
        """The signal to stop on now (0: none): this process's, or alone any rank's at a sync point."""
        signum = self.signum
        if self.info.enabled:
            if not at_sync_point:
                return 0
            box = torch.tensor([signum], dtype=torch.int64, device=self.device)
            torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
            signum = int(box.item())
        if signum and not self.noted and self.info.is_main:
            self.noted = True
            print(f"{signal.Signals(signum).name}: saving a checkpoint, then stopping", file=sys.stderr)
        return signum

    def close(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


class _TimeBudget:
    """Fits max_steps into max_time, measuring steps/s as the run goes.

    The first steps run slower (compilation, caches, the compiler's worker processes winding down),
    so the first cut is made when warm-up ends (after at least 20 steps), from the rate over warm-up's
    second half: only warm-up's learning rate is independent of max_steps. After it, every
    RECHECK_STEPS steps the rate since the last check is measured again (evaluations and checkpoints
    left out, and the longest of them kept for the final one: `pause`), and a machine that slowed
    down (other work, throttling) cuts the steps again, so the run still ends in time. Steps are never
    added back: a longer schedule would raise the learning rate again. Measurements fall on step
    counts, so every rank makes them together.
    """

    RESERVE = 0.9  # of the time left, for evaluations, checkpoints and a machine that slows down
    RECHECK_STEPS = 50

    def __init__(self, config: TrainConfig, step: int, start: float):
        self.max_time, self.start = config.max_time, start
        self.at = max(config.warmup_steps, step + 20)
        self.mid = (step + self.at) // 2
        self.since: tuple[int, float] | None = None
        self.rate = 0.0
        self.cuts = 0  # measurements made (the first cut and the re-plans)
        self.longest_pause = 0.0  # the longest evaluation + checkpoint so far: the last one needs as long

    def due(self, step: int) -> bool:
        """Whether to measure now: at the end of warm-up, then every RECHECK_STEPS steps."""
        if step == self.mid:
            self.since = (step, time.perf_counter())
        if not self.cuts:
            return step >= self.at
        return step - self.since[0] >= self.RECHECK_STEPS

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation, a checkpoint) out of the rate: they do not recur every step, and
        RESERVE keeps time for the ones still to come."""
        self.longest_pause = max(self.longest_pause, seconds)
        if self.since is not None:
            self.since = (self.since[0], self.since[1] + seconds)

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` that happen once (a step compiled again for a new thread count) out of the rate."""
        if self.since is not None:
            self.since = (self.since[0], self.since[1] + seconds)

    def steps_that_fit(self, step: int, max_steps: int) -> int:
        """The steps that end the run within max_time at the rate measured since the last measurement."""
        now = time.perf_counter()
        self.rate = (step - self.since[0]) / max(now - self.since[1], 1e-9)
        self.since, self.cuts = (step, now), self.cuts + 1
        left = self.max_time - (now - self.start) - self.longest_pause
        return max(step, min(max_steps, step + int(self.RESERVE * left * self.rate)))


def open_data(data_dir: str, config: TrainConfig, info: Dist) -> Data:
    """Loaders and tokenizer of a prepared data folder, with the checks a run needs before it starts."""
    from gptwo.data.loader import ShardLoader, read_meta

    meta = read_meta(data_dir)
    if not meta.get("train_tokens"):
        raise GptwoError(
            f"the data in {data_dir} has no training tokens (empty corpus)",
            "prepare it from non-empty text with 'gptwo prepare'",
        )
    if meta["train_tokens"] <= config.block_size:
        raise GptwoError(
            f"the data in {data_dir} has {meta['train_tokens']} training tokens, "
            f"fewer than one block of {config.block_size + 1}",
            "use more text or a smaller block_size",
        )
    loader = ShardLoader(
        data_dir,
        split="train",
        batch_size=config.batch_size,
        block_size=config.block_size,
        rank=info.rank,
        world_size=info.world_size,
        seed=config.seed,
    )
    if config.sampling == "random":
        from gptwo.train.sampling import RandomWindows

        loader = RandomWindows(loader)
    val = None
    need = config.batch_size * config.block_size * info.world_size + 1  # one batch per rank
    if meta.get("val_tokens", 0) >= need:
        val = ShardLoader(
            data_dir,
            split="val",
            batch_size=config.batch_size,
            block_size=config.block_size,
            rank=info.rank,
            world_size=info.world_size,
            seed=config.seed,
        )
    elif info.is_main:
        print(
            f"warning: the validation split of {data_dir} has {meta.get('val_tokens', 0)} tokens, "
            f"fewer than one batch per process (batch_size*block_size*processes+1 = {need}); "
            "training runs without validation loss — prepare with a larger --val-fraction, "
            "or lower batch_size or block_size",
            file=sys.stderr,
        )
    tokenizer = Tokenizer.from_file(os.path.join(data_dir, "tokenizer.json"))
    if tokenizer.n_vocab != loader.n_vocab:
        raise GptwoError(
            f"{data_dir}/meta.json says n_vocab={loader.n_vocab} but its tokenizer.json has {tokenizer.n_vocab} tokens",
            "re-create the data with 'gptwo prepare'",
        )
    if tokenizer.identity != loader.tokenizer_identity:
        raise GptwoError(
            f"{data_dir}/tokenizer.json ('{tokenizer.identity}') is not the tokenizer its shards were made with "
            f"('{loader.tokenizer_identity}')",
            "re-create the data with 'gptwo prepare'",
        )
    return Data(loader, val, tokenizer, meta)


def bits_per_byte(loss_nats: float, meta: dict) -> float | None:
    """Loss per token in nats → bits per byte of text, using the validation split's bytes per token (with a
    loss mask: per byte of the counted text, from the counted tokens and their bytes)."""
    if meta.get("loss_mask"):
        val = meta["splits"].get("val", {})
        tokens, nbytes = val.get("counted_tokens"), val.get("counted_bytes")
    else:
        tokens, nbytes = meta.get("val_tokens"), meta.get("val_bytes")
    if not tokens or not nbytes:
        return None
    return loss_nats / math.log(2) * tokens / nbytes


def training_bytes(shape: GPTConfig, batch_size: int, block_size: int, bytes_per_param: int = 16) -> int:
    """A lower estimate of a training step's memory in float32: weights, gradients and AdamW's two moments
    (16 bytes a parameter; a frozen LoRA base only its weights), plus the activations kept for the backward
    pass: per token and layer at least the attention's q, k, v and output and the MLP's 4-wide hidden layer
    before and after GELU (12 x n_embd values), and the logits (with their softmax and gradient, 3 x vocabulary)."""
    tokens = batch_size * block_size
    activations = tokens * (shape.n_layer * 12 * shape.n_embd + 3 * shape.vocab_size)
    return bytes_per_param * param_count(shape) + 4 * activations


def grad_accum_for(config: TrainConfig, world_size: int) -> int:
    """Micro-batches per step and rank: grad_accum, or batch_tokens / (batch_size · block_size · world_size)."""
    if not config.batch_tokens:
        return config.grad_accum
    per_micro = config.batch_size * config.block_size * world_size
    if config.batch_tokens % per_micro:
        raise GptwoError(
            f"batch_tokens={config.batch_tokens} is not a multiple of batch_size·block_size·world_size = {per_micro}",
            "change batch_size or batch_tokens, or set grad_accum=N (which turns batch_tokens off)",
        )
    return config.batch_tokens // per_micro


def set_threads(config: TrainConfig, info: Dist, device: torch.device) -> None:
    """On CPU, one torch thread per core this process may run on, split between this machine's processes.

    Deterministic: the same command on the same machine always picks the same count (`threads=N` decides
    instead). The cores are those the process is allowed to use (its CPU affinity, e.g. under `taskset`
    or a container's cpuset), else all the machine's cores.
    """
    if device.type != "cpu":
        return
    torch.set_num_threads(config.threads or max(1, cpu_cores() // info.local_world_size))


def cpu_cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS has one, else os.cpu_count()."""
    return len(cpu_list())


def cpu_list() -> list[int]:
    """The indices of the cores this process may run on (its CPU affinity, else all the machine's)."""
    try:
        return sorted(os.sched_getaffinity(0)) or [0]
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _known_tokenizer(spec: str) -> str | None:
    """The tokenizer identity of a pretrained model without loading it: its folder's, or GPT-2's for the OpenAI ids."""
    from gptwo.config import MODEL_PRESETS
    from gptwo.tokenizer import load_tokenizer

    if os.path.isdir(spec):
        return load_tokenizer(spec).identity
    return "gpt2" if spec.split("/")[-1] in MODEL_PRESETS else None


def _check_tokenizer(spec: str, identity: str | None, data: Data) -> None:
    if identity is not None and identity != data.train.tokenizer_identity:
        raise GptwoError(
            f"the data was tokenized with '{data.train.tokenizer_identity}' but {spec} uses '{identity}'",
            "prepare the data with the model's tokenizer: "
            f"gptwo prepare ... --tokenizer {'gpt2' if identity == 'gpt2' else spec}",
        )


def _set_dropout(model: GPT, p: float) -> None:
    """Use dropout `p` in a loaded model (saved configs do not carry the training dropout)."""
    model.config.dropout = p
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        elif hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = p


def _eager(compiled: bool):
    """Run a compiled model eagerly (evaluation: a second, eval-mode compilation would cost more than it saves)."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


def _progress_bar(start: int, total: int, enabled: bool):
    from gptwo.progress import progress_bar

    return progress_bar("train", total=total, initial=start, unit="step", enabled=enabled)
