#!/usr/bin/env bash
# One call on a CUDA machine (issue 11): the train bench for GPT-2 124M and 1.5B, the decode bench,
# and the test suite's GPU-marked tests, in under 8 minutes. Prints every table and writes
# bench/results/gpu/*.json.
#
#   bash bench/gpu.sh            # on a CUDA machine
#   bash bench/gpu.sh --dry-run  # the same steps at tiny shapes on CPU (tested without a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
OUT=${GPTWO_BENCH_OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
if (( DRY_RUN )); then
    DEVICE=cpu
else
    DEVICE=cuda
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device (use --dry-run on CPU)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"

run() {  # run NAME ARGS...: print the table, keep the JSON
    local name=$1; shift
    echo "== $name: $*"
    "$PY" -m gptwo.cli "$@" --json > "$OUT/$name.json"
    "$PY" - "$OUT/$name.json" "${@:1:2}" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
if sys.argv[2:4] == ["bench", "train"]:
    from gptwo.bench.train import render_train
    print(render_train(report))
else:
    print(json.dumps(report, indent=1))
PY
}

# ---------------------------------------------------------------- train (bf16 autocast, compiled, fused AdamW, SDPA flash attention)
# gptwo vs transformers, both compiled, in one process; 124M at batch 32 x 1024, 1.5B at batch 4 x 1024.
if (( DRY_RUN )); then
    TINY=(--n-layer 2 --n-head 2 --n-embd 64 --vocab-size 512 --block-size 64 --steps 2 --rounds 1 --warmup 1 --dtype bfloat16 --compile true)
    run train-gpt2 bench train --preset gpt2 --device "$DEVICE" --batch-size 2 "${TINY[@]}"
    run train-gpt2-xl bench train --preset gpt2-xl --device "$DEVICE" --batch-size 1 "${TINY[@]}"
else
    run train-gpt2 bench train --preset gpt2 --device "$DEVICE" --batch-size 32 --steps 20 --rounds 3 --warmup 3
    run train-gpt2-xl bench train --preset gpt2-xl --device "$DEVICE" --batch-size 4 --steps 8 --rounds 2 --warmup 3
fi

# ---------------------------------------------------------------- GPU-marked tests (skipped, and so not run, by --dry-run)
if (( ! DRY_RUN )); then
    echo "== pytest -m gpu"
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
fi
