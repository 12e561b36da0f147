#!/usr/bin/env bash
# medflow installer: the one recipe used by the README (`make setup`), CI and the container images.
#   - system packages (OpenMPI, SLURM, munge, iproute2 for the multi-node test cluster, chromium for
#     headless report checks) when root;
#     when not root, missing ones are named and the install stops;
#   - a virtualenv with torch/torchvision, medflow and its dependencies;
#   - Horovod 0.28.1 built from source against that torch (PyTorch + MPI + Gloo).
# Usage: containers/install.sh [VENV_DIR]   (default: .venv)
# MEDFLOW_VENV_CACHE=dir: keep the built venv in dir/<hash of the dependency spec> and link it;
#   the cache holds the MEDFLOW_VENV_CACHE_KEEP (default 2) most recently used venvs.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$here/.venv}
py=${PYTHON:-python3}

sys_pkgs=(openmpi-bin libopenmpi-dev slurm-wlm munge iproute2 chromium fonts-dejavu-core procps)
missing=()
for p in "${sys_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[install] apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian enables the services on install; the tests start their own throw-away daemons.
    for s in munge slurmctld slurmd; do service "$s" stop >/dev/null 2>&1 || true; done
  else
    echo "[install] missing system packages (need root to install): ${missing[*]}" >&2
    echo "[install] ask your admin for: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

# The dependency spec: anything that changes what gets installed changes this hash; tool settings in
# pyproject.toml ([tool.*]: ruff, mypy, pytest) do not, so changing them does not rebuild a 6 GB venv.
spec_hash=$({
  cat "$here/containers/install.sh" "$here/containers/constraints.txt"
  awk '/^\[/ { keep = ($0 ~ /^\[(build-system|project)/) } keep' "$here/pyproject.toml"
} | sha256sum | cut -c1-16)

# The cache keeps the MEDFLOW_VENV_CACHE_KEEP (default 2) most recently used venvs, the one in use
# ($1) included, so a machine that installs many versions (a CI runner) does not fill its disk.
prune_cache() {
  local keep=${MEDFLOW_VENV_CACHE_KEEP:-2} kept=1 marker dir
  # Newest first by the marker's mtime, which every reuse touches; one path per line, so a cache
  # directory whose name has spaces is not split into other paths to remove.
  while IFS= read -r marker; do
    dir=${marker%/.medflow-complete}
    [ "$dir" = "$1" ] && continue
    if ((kept < keep)); then kept=$((kept + 1)); continue; fi
    echo "[install] removing the least recently used cached venv $dir"
    rm -rf "$dir"
  done < <(ls -1t "$MEDFLOW_VENV_CACHE"/venv-*/.medflow-complete 2>/dev/null)
  # A build killed half-way leaves a venv without the marker; one untouched for 6 hours is not in progress.
  for dir in "$MEDFLOW_VENV_CACHE"/venv-*; do
    if [ -d "$dir" ] && [ "$dir" != "$1" ] && [ ! -e "$dir/.medflow-complete" ] && [ -n "$(find "$dir" -maxdepth 0 -mmin +360)" ]; then
      echo "[install] removing an unfinished cached venv $dir"
      rm -rf "$dir"
    fi
  done
}

if [ -n "${MEDFLOW_VENV_CACHE:-}" ]; then
  target=$MEDFLOW_VENV_CACHE/venv-$spec_hash
  if [ -x "$target/bin/python" ] && [ -f "$target/.medflow-complete" ]; then
    echo "[install] reusing cached venv $target"
    ln -sfn "$target" "$venv"
    "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$here"
    touch "$target/.medflow-complete"
    prune_cache "$target"
    exit 0
  fi
  rm -rf "$target"; mkdir -p "$MEDFLOW_VENV_CACHE"
  prune_cache "$target"  # before building: room for the new one
  ln -sfn "$target" "$venv"
  venv=$target
fi

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/pip" install -q -c "$here/containers/constraints.txt")
"$venv/bin/pip" install -q -U pip
"${pip[@]}" torch torchvision
"${pip[@]}" numpy packaging wheel cffi psutil pyyaml cloudpickle setuptools
"${pip[@]}" -e "$here[dev]"

if ! "$venv/bin/python" -c 'import horovod.torch' 2>/dev/null; then
  echo "[install] building horovod 0.28.1 (a few minutes)"
  wrap=$(mktemp -d)
  # Horovod strips -std from CXXFLAGS and forces C++14; torch >= 2.15 headers need C++20.
  printf '#!/bin/sh\nexec g++ "$@" -std=c++20\n' > "$wrap/g++20"; chmod +x "$wrap/g++20"
  cuda=/usr/local/cuda; gpu_env=()
  if [ -x "$cuda/bin/nvcc" ]; then
    gpu_env=(CUDA_HOME=$cuda HOROVOD_CUDA_HOME=$cuda HOROVOD_BUILD_CUDA_CC_LIST=75,80,90 NVCC_APPEND_FLAGS=-std=c++20)
  fi
  env CXX="$wrap/g++20" HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo \
      CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS=-j"$(nproc)" "${gpu_env[@]}" \
      "$venv/bin/pip" install -q --no-cache-dir --no-build-isolation horovod==0.28.1
  rm -rf "$wrap"
fi
check=$("$venv/bin/horovodrun" --check-build)
echo "$check"
for fw in PyTorch MPI Gloo; do
  grep -q "\[X\] $fw" <<<"$check" || { echo "[install] horovod built without $fw" >&2; exit 1; }
done
touch "$venv/.medflow-complete"
echo "[install] done: $venv"
