#!/usr/bin/env bash
# One command on a GPU machine: configure, build, run the CUDA tests, compute-sanitizer memcheck and
# racecheck on a small representative subset, then the GPU benchmark; prints a short table last.
#
#   scripts/gpu_check.sh [all|build|test|pytest|sanitize|bench|quick-bench|profile|sweep|source|ab|
#                         dims|early|probes]...
#   (default: all)
#
# `ab` (not part of all) times decode of this tree against other source trees of the library
# (AB_BASE, space-separated, default build/ab-base: e.g. `git archive HEAD | tar -x -C
# build/ab-base`, carried to the GPU machine), their graphs replayed in alternation in one
# process: for changes smaller than the noise between two runs. AB_ARGS adds arguments (e.g.
# `--head-dim 256`).
#
# `pytest` runs the Python tests that need PyTorch on a GPU (tests/python -k "cuda or torch")
# against the extension, built in its own folder ($BUILD-py) with the system g++, when nanobind
# and pytest are importable.
#
# `dims` (not part of all) benchmarks head dims 64, 96 and 256 against fp16 SDPA at the same D.
# `early` (not part of all) times decode with the stream kernel's first copies after and before
# the dependency wait (set_early_copies 0 / 1 / 2), back to back and as decode steps (append + attend)
# beside fp16's step.
# `probes` (not part of all) compiles and runs the two stand-alone probes in bench/gpu: the floor
# of a split-KV decode's copies and merge with and without programmatic dependent launch
# (pdl_probe.cu), and how many thread-block clusters of each size can be resident (cluster_query.cu).
# `sweep` (not part of all) times decode against fixed split counts, for the stream and the
# generic decode kernels; `source` (not part of all) records Nsight Compute per-instruction stall
# samples of one call (SOURCE_SHAPE=decode:2048, chunk:32768 or causal:4096; SOURCE_ARGS=--generic
# profiles the generic decode kernel instead of the default stream one; NCU_ARGS adds Nsight
# Compute options, e.g. '--cache-control none' to keep the caches warm between replays). TEST_FILTER,
# TEST_TIMEOUT and BENCH_TIMEOUT override the CUDA test filter (Cuda*) and the time limits.
# `profile` (not part of all) runs Nsight Compute on one call of each attention kernel shape and
# dumps the decode/prefill SASS for D = 128.
#
# Needs nvcc, CMake, ninja and python3 with PyTorch (the benchmark's baselines). Missing build
# dependencies are taken from a git-ignored .deps folder when present (the device machines have
# no package access): .deps/openblas/{include,lib} (cblas.h, libopenblas.so.0 and its libgfortran /
# libquadmath) and .deps/googletest (a googletest source tree, built here). Highway is off on the
# GPU machine (the CPU reference then runs its scalar twin). Logs go to $OUT (or build-gpu/out).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${BUILD:-$ROOT/build-gpu}
OUT=${OUT:-$BUILD/out}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$BUILD" "$OUT"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(all)
want() { for s in "${STEPS[@]}"; do [ "$s" = all ] || [ "$s" = "$1" ] && return 0; done; return 1; }
# Steps outside `all`.
want_only() { for s in "${STEPS[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
if [ -d "$ROOT/.deps/openblas/lib" ]; then
  export LD_LIBRARY_PATH="$ROOT/.deps/openblas/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

configure() {
  local args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DTQATTN_CUDA=ON -DTQATTN_PYTHON=OFF
              -DTQATTN_HIGHWAY=OFF -DTQATTN_BENCH=OFF -DTQATTN_TOOLS=OFF)
  if ! ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so'; then
    [ -f "$ROOT/.deps/openblas/lib/libopenblas.so.0" ] || { echo "no OpenBLAS: install it or carry .deps/openblas"; exit 1; }
    args+=(-DOpenBLAS_LIBRARIES="$ROOT/.deps/openblas/lib/libopenblas.so.0"
           -DOpenBLAS_INCLUDE_DIRS="$ROOT/.deps/openblas/include")
  fi
  if [ ! -f /usr/include/gtest/gtest.h ] && [ ! -f /usr/local/include/gtest/gtest.h ]; then
    if [ ! -f "$BUILD/gtest-install/include/gtest/gtest.h" ]; then
      [ -d "$ROOT/.deps/googletest" ] || { echo "no GoogleTest: install it or carry .deps/googletest"; exit 1; }
      cmake -S "$ROOT/.deps/googletest" -B "$BUILD/gtest-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_GMOCK=OFF -DCMAKE_INSTALL_PREFIX="$BUILD/gtest-install" > "$BUILD/gtest-build.log"
      cmake --build "$BUILD/gtest-build" -j "$JOBS" --target install >> "$BUILD/gtest-build.log"
    fi
    args+=(-DGTest_DIR="$BUILD/gtest-install/lib/cmake/GTest")
  fi
  cmake -S "$ROOT" -B "$BUILD" "${args[@]}" > "$BUILD/configure.log"
  CONFIGURE_ARGS=("${args[@]}")
}

