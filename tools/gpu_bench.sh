#!/usr/bin/env bash
# Issue 8's device check, in one prepared run on the GPU machine (it has torch and timm; the bench needs
# nothing else). From the repository root, after building the 224-px shards here (tools/bench_shards.yaml):
#   run(command="bash tools/gpu_bench.sh", carry=["outputs/bench/crop"], timeout_s=440)
# Three runs of the paper's ViT-B/16 step, each compiling once (about 50 s on the H200's 16 cores):
# batch 256 with the equivalence check, our eager fp32 baseline, a kernel profile and the data loader on
# real JPEG shards; batch 512; batch 256 with FlashAttention instead of torch's choice (cuDNN on Hopper).
# Each run's full log goes to $OUT (the device tool brings it back); the last lines sum them up.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
bench() {
  local limit=$1 name=$2; shift 2
  echo "+ mcf bench pretrain $*" | tee "$OUT/$name.log"
  timeout "$limit" python3 -m mcf.cli bench pretrain --model base --device cuda "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}
bench 180 compiled --batch 256 --precision bf16 --compile --baseline fp32 --steps 20 --warmup 3 --profile 60 \
  --shards outputs/bench/crop/shards --workers 14 --loader-batches 80
bench 120 compiled512 --batch 512 --precision bf16 --compile --baseline none --steps 10 --warmup 3
bench 120 flash --batch 256 --precision bf16 --compile --baseline none --steps 20 --warmup 3 --attention flash
echo "== summary"
grep -h -E "^\+ |device:|equivalence check|GFLOP per image|images/s|speed-up|^exit" "$OUT"/compiled.log "$OUT"/compiled512.log \
  "$OUT"/flash.log | sed -E 's/^[0-9-]+ [0-9:,]+ INFO mcf.train.bench: //'
