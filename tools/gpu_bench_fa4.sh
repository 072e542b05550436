#!/usr/bin/env bash
# Issue 8's FlashAttention-4 check, in two device calls on one warm machine (wheels: tools/fa4_wheels.sh,
# run here first; each call's carry is limited to 64 MiB, so the wheels travel in two halves):
#   run(command="bash tools/gpu_bench_fa4.sh reference", carry=[".whl/a"], timeout_s=190)
#   run(command="bash tools/gpu_bench_fa4.sh fa4", carry=[".whl/b"], timeout_s=470)   # at once, while warm
# reference: batch 256 as tools/gpu_bench.sh's main line runs it (cuDNN attention), on this machine;
# fa4: FlashAttention-4 in every block at batch 256 (equivalence check and kernel profile) and 512.
# Together with the machine's start they fit one session's 15 device minutes. Each run's full log goes to
# $OUT (the device tool brings it back); the last lines sum them up.
set -uo pipefail
source "$(dirname "$0")/bench_lib.sh"
common+=(--baseline none)
case "${1:-}" in
  reference)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    ls -l .whl/a
    bench 160 reference --batch 256 "${common[@]}" --profile 45
    names=(reference) ;;
  fa4)
    big=$(cd .whl/b && ls *.part-ab) || { echo "no .whl/b: run tools/fa4_wheels.sh here first"; exit 2; }
    [ -f ".whl/a/${big%-ab}-aa" ] || { echo "no .whl/a on this machine: the reference call must come first"; exit 2; }
    cat ".whl/a/${big%-ab}-aa" ".whl/b/$big" > "/tmp/${big%.part-ab}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/b/*.whl "/tmp/${big%.part-ab}" || exit 2
    export PYTHONPATH="$PYTHONPATH:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages"  # the wheel's .pth
    python3 -c "import flash_attn.cute.interface as i; print('flash-attn-4 at', i.__file__)" || exit 2
    bench 260 fa4 --batch 256 "${common[@]}" --attention fa4 --profile 45
    bench 170 fa4_b512 --batch 512 "${common[@]}" --attention fa4
    names=(fa4 fa4_b512) ;;
  *) echo "usage: $0 reference|fa4"; exit 2 ;;
esac
summary "${names[@]}"
