#!/usr/bin/env bash
# One call on a CUDA machine: `gptwo bench train` for GPT-2 124M and 1.5B, `gptwo bench decode`, and the test
# suite's GPU-marked tests, in under 8 minutes. Prints every table and writes experiments/results/gpu/*.json
# (GPTWO_BENCH_OUT=DIR: there instead).
#
#   bash experiments/gpu.sh            # on a CUDA machine
#   bash experiments/gpu.sh --dry-run  # the same steps at tiny shapes on CPU (no GPU needed; the GPU tests are left out)
#   bash experiments/gpu.sh --print    # list the commands a CUDA run would run, and run none
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
MODE=cuda
case "${1:-}" in
    "") ;;
    --dry-run) MODE=dry-run ;;
    --print) MODE=print ;;
    *) echo "error: unknown option ${1} — use no option (CUDA), --dry-run (tiny shapes on CPU) or --print" >&2; exit 2 ;;
esac
OUT=${GPTWO_BENCH_OUT:-experiments/results/gpu}
PY=${PYTHON:-python}
if [[ $MODE == cuda ]]; then
    DEVICE=cuda
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "error: experiments/gpu.sh found no CUDA device (torch.cuda.is_available() is False) —" \
            "run it on a CUDA machine; --dry-run runs the same steps at tiny shapes on CPU, --print lists them" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
elif [[ $MODE == dry-run ]]; then
    DEVICE=cpu
else
    DEVICE=cuda
fi
if [[ $MODE != print ]]; then
    mkdir -p "$OUT"
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
fi

run() {  # run NAME ARGS...: `gptwo ARGS... --json` into $OUT/NAME.json (whole or not at all), then its table
    local name=$1
    shift
    echo "== $name: gptwo $* --json > $OUT/$name.json"
    [[ $MODE == print ]] && return 0
    "$PY" -m gptwo.cli "$@" --json > "$OUT/.$name.json.part"
    mv "$OUT/.$name.json.part" "$OUT/$name.json"
    "$PY" - "$OUT/$name.json" "${@:1:2}" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
if sys.argv[2:4] == ["bench", "train"]:
    from gptwo.bench.train import render_train
    print(render_train(report))
elif sys.argv[2:4] == ["bench", "decode"]:
    from gptwo.bench.decode import render_decode
    print(render_decode(report))
else:
    print(json.dumps(report, indent=1))
PY
}

# ---------------------------------------------------------------- train (bf16 autocast, compiled, fused AdamW, SDPA flash attention)
# gptwo vs transformers, both compiled, in one process; 124M at batch 32 x 1024, 1.5B at batch 4 x 1024.
if [[ $MODE == dry-run ]]; then
    TINY=(--n-layer 2 --n-head 2 --n-embd 64 --vocab-size 512 --block-size 64 --steps 2 --rounds 1 --warmup 1
        --dtype bfloat16 --compile true)
    run train-gpt2 bench train --preset gpt2 --device "$DEVICE" --batch-size 2 "${TINY[@]}"
    run train-gpt2-xl bench train --preset gpt2-xl --device "$DEVICE" --batch-size 1 "${TINY[@]}"
else
    run train-gpt2 bench train --preset gpt2 --device "$DEVICE" --batch-size 32 --steps 20 --rounds 3 --warmup 3
    run train-gpt2-xl bench train --preset gpt2-xl --device "$DEVICE" --batch-size 4 --steps 8 --rounds 2 --warmup 3
fi

# ---------------------------------------------------------------- decode (static KV cache, torch.compile; reduce-overhead = CUDA graphs)
# gptwo's Decoder vs transformers' fp32 generate, in one process; GPT-2 124M shape, random weights, greedy.
# int8 is left out on CUDA: torch's _weight_int8pack_mm is a CPU (and MPS) kernel.
if [[ $MODE == dry-run ]]; then
    TINY_MODEL="$OUT/tiny-model"
    "$PY" -c "import sys, torch; from gptwo import GPT, GPTConfig; from gptwo.weights import save_pretrained
torch.manual_seed(0)
save_pretrained(GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64)), sys.argv[1])" "$TINY_MODEL"
    DECODE=(--model "$TINY_MODEL" --new-tokens 8 --prompt-tokens 4 --rounds 1)
    run decode-b1 bench decode --device "$DEVICE" --batch-size 1 --variants fp32,bf16,int8 --compile default "${DECODE[@]}"
    run decode-b32 bench decode --device "$DEVICE" --batch-size 32 --variants bf16 --compile default "${DECODE[@]}"
else
    run decode-b1 bench decode --device "$DEVICE" --batch-size 1 --variants fp32,bf16 --compile reduce-overhead --rounds 3
    run decode-b32 bench decode --device "$DEVICE" --batch-size 32 --variants fp32,bf16 --compile reduce-overhead --rounds 3
fi

# ---------------------------------------------------------------- GPU-marked tests (left out by --dry-run: they skip without CUDA)
if [[ $MODE != dry-run ]]; then
    echo "== pytest -m gpu -q -p no:cacheprovider tests"
    [[ $MODE == print ]] && exit 0
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
fi
