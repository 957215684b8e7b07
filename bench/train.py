"""Training speed: gptwo's GPT vs transformers' GPT2LMHeadModel of the same shape, same batch, same AdamW.

CPU (default): the `cpu` preset's shape. With a GPU: GPT-2 124M at batch 32 x 1024 in bf16 autocast,
both models compiled, reporting tokens/s and MFU (6N + 12·L·H·Q·T FLOPs per token, PaLM appendix B).
Prints a table and writes bench/results/train.json. Ratios are vs transformers measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from gptwo import GPT, GPTConfig
from gptwo.config import TRAIN_PRESETS, TrainConfig
from gptwo.train.optim import flops_per_token, make_optimizer, peak_flops


def hf_model(config: GPTConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
                    n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                    bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1)
    model = GPT2LMHeadModel(hf)
    model.config._attn_implementation = "sdpa"
    return model


def measure(name: str, model: torch.nn.Module, logits_of, batch: int, block: int, vocab: int, device: torch.device,
            steps: int, warmup: int, use_bf16: bool, compile_model: bool) -> dict:
    """Tokens/s of full training steps (forward, backward, AdamW) on random tokens."""
    model.to(device).train()
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4), fused=device.type == "cuda")
    step_model = torch.compile(model) if compile_model else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, block + 1), generator=generator).to(device)

    def step():
        with autocast:
            logits = logits_of(step_model, x[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, vocab), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    return {"model": name, "tokens_per_s": batch * block * steps / seconds, "s_per_step": seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 10 on CPU, 20 on GPU)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds per model; the best counts (default 2)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--out", default="bench/results/train.json", help="JSON output path")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        config, batch, use_bf16, compile_model, warmup = GPTConfig.from_preset("gpt2"), 32, True, True, 5
        steps = args.steps or 20
    else:
        preset = TRAIN_PRESETS["cpu"]
        config = GPTConfig(vocab_size=4096, block_size=preset["block_size"], n_layer=preset["n_layer"], n_head=preset["n_head"], n_embd=preset["n_embd"])
        batch, use_bf16, compile_model, warmup = preset["batch_size"], False, False, 2
        steps = args.steps or 10
    block = config.block_size
    torch.manual_seed(0)
    ours = GPT(config)
    n_params = ours.num_params()
    contenders = [("gptwo GPT", ours, lambda m, idx: m(idx)), ("transformers GPT2LMHeadModel", hf_model(config), lambda m, idx: m(input_ids=idx).logits)]
    best: dict[str, dict] = {}
    for _ in range(args.rounds):  # alternate the models and keep each one's best round, so drift hits both alike
        for name, model, logits_of in contenders:
            row = measure(name, model, logits_of, batch, block, config.vocab_size, device, steps, warmup, use_bf16, compile_model)
            if name not in best or row["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = row
    rows = list(best.values())
    anchor = rows[1]["tokens_per_s"]
    peak = peak_flops(device)
    for row in rows:
        row["vs_transformers"] = row["tokens_per_s"] / anchor
        if peak:
            row["mfu"] = row["tokens_per_s"] * flops_per_token(config, n_params, block) / peak
    shape = f"{config.n_layer}L/{config.n_head}H/{config.n_embd}d vocab {config.vocab_size}, batch {batch} x {block}"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"training speed on {device_name}: {shape}, {'bf16 autocast + torch.compile' if use_bf16 else 'float32, eager'}, AdamW")
    print(f"{'model':32} {'tokens/s':>12} {'s/step':>9} {'vs HF':>7}" + (f" {'MFU':>7}" if peak else ""))
    for row in rows:
        print(f"{row['model']:32} {row['tokens_per_s']:12,.0f} {row['s_per_step']:9.3f} {row['vs_transformers']:7.2f}" + (f" {row['mfu']:7.1%}" if peak else ""))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"device": device_name, "shape": shape, "steps": steps, "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"-> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
