#!/usr/bin/env bash
# FlashAttention-4 for the GPU machine, which has no network: its wheels (CPython 3.12, x86-64, CUDA 13),
# fetched here and split into two halves that each fit one device call's 64 MiB carry:
#   .whl/a  the first half of nvidia-cutlass-dsl-libs-cu13 (its 92 MB wheel alone is over the limit);
#   .whl/b  the second half and the other wheels.
# The device machine has torch, einops and cuda-bindings already. Run from the repository root;
# tools/gpu_bench_fa4.sh puts the halves together there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl/all .whl/a .whl/b
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl/all \
  flash-attn-4==4.0.0b40 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 \
  nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
  nvidia-cutlass-dsl-libs-cu13==4.8.1
big=$(cd .whl/all && ls nvidia_cutlass_dsl_libs_cu13-*.whl)
split -b 48M ".whl/all/$big" ".whl/a/$big.part-"
mv .whl/a/"$big".part-ab .whl/b/
mv .whl/all/*.whl .whl/b/ && rm .whl/b/"$big" && rmdir .whl/all
du -sh .whl/a .whl/b
