#!/usr/bin/env bash
# Issue 16's GPU figures in one device call of at most ~9 minutes (run it with timeout_s 590), in priority order;
# each step has its own time limit, so a slow step still leaves the others' results:
#   1. versions and nvidia-smi                                                            -> $OUT/gpu_env.log
#   2. CUDA-graph decode token-identical to eager (tests/engine/test_cuda_graphs_gpu.py,
#      batch 1/8/64, fp32 and bf16), and the int4 in-kernel decode tests compiled for the GPU -> $OUT/graph_tests.log
#   3. decode step time, eager vs CUDA graphs, batch 1/8/64 at 4K and 32K context, with the roofline
#      and a token-identity check (benchmarks/decode_graphs.py)                -> $OUT/decode_graphs.{log,json}
#   4. the 1,048,576-token request with int4 KV (benchmarks/million.py)      -> $OUT/million_1m/million.{md,json}
#   5. bf16 and int8 KV at 262,144 tokens beside it                          -> $OUT/million_256k/million.{md,json}
#   6. int4 in-kernel decode bandwidth vs bf16 / int8 (benchmarks/int4_decode.py)    -> $OUT/int4_decode.{log,json}
#   7. attention forward / forward+backward vs SDPA cuDNN and flash, head dims 128 and 64
#      (benchmarks/attention.py, time-boxed)                                        -> $OUT/attention*/
#   8. the owed GPU tests (gpu_owed.sh's list: engine, block-sparse, int8 decode), with what time is left
#                                                                                       -> $OUT/owed_tests.log
# Usage: OUT=/some/dir bash benchmarks/gpu_issue16.sh
# CPU rehearsal of the same command lines at toy sizes (GPU tests skip; Triton under the interpreter):
#   REHEARSE=1 OUT=/tmp/o bash benchmarks/gpu_issue16.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
export LONGREACH_TRITON_AUTOTUNE="${LONGREACH_TRITON_AUTOTUNE:-0}"  # first-fit configs: no tuning time
if [ "${REHEARSE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  GRAPHS=(--rehearse)
  MILLION_1M=(--rehearse --cases int4:2048)
  MILLION_256K=(--rehearse --cases bf16:512,int8:512)
  INT4=(--rehearse)
  ATTN=(--dry-run --skip flex)
  ATTN64=(--dry-run --skip flex --head-dim 32)
else
  unset TRITON_INTERPRET
  GRAPHS=()
  MILLION_1M=(--cases int4:1048576)
  MILLION_256K=(--cases bf16:262144,int8:262144)
  INT4=()
  ATTN=(--seqlens 4096 16384 65536 --contexts 32768 --skip flex)
  ATTN64=(--seqlens 4096 16384 65536 --contexts 32768 --skip flex --head-dim 64 --heads 64)
fi
status=0
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, remember a failure
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/$name.log" "$OUT/summary.log"
  [ "$rc" -eq 0 ] || status=1
}
begin=$SECONDS
{
  date -u
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/gpu_env.log" 2>&1

step graph_tests 110 "$PY" -m pytest -q -p no:cacheprovider tests/engine/test_cuda_graphs_gpu.py tests/engine/test_cuda_graphs.py \
  tests/attention/test_triton_decode_int4.py
step decode_graphs 80 "$PY" benchmarks/decode_graphs.py "${GRAPHS[@]}" --out "$OUT"
step million_1m 200 "$PY" benchmarks/million.py "${MILLION_1M[@]}" --out "$OUT/million_1m"
step million_256k 45 "$PY" benchmarks/million.py "${MILLION_256K[@]}" --out "$OUT/million_256k"
step int4_decode 25 "$PY" benchmarks/int4_decode.py "${INT4[@]}" --out "$OUT"
step attention 40 "$PY" benchmarks/attention.py "${ATTN[@]}" --budget-s 28 --out "$OUT/attention_d128"
step attention64 35 "$PY" benchmarks/attention.py "${ATTN64[@]}" --budget-s 24 --out "$OUT/attention_d64"
left=$((530 - (SECONDS - begin)))
if [ "$left" -gt 20 ]; then
  workers=""
  "$PY" -c "import xdist" 2>/dev/null && workers="-n 8"
  # shellcheck disable=SC2086
  step owed_tests "$left" "$PY" -m pytest -q -m gpu -k "not every_autotune_config" $workers -p no:cacheprovider \
    tests/engine/test_gpu.py tests/attention/test_triton_sparse.py tests/attention/test_triton_decode.py
else
  echo "owed_tests: skipped, ${left} s left" | tee -a "$OUT/summary.log"
fi
echo "total: $((SECONDS - begin)) s" | tee -a "$OUT/summary.log"
ls -la "$OUT"
exit $status
