#!/usr/bin/env bash
# llama.cpp as a same-run anchor for `gptwo bench decode` (issue 11) and `gptwo bench serve` (issue 22):
# build llama-bench and llama-server (CPU, -march=native) from a llama.cpp source tree, and write GGUF files
# of the benches' models with `gptwo export gguf` (byte-identical to llama.cpp's convert_hf_to_gguf.py, tested in
# tests/export; CONVERTER=llamacpp runs llama.cpp's converter instead). Then time them:
#
#   bash experiments/llamacpp.sh SRC OUT [MODEL]
#   gptwo bench decode --threads 2 --llama-cpp SRC/build --gguf OUT
#   gptwo bench serve --threads 2 --llama-server SRC/build --gguf OUT/serve
#
#   SRC    a llama.cpp source tree; built into SRC/build (LLAMA_BUILD=DIR: use or make that build folder instead)
#   OUT    gets model-{f32,f16,bf16,q8_0}.gguf and hf/ (the decode bench's model as an HF folder), and serve/ with
#          model-{f32,bf16,q8_0}.gguf and hf/ (the serve bench's model: 6 layers, width 384, context 1024)
#   MODEL  a gptwo/HF model folder to convert for both instead (then pass --model MODEL to the benches too)
#
# `gptwo export gguf` needs pip install 'gptwo[export]'; llama.cpp's converter (CONVERTER=llamacpp) runs with
# SRC/gguf-py on PYTHONPATH and needs torch, numpy, transformers and sentencepiece (PYTHON=... picks the interpreter). JOBS=N sets the build's parallel jobs
# (default: all cores); BENCHES=serve (or decode) writes only that bench's files (default: "decode serve").
set -euo pipefail
if (( $# < 2 )); then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
SRC=$(cd "$1" && pwd)
[[ -f "$SRC/convert_hf_to_gguf.py" ]] || { echo "error: $SRC is not a llama.cpp source tree (no convert_hf_to_gguf.py) — pass llama.cpp's top folder" >&2; exit 2; }
mkdir -p "$2/serve"
OUT=$(cd "$2" && pwd)
MODEL=${3:+$(realpath -m "$3")}
BUILD=$(realpath -m "${LLAMA_BUILD:-$SRC/build}")
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [[ ! -x "$BUILD/bin/llama-bench" || ! -x "$BUILD/bin/llama-server" ]]; then
    echo "== building llama-bench and llama-server in $BUILD"
    cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF >/dev/null
    cmake --build "$BUILD" --target llama-bench llama-server -j "${JOBS:-$(nproc)}"
fi
"$BUILD/bin/llama-bench" --help >/dev/null
"$BUILD/bin/llama-server" --help >/dev/null

convert() {  # convert MODEL_DIR DEST_DIR DTYPE...
    local model=$1 dest=$2
    shift 2
    for dtype in "$@"; do
        echo "== converting $model to $dest/model-$dtype.gguf"
        if [[ "${CONVERTER:-gptwo}" == gptwo ]]; then
            "$PY" -m gptwo.cli export gguf --model "$model" --out "$dest/model-$dtype.gguf" --type "$dtype"
            continue
        fi
        if ! PYTHONPATH="$SRC/gguf-py:$PYTHONPATH" "$PY" "$SRC/convert_hf_to_gguf.py" "$model" --outtype "$dtype" \
                --outfile "$dest/.model-$dtype.gguf.part" > "$dest/convert-$dtype.log" 2>&1; then
            tail -n 5 "$dest/convert-$dtype.log" >&2
            echo "error: llama.cpp's converter failed at $dtype — its log is $dest/convert-$dtype.log" >&2
            exit 2
        fi
        mv "$dest/.model-$dtype.gguf.part" "$dest/model-$dtype.gguf"
    done
}

BENCHES=${BENCHES:-decode serve}
if [[ " $BENCHES " == *" decode "* ]]; then
    if [[ -z "$MODEL" ]]; then
        echo "== saving the decode bench's model to $OUT/hf"
        "$PY" -c "import sys; from gptwo.bench.llamacpp import save_bench_model; save_bench_model(sys.argv[1])" "$OUT/hf"
    fi
    convert "${MODEL:-$OUT/hf}" "$OUT" f32 f16 bf16 q8_0
    echo "== done: gptwo bench decode --llama-cpp $BUILD --gguf $OUT${MODEL:+ --model $MODEL}"
fi
if [[ " $BENCHES " == *" serve "* ]]; then
    if [[ -z "$MODEL" ]]; then
        echo "== saving the serve bench's model to $OUT/serve/hf"
        "$PY" -c "import sys; from gptwo.bench.serve import save_serve_model; save_serve_model(sys.argv[1])" "$OUT/serve/hf"
    fi
    convert "${MODEL:-$OUT/serve/hf}" "$OUT/serve" f32 bf16 q8_0
    echo "== done: gptwo bench serve --llama-server $BUILD --gguf $OUT/serve${MODEL:+ --model $MODEL}"
fi
