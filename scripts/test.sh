#!/usr/bin/env bash
# Sets up, builds everything (CUDA compiled where nvcc exists; its tests skip without a GPU) and
# runs every test: the C++ suite through ctest, then the Python package's pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
jobs="$(nproc)"
cmake -S . -B build/test -G Ninja -DCMAKE_BUILD_TYPE=Release -DTQATTN_TESTS=ON -DTQATTN_BENCH=ON
cmake --build build/test -j"$jobs"
ctest --test-dir build/test --output-on-failure -j"$jobs"
build/test/tqattn codebook --dim 128 --bits 3
build/test/tqattn demo --quick --repeats 1 --context 512 --chunk 64
python3 -m pip install -q --disable-pip-version-check --no-build-isolation \
  --config-settings=build-dir=build/python .
python3 -m pytest -q tests/python
