#!/usr/bin/env bash
# Sets up, builds the tqattn command and runs the main job. Extra arguments go to `tqattn demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
TQATTN_SKIP_PIP=1 bash scripts/setup.sh
cuda=OFF
if command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  cuda=ON
fi
cmake -S . -B build/demo -G Ninja -DCMAKE_BUILD_TYPE=Release -DTQATTN_CUDA=$cuda \
  -DTQATTN_TESTS=OFF -DTQATTN_BENCH=OFF >/dev/null
cmake --build build/demo --target tqattn_cli -j"$(nproc)"
exec build/demo/tqattn demo "$@"
