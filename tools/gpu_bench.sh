#!/usr/bin/env bash
# Issue 8's device check, in one prepared run on the GPU machine (it has torch, timm and Triton; the bench
# needs nothing else). From the repository root, after building the 224-px shards here
# (tools/bench_shards.yaml):
#   run(command="bash tools/gpu_bench.sh", carry=["outputs/bench/crop"], timeout_s=570)
# First the fused teacher MLP's kernels at the paper's shapes (tools/gpu_fused_check.py); then the paper's
# ViT-B/16 step, compiled, bf16, recorded as one CUDA graph: batch 256 with the equivalence check, our
# eager fp32 baseline, a kernel profile and the data loader on real JPEG shards; batch 512; batch 256
# without the fused MLP (what the fusion buys); batch 512 with inductor's kernel tuning, in what time is
# left. Each run's full log goes to $OUT (the device tool brings it back); the last lines sum them up.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', \
triton.__version__, torch.cuda.get_device_name())"
timeout 100 python3 tools/gpu_fused_check.py 2>&1 | tee "$OUT/fused_check.log"
bench() {
  local limit=$1 name=$2; shift 2
  echo "+ mcf bench pretrain $*" | tee "$OUT/$name.log"
  timeout "$limit" python3 -m mcf.cli bench pretrain --model base --device cuda --precision bf16 --compile \
    "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}
bench 170 graph --batch 256 --cuda-graph --baseline fp32 --steps 20 --warmup 3 --profile 40 \
  --shards outputs/bench/crop/shards --workers 14 --loader-batches 80
bench 110 graph512 --batch 512 --cuda-graph --baseline none --steps 10 --warmup 3
bench 100 unfused --batch 256 --cuda-graph --no-fused-mlp --baseline none --steps 20 --warmup 3
bench "${TUNE_LIMIT:-120}" tuned512 --batch 512 --cuda-graph --tune-kernels --baseline none --steps 10 --warmup 3
echo "== summary"
grep -h -E "^fc|^fused|^cuBLAS|^compiled|^\+ |equivalence check|GFLOP per image|images/s|speed-up|^exit" \
  "$OUT"/fused_check.log "$OUT"/graph.log "$OUT"/graph512.log "$OUT"/unfused.log "$OUT"/tuned512.log \
  | sed -E 's/^[0-9-]+ [0-9:,]+ INFO mcf.train.bench: //'
