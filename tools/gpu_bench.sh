#!/usr/bin/env bash
# Issue 8's device check, in one prepared run on the GPU machine (it has torch and timm; the bench needs
# nothing else). From the repository root, after building the 224-px shards here (tools/bench_shards.yaml):
#   run(command="bash tools/gpu_bench.sh", carry=["outputs/bench/crop"], timeout_s=590)
# Prints, for the paper's ViT-B/16 step: the equivalence check, the eager bf16 fast path against our eager
# fp32 baseline and the data loader on real JPEG shards (about a minute), then the compiled fast path
# (its equivalence check and its steps are two compilations: minutes).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
bench() {
  local limit=$1; shift
  echo "+ mcf bench pretrain $*"
  timeout "$limit" python -m mcf.cli bench pretrain --model base --device cuda "$@"
  echo "exit $?"
}
bench 150 --batch 128 --precision bf16 --baseline fp32 --steps 10 --warmup 3 \
  --shards outputs/bench/crop/shards --workers 14 --loader-batches 40
bench 400 --batch 256 --precision bf16 --compile --baseline none --steps 20 --warmup 3
