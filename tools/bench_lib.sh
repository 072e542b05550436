# Sourced by tools/gpu_bench.sh and by one-off device commands (`source tools/bench_lib.sh; bench 300 NAME ARGS...`):
# the environment, one bench run with its log in $OUT, the summary.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
common=(--precision bf16 --compile --steps 15 --warmup 3)

# bench LIMIT NAME ARGS...: `mcf bench pretrain` of the paper's model on CUDA, cut at LIMIT seconds
bench() {
  local limit=$1 name=$2; shift 2
  local args=(--model base --device cuda "$@")
  echo "+ mcf bench pretrain ${args[*]}" | tee "$OUT/$name.log"
  timeout "$limit" python3 -m mcf.cli bench pretrain "${args[@]}" 2>&1 | tee -a "$OUT/$name.log"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}

# summary NAME...: the figures of each run that has a log
summary() {
  echo "== summary"
  local name
  for name in "$@"; do
    [ -f "$OUT/$name.log" ] || continue
    grep -h -a -E "^\+ |device:|equivalence check|GFLOP per image|images/s|speed-up|^exit" \
      "$OUT/$name.log" | sed -E 's/^[0-9-]+ [0-9:,]+ INFO mcf.train.bench: //'
  done
}
