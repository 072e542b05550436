#!/usr/bin/env bash
# Issue 8's device check, in one prepared run on the GPU machine (it has torch and timm; the bench needs
# nothing else). From the repository root, after building the 224-px shards here (tools/bench_shards.yaml)
# and checking, before the machine starts, that outputs/bench/crop/shards/crops-*.tar exist and that
# `du -sh outputs/bench/crop` is under the tool's 64 MiB carry:
#   run(command="bash tools/gpu_bench.sh", carry=["outputs/bench/crop"], timeout_s=560, kind="nvidia-h200")
# on an H200, as every figure in the README, so that they compare. An H100 runs it too (label its figures so):
# the bench's eager fp32 reference keeps no activations and its FLOP count takes 32 images, so b512 needs
# the fast path's ~46 GiB, not the ~82 GiB of a full fp32 step at 512.
# Runs of the paper's ViT-B/16 step, each compiling on a cold cache (a cold batch-512 compile ran past
# 100 s on 2026-12-04), the most important first, so that a run cut short still reports them:
#   main     batch 256 with the equivalence check, our eager fp32 baseline, a kernel profile and the data
#            loader on real JPEG shards;
#   b512     batch 512;
#   control  batch 256 with the teacher's residual stream in fp32 (plain autocast), the step before it.
# Each run's full log goes to $OUT (the device tool brings it back); the last lines sum them up.
set -uo pipefail
source "$(dirname "$0")/bench_lib.sh"
# Without the shards the main run stops at its usage check, and b512 and control would spend the device time
shards=outputs/bench/crop/shards
if ! ls "$shards"/crops-*.tar >/dev/null 2>&1; then
  echo "gpu_bench.sh: no $shards/crops-*.tar: build them first (tools/bench_shards.yaml), carry outputs/bench/crop" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
bench 200 main --batch 256 "${common[@]}" --baseline fp32 --profile 45 \
  --shards "$shards" --workers 14 --loader-batches 80
bench 170 b512 --batch 512 "${common[@]}" --baseline none
bench 150 control --batch 256 "${common[@]}" --baseline none --teacher-residual fp32
summary main b512 control
