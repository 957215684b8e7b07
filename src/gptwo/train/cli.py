"""`gptwo train` and `gptwo quickstart`."""

from __future__ import annotations

import argparse
import sys
import textwrap

from gptwo.argtypes import command, int_at_least


def _cmd_train_train(args: argparse.Namespace) -> int:
    from gptwo.train.loop import run_training

    summary = run_training(
        args.data,
        args.out,
        preset=args.preset,
        config_file=args.config,
        overrides=args.overrides,
        max_steps=args.max_steps,
        resume=args.resume,
        init_from=args.init_from,
        overwrite=args.overwrite,
        require_run=args.resume,
    )
    if summary["rank"]:
        return 0  # under torchrun only rank 0 reports
    val = f", val loss {summary['val_loss']:.4f}" if "val_loss" in summary else ""
    bpb = f" ({summary['val_bpb']:.3f} bits/byte)" if "val_bpb" in summary else ""
    print(
        f'trained to step {summary["step"]}{val}{bpb} -> {args.out} (try: gptwo generate --model {args.out} "...")',
        file=sys.stderr,
    )
    return 0


def _cmd_train_quickstart(args: argparse.Namespace) -> int:
    from gptwo.train.quickstart import quickstart

    quickstart(args.out, tiny=args.tiny)
    return 0


def add_commands(sub) -> None:
    """`gptwo train`, `gptwo quickstart` (training issue)."""
    from gptwo.config import TRAIN_PRESETS, TrainConfig, train_fields

    defaults = TrainConfig()
    keys = "\n".join(f"  {name}={getattr(defaults, name)!r} ({kind.__name__})" for name, kind in train_fields().items())
    presets = "\n".join(
        textwrap.fill(
            " ".join(f"{key}={value!r}" for key, value in values.items()),
            100,
            initial_indent=f"  {name}: ",
            subsequent_indent="    ",
        )
        for name, values in TRAIN_PRESETS.items()
    )
    epilog = (
        "config keys (key=value overrides), with the built-in defaults: what a run without --preset or --config "
        f"uses\n{keys}\n\n"
        f"presets (--preset NAME sets these keys; the others keep the defaults above):\n{presets}\n\n"
        "global batch (tokens/step) = batch_size * block_size * grad_accum * world_size;\n"
        "with batch_tokens > 0, grad_accum is derived from it. Under torchrun the same command trains with DDP\n"
        "(or parallel=fsdp). See docs/training.md."
    )
    p = command(
        sub,
        "train",
        _cmd_train_train,
        "Train a GPT-2 on prepared data (from scratch, resumed, or fine-tuned).",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override a config field, e.g. lr=3e-4 n_layer=6 (keys listed below)",
    )
    p.add_argument(
        "--data", required=True, help="folder written by 'gptwo prepare' (shards, tokenizer.json, meta.json)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="run folder: checkpoints, metrics.jsonl, loss.png and the latest model; new, empty, or an earlier run's "
        "(locked while training)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="train into an existing --out that is not a run folder (its config.json, model.safetensors and "
        "tokenizer.json are replaced)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--preset",
        choices=list(TRAIN_PRESETS),
        help="cpu (a small model for a CPU) or a GPT-2 size with the GPT-3 paper's recipe; each one's values are "
        "listed below",
    )
    group.add_argument("--config", help="JSON or TOML file of config fields (may name a 'preset')")
    p.add_argument(
        "--max-steps", type=int_at_least(1), default=None, help="number of optimizer steps (same as max_steps=N)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint, exactly (before the first checkpoint: from step "
        "0 with the config it saved, train_config.json); key=value overrides apply on top; an error if --out holds "
        "neither. Ctrl-C or SIGTERM during training saves a checkpoint first",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from pretrained weights: gpt2, a model/run folder, or a hub id (fine-tuning)",
    )

    p = command(
        sub,
        "quickstart",
        _cmd_train_quickstart,
        "Train a small GPT-2 on the built-in corpus on CPU in minutes, no download needed.",
    )
    p.add_argument(
        "--out", default="runs/quickstart", help="run folder (default runs/quickstart); rerunning continues it"
    )
    p.add_argument(
        "--tiny", action="store_true", help="a seconds-long smoke run of the same pipeline (tiny tokenizer and model)"
    )
