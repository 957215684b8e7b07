#!/usr/bin/env bash
# Set up gptwo on a fresh machine, then run the main job or the tests.
#
#   bash scripts/setup.sh quickstart   # install, then `gptwo quickstart` (train a small GPT-2 offline, sample)
#   bash scripts/setup.sh test         # install with test dependencies, then the whole test suite
#   bash scripts/setup.sh              # install only
#
# Uses the active virtual environment if there is one, else creates ./.venv. Installs PyTorch only
# where none is present (torch==2.13.0; set TORCH_INDEX_URL, e.g. https://download.pytorch.org/whl/cpu,
# to choose the build), so a CUDA torch you already have is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-install}"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

if ! python -c "import torch" 2>/dev/null; then
  echo "setup: installing PyTorch (CPU build where available)" >&2
  pip_install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

case "$job" in
  test)
    echo "setup: installing gptwo with all extras and test dependencies" >&2
    pip_install -e ".[all,dev]"
    # Debian packages some tests use (each skips without its own): chromium for the playground browser test;
    # an aarch64 cross compiler and qemu-user for the native kernels' C test on ARM (NEON)
    debs=""
    command -v chromium >/dev/null 2>&1 || debs="$debs chromium chromium-driver"
    command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1 || debs="$debs gcc-aarch64-linux-gnu qemu-user"
    if [ -n "$debs" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      echo "setup: installing Debian's$debs for the browser and ARM kernel tests" >&2
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $debs) >/dev/null || echo "setup: could not install$debs; those tests will skip" >&2
    fi
    echo "setup: lint (ruff check, ruff format --check), then the tests" >&2
    python -m ruff check .
    python -m ruff format --check .
    # one worker per core (at most 2 workers: the suite is sized for a 2-core machine), each file on one worker
    workers=$(python -c "import os; print(max(1, min(2, len(os.sched_getaffinity(0)))))")
    if [ "$workers" -gt 1 ]; then
      exec python -m pytest -q -n "$workers" --dist loadgroup
    fi
    exec python -m pytest -q
    ;;
  quickstart)
    echo "setup: installing gptwo" >&2
    pip_install -e .
    exec gptwo quickstart
    ;;
  install)
    pip_install -e .
    ;;
  *)
    echo "error: unknown job '$job' — use quickstart, test, or nothing" >&2
    exit 2
    ;;
esac
