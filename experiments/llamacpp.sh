#!/usr/bin/env bash
# llama.cpp as a same-run anchor for `gptwo bench decode` (issue 11): build llama.cpp's llama-bench
# (CPU, -march=native) from a llama.cpp source tree, and write GGUF files of the decode bench's model
# at f32, f16, bf16 and q8_0 with llama.cpp's own convert_hf_to_gguf.py. Then time them:
#
#   bash experiments/llamacpp.sh SRC OUT [MODEL]
#   gptwo bench decode --threads 2 --llama-cpp SRC/build --gguf OUT
#
#   SRC    a llama.cpp source tree; built into SRC/build (LLAMA_BUILD=DIR: use or make that build folder instead)
#   OUT    gets model-f32.gguf, model-f16.gguf, model-bf16.gguf, model-q8_0.gguf and hf/ (the model as an HF folder)
#   MODEL  a gptwo/HF model folder (default: GPT-2 124M's shape with the bench's random weights, seed 0, GPT-2's BPE)
#
# The converter runs with SRC/gguf-py on PYTHONPATH and needs torch, transformers and sentencepiece
# (pip install 'gptwo[llamacpp]'). JOBS=N sets the build's parallel jobs (default: all cores).
set -euo pipefail
if (( $# < 2 )); then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
SRC=$(cd "$1" && pwd)
[[ -f "$SRC/convert_hf_to_gguf.py" ]] || { echo "error: $SRC is not a llama.cpp source tree (no convert_hf_to_gguf.py) — pass llama.cpp's top folder" >&2; exit 2; }
mkdir -p "$2"
OUT=$(cd "$2" && pwd)
MODEL=${3:+$(realpath -m "$3")}
BUILD=$(realpath -m "${LLAMA_BUILD:-$SRC/build}")
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [[ ! -x "$BUILD/bin/llama-bench" ]]; then
    echo "== building llama-bench in $BUILD"
    cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
    cmake --build "$BUILD" --target llama-bench -j "${JOBS:-$(nproc)}"
fi
"$BUILD/bin/llama-bench" --help >/dev/null

if [[ -z "$MODEL" ]]; then
    MODEL=$OUT/hf
    echo "== saving the bench model to $MODEL"
    "$PY" -c "import sys; from gptwo.bench.llamacpp import save_bench_model; save_bench_model(sys.argv[1])" "$MODEL"
fi
for dtype in f32 f16 bf16 q8_0; do
    echo "== converting $MODEL to $OUT/model-$dtype.gguf"
    if ! PYTHONPATH="$SRC/gguf-py:$PYTHONPATH" "$PY" "$SRC/convert_hf_to_gguf.py" "$MODEL" --outtype "$dtype" --outfile "$OUT/.model-$dtype.gguf.part" \
            > "$OUT/convert-$dtype.log" 2>&1; then
        tail -n 5 "$OUT/convert-$dtype.log" >&2
        echo "error: llama.cpp's converter failed at $dtype — its log is $OUT/convert-$dtype.log" >&2
        exit 2
    fi
    mv "$OUT/.model-$dtype.gguf.part" "$OUT/model-$dtype.gguf"
done
echo "== done: gptwo bench decode --llama-cpp $BUILD --gguf $OUT"