# The benchmark's ctypes shim over the library built in $1 from the source tree $2.
build_shim() {
  local blas=(-lopenblas)
  [ -f "$ROOT/.deps/openblas/lib/libopenblas.so.0" ] && ! ldconfig -p | grep -q 'libopenblas\.so' &&
    blas=("$ROOT/.deps/openblas/lib/libopenblas.so.0" -Wl,-rpath,"$ROOT/.deps/openblas/lib")
  g++ -O2 -std=c++17 -shared -fPIC -o "$1/libtqattn_shim.so" "$2/bench/gpu/tq_shim.cpp" \
    -I"$2/include" -I"$2/src" -I"$CUDA_HOME/include" "$1/libtqattn.a" \
    -L"$CUDA_HOME/lib64" -lcudart "${blas[@]}" -lpthread
}

build() {
  configure
  cmake --build "$BUILD" -j "$JOBS" --target tqattn_tests 2>&1 | tail -3
  build_shim "$BUILD" "$ROOT"
}

profile() {
  echo "== profile"
  local o="$BUILD/CMakeFiles/tqattn.dir/src/cuda"
  cuobjdump -sass -fun '_ZN6tqattn4cuda4attn13decode_kernelILi128ELb0ELi3ELi4EEEvNS0_10AttnParamsE' \
    "$o/decode_d128.cu.o" > "$OUT/decode128.sass" || true
  cuobjdump -sass -fun '_ZN6tqattn4cuda4attn14prefill_kernelILi128ELb0ELi3ELi4ELi3EEEvNS0_10AttnParamsE' \
    "$o/prefill_d128.cu.o" > "$OUT/prefill128.sass" || true
  TQATTN_CUDA_DEBUG=1 ncu --clock-control none --target-processes all \
    -k 'regex:decode_kernel|prefill_kernel|prefill_wgmma_kernel' \
    --launch-count 8 --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters --print-details all \
    python3 "$ROOT/bench/gpu/bench_attention.py" "$BUILD/libtqattn_shim.so" --profile \
    > "$OUT/ncu.txt" 2>&1 || echo "ncu failed"
  grep -E "tqattn.cuda|Duration|Memory Throughput|Compute \(SM\) Th|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible" "$OUT/ncu.txt" | head -60
}

TEST_STATUS=skipped
SAN_STATUS=skipped
if want build || want test || want pytest || want sanitize || want bench || want quick-bench ||
  want profile || want sweep || want source || want_only ab || want_only dims ||
  want_only early; then
  echo "== build ($(nvcc --version | tail -1))"
  build
