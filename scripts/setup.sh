#!/usr/bin/env bash
# Installs what tqattn builds and tests with, from Debian's packages and PyPI only.
set -euo pipefail
# A bare Debian python3 is marked externally managed; install beside it all the same.
export PIP_BREAK_SYSTEM_PACKAGES=1
APT_PACKAGES=(build-essential cmake ninja-build pkg-config libgtest-dev libbenchmark-dev
              libhwy-dev libopenblas-dev python3-dev python3-pip)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
if [ "${TQATTN_SKIP_PIP:-0}" != 1 ]; then
  python3 -m pip install -q --disable-pip-version-check -r python/requirements-dev.txt
  # mlx-vlm's TurboQuant module needs only mlx and numpy: skip its model stack.
  python3 -m pip install -q --disable-pip-version-check --no-deps mlx-vlm==0.7.10
fi
