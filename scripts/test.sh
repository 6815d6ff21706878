#!/usr/bin/env bash
# Sets up, builds everything (CUDA compiled where nvcc exists; its tests skip without a GPU) and
# runs every test: the C++ suite through ctest, then the Python package's pytest suite.
set -euo pipefail
# A bare Debian python3 is marked externally managed; install beside it all the same.
export PIP_BREAK_SYSTEM_PACKAGES=1
cd "$(dirname "$0")/.."
bash scripts/setup.sh
jobs="$(nproc)"
cmake -S . -B build/test -G Ninja -DCMAKE_BUILD_TYPE=Release -DTQATTN_TESTS=ON -DTQATTN_BENCH=ON
cmake --build build/test -j"$jobs"
ctest --test-dir build/test --output-on-failure -j"$jobs"
build/test/tqattn codebook --dim 128 --bits 3
build/test/tqattn demo --quick --repeats 1 --context 512 --chunk 64
# The extension gets CUDA only where a GPU can run it (the C++ build above already compiled every
# CUDA file once).
py_cuda=OFF
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then py_cuda=ON; fi
python3 -m pip install -q --disable-pip-version-check --no-build-isolation \
  --config-settings=build-dir=build/python --config-settings=cmake.define.TQATTN_CUDA=$py_cuda .
python3 -m pytest -q tests/python