fi
if want test; then
  echo "== CUDA tests"
  set +e
  # A kernel that never finishes (a copy barrier never completing) must not eat the lease.
  timeout "${TEST_TIMEOUT:-480}" "$BUILD/tqattn_tests" --gtest_filter="${TEST_FILTER:-Cuda*}" \
    > "$OUT/cuda_tests.log" 2>&1
  rc=$?
  set -e
  grep -E '^\[cuda|^\[  (PASSED|FAILED|SKIPPED) |Failure|expected|Which is|rel_l2' "$OUT/cuda_tests.log" | grep -v '^\[cuda attention\]' | tail -40
  grep -c '^\[cuda attention\]' "$OUT/cuda_tests.log" | sed 's/^/attention cases run: /'
  TEST_STATUS=$([ $rc -eq 0 ] && echo passed || echo "FAILED (rc $rc)")
fi
PY_STATUS=skipped
if want pytest; then
  echo "== Python tests on the GPU"
  # The extension in its own build with the system compiler: a compiler without a shared
  # libstdc++ (the GPU machine's default /opt/gcc) would give it a static copy, which crashes
  # beside numpy / torch (python/CMakeLists.txt).
  PYBUILD=$BUILD-py
  if python3 -c 'import nanobind, pytest' 2>/dev/null && [ -x /usr/bin/g++ ]; then
    CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ cmake -S "$ROOT" -B "$PYBUILD" \
      "${CONFIGURE_ARGS[@]}" -DTQATTN_TESTS=OFF -DTQATTN_PYTHON=ON \
      -DPython_EXECUTABLE="$(command -v python3)" > "$PYBUILD.configure.log" 2>&1 &&
      cmake --build "$PYBUILD" -j "$JOBS" --target _tqattn 2>&1 | tail -1 || true
  fi
  if ls "$PYBUILD"/python/tqattn/_tqattn*.so > /dev/null 2>&1; then
    set +e
    PYTHONPATH="$PYBUILD/python" timeout "${TEST_TIMEOUT:-480}" python3 -m pytest -q -p no:cacheprovider \
      "$ROOT/tests/python" -k "cuda or torch" > "$OUT/pytest.log" 2>&1
    rc=$?
    set -e
    tail -5 "$OUT/pytest.log"
    PY_STATUS=$([ $rc -eq 0 ] && echo passed || echo "FAILED (rc $rc)")
  else
    echo "no Python module (needs nanobind, pytest and /usr/bin/g++)"
  fi
fi
if want sanitize; then
  echo "== compute-sanitizer"
  SAN_STATUS=clean
  for tool in memcheck racecheck; do
    set +e
    timeout "${TEST_TIMEOUT:-480}" compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 20 \
      "$BUILD/tqattn_tests" --gtest_filter='CudaSanitizerSubset.*' > "$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    set -e
    tail -4 "$OUT/sanitize_$tool.log"
    [ $rc -eq 0 ] || SAN_STATUS="$tool FAILED (rc $rc)"
  done
fi
for s in "${STEPS[@]}"; do [ "$s" = profile ] && profile; done
for s in "${STEPS[@]}"; do
  [ "$s" = source ] || continue
  # Per-instruction stall samples of one call of one shape (SOURCE_SHAPE, default decode:2048,
  # where decode's fixed cost dominates; e.g. causal:4096 for prefill).
  shape=${SOURCE_SHAPE:-decode:2048}
  tag=${shape/:/_}
  kernel=decode_kernel
  [ "${shape%%:*}" = decode ] || kernel='prefill_(wgmma_)?kernel'
  ncu --clock-control none ${NCU_ARGS:-} --target-processes all -k "regex:$kernel" --launch-skip 1 --launch-count 1 \
    --section SourceCounters --section WarpStateStats --section SpeedOfLight -f -o "$OUT/$tag" \
    python3 "$ROOT/bench/gpu/bench_attention.py" "$BUILD/libtqattn_shim.so" --profile-one "$shape" \
    ${SOURCE_ARGS:-} \
    > "$OUT/ncu_$tag.log" 2>&1 || echo "ncu failed"
  ncu -i "$OUT/$tag.ncu-rep" --page source --csv --print-source sass \
    > "$OUT/${tag}_sass.csv" 2>&1 || echo "ncu source export failed"
  ncu -i "$OUT/$tag.ncu-rep" --page details > "$OUT/${tag}_details.txt" 2>&1 || true
  wc -l "$OUT/${tag}_sass.csv"
