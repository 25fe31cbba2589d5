#!/usr/bin/env bash
# Compiles the CUDA build of `claas` on a machine with no GPU and no driver (issue 28):
# candle's kernels with nvcc for CUDA_COMPUTE_CAP (default 90, H100/H200) and every line of
# Rust behind `--features cuda`, type-checked. The toolkit comes from PyPI, pinned, into
# target/cuda-toolkit (about 320 MB; installed once, again only when the pins change).
#
# What it does not do: link. candle 0.11 binds CUDA at link time (cudarc's
# `dynamic-linking`: libcuda, cuBLAS, cuRAND and NVRTC become load-time dependencies; see
# huggingface/candle issue 3900), PyPI has no libcuda (not even the toolkit's stub), so a
# linked binary needs the driver's library to build and to start; deploy/Dockerfile.worker
# builds it in NVIDIA's devel image.
set -euo pipefail
cd "$(dirname "$0")/.."

# cudarc 0.19.10 knows CUDA up to 13.4; PyPI's CUDA 12 wheels carry no nvcc, and its
# newest CCCL headers (which cuda_fp16.h includes) are 13.3's: the 13.3 set agrees.
PINS=(
  nvidia-cuda-nvcc==13.3.73
  nvidia-cuda-crt==13.3.73
  nvidia-nvvm==13.3.73
  nvidia-cuda-runtime==13.3.29
  nvidia-cuda-cccl==13.3.5.0.6
)
TOOLKIT=target/cuda-toolkit
if [ "$(cat "$TOOLKIT/.pins" 2>/dev/null)" != "${PINS[*]}" ]; then
  rm -rf "$TOOLKIT"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$TOOLKIT" "${PINS[@]}" >&2
  echo "${PINS[*]}" > "$TOOLKIT/.pins"
fi
export CUDA_HOME="$PWD/$TOOLKIT/nvidia/cu13"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -n 1
started=$(date +%s)
cargo check --locked --bin claas --features cuda
echo "cuda-check: claas --features cuda (compute capability $CUDA_COMPUTE_CAP) compiles; $(( $(date +%s) - started )) s"