done
for s in "${STEPS[@]}"; do
  [ "$s" = dims ] && PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-480}" python3 \
    "$ROOT/bench/gpu/bench_attention.py" "$BUILD/libtqattn_shim.so" --dims --json "$OUT/dims.json" \
    > "$OUT/dims.log" 2> "$OUT/dims.err"
  [ "$s" = dims ] && { tail -3 "$OUT/dims.err"; sed -n '/copy bandwidth .* (times in us/,$p' "$OUT/dims.log"; }
  [ "$s" = sweep ] && PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-480}" python3 \
    "$ROOT/bench/gpu/bench_attention.py" "$BUILD/libtqattn_shim.so" --sweep | tee "$OUT/sweep.log"
  if [ "$s" = probes ]; then
    echo "== probes"
    mkdir -p "$BUILD"
    for probe in pdl_probe cluster_query; do
      nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I "$ROOT/src" \
        -o "$BUILD/$probe" "$ROOT/bench/gpu/$probe.cu" &&
        timeout "${BENCH_TIMEOUT:-480}" "$BUILD/$probe" | tee "$OUT/$probe.log" ||
        echo "$probe failed"
    done
  fi
  [ "$s" = early ] && PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-480}" python3 \
    "$ROOT/bench/gpu/bench_attention.py" "$BUILD/libtqattn_shim.so" --early --json \
    "$OUT/early.json" | tee "$OUT/early.log"
done
if want_only ab; then
  # AB_BASE: one or more source trees (space-separated), built concurrently.
  bases=(${AB_BASE:-$ROOT/build/ab-base})
  echo "== decode A/B against ${bases[*]}"
  shims=()
  for base in "${bases[@]}"; do
    [ -f "$base/CMakeLists.txt" ] || { echo "no source tree at $base"; exit 1; }
    dir="$BUILD-$(basename "$base")"
    (cmake -S "$base" -B "$dir" "${CONFIGURE_ARGS[@]}" -DTQATTN_TESTS=OFF > "$dir.log" &&
       cmake --build "$dir" -j "$JOBS" --target tqattn >> "$dir.log" 2>&1 &&
       build_shim "$dir" "$base" || echo "building $base failed: see $dir.log") &
    shims+=("$(basename "$base")=$dir/libtqattn_shim.so")
  done
  wait
  PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-480}" python3 "$ROOT/bench/gpu/bench_attention.py" \
    "$BUILD/libtqattn_shim.so" --versus "${shims[@]}" ${AB_ARGS:-} --json "$OUT/ab.json" |
    tee "$OUT/ab.log"
fi
echo "tests: $TEST_STATUS; python: $PY_STATUS; sanitizers: $SAN_STATUS; commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if want bench || want quick-bench; then
  echo "== benchmark"
  quick=()
  want quick-bench && ! want bench && quick=(--quick)
  set +e
  PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-480}" python3 "$ROOT/bench/gpu/bench_attention.py" \
    "$BUILD/libtqattn_shim.so" "${quick[@]}" --json "$OUT/bench.json" > "$OUT/bench.log" \
    2> "$OUT/bench.err"
  echo "benchmark exit code $?"
  set -e
  head -1 "$OUT/bench.log"
  [ -s "$OUT/bench.err" ] && { echo "(stderr:)"; tail -3 "$OUT/bench.err"; } || true
  # The table again, last.
  sed -n '/copy bandwidth .* (times in us/,$p' "$OUT/bench.log"
fi
