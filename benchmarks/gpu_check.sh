#!/usr/bin/env bash
# One GPU check for the Triton attention kernels, about 5-6 minutes on an H100/H200 (run it with timeout_s 590):
#   1. versions and nvidia-smi                       -> $OUT/gpu_env.log
#   2. the gpu-marked kernel tests, compiled (not interpreted), one fixed config per kernel,
#      spread over pytest-xdist workers so the ~150 kernel variants compile in parallel -> $OUT/gpu_tests.log
#   3. every config of the autotune lists (forward, both backward kernels, decode split-K), each pinned and
#      checked once against the fp32 reference on small shapes (~110 more kernel variants), and
#      test_triton_contract.py (padding rows, max_seqlen and offset checks through CUDA) -> $OUT/gpu_configs.log
#   4. benchmarks/attention.py (autotuned kernels vs SDPA flash/cuDNN and FlexAttention, decode GB/s)
#      -> $OUT/attention.md, $OUT/attention.json, $OUT/bench.log
#   5. batch-invariant mode: its gpu-marked engine test (BI_TEST_LIMIT=60 s), then benchmarks/batch_invariant.py on
#      CUDA, one round (BI_BENCH_LIMIT=120 s): up to 3 minutes more than the total below
#      -> $OUT/batch_invariant.log, $OUT/batch_invariant.json
# Each step has its own time limit (TEST_LIMIT=150 s, CONFIG_LIMIT=120 s, BENCH_LIMIT=200 s; the benchmark stops
# starting new measurements 40 s before its limit), so a slow step still leaves the others' logs: at most ~8 minutes.
# Usage, from anywhere: OUT=/some/dir bash benchmarks/gpu_check.sh   (OUT defaults to ./out)
# CPU rehearsal of the same command lines (GPU tests skip, the benchmark runs --dry-run under TRITON_INTERPRET=1):
#   REHEARSE=1 OUT=/tmp/o bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
TEST_LIMIT="${TEST_LIMIT:-150}"
CONFIG_LIMIT="${CONFIG_LIMIT:-120}"
BENCH_LIMIT="${BENCH_LIMIT:-200}"
BI_TEST_LIMIT="${BI_TEST_LIMIT:-60}"  # batch-invariant mode: its CUDA engine test
BI_BENCH_LIMIT="${BI_BENCH_LIMIT:-120}"  # and its cost, off vs on
BI_ARGS=(--device cuda --rounds 1 --num-requests 16)
BENCH_ARGS=()
if [ "${REHEARSE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--dry-run --seqlens 64 --contexts 100 --skip flex)
  BI_ARGS=(--device cpu --threads 1 --models demo --rounds 1 --num-requests 4 --max-tokens 4 --decode-tokens 8)
else
  unset TRITON_INTERPRET
fi

{
  date -u
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" - <<'PYEOF'
import torch, triton
print("python torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PYEOF
} 2>&1 | tee "$OUT/gpu_env.log"

workers=""
if "$PY" -c "import xdist" 2>/dev/null; then
  workers="-n 12 --dist loadgroup"
fi
start=$SECONDS
# shellcheck disable=SC2086
LONGREACH_TRITON_AUTOTUNE=0 timeout "$TEST_LIMIT" "$PY" -m pytest -q -m gpu -k "not every_autotune_config" $workers \
  -p no:cacheprovider tests/attention/test_triton_flash.py tests/attention/test_triton_decode.py \
  tests/attention/test_triton_sparse.py 2>&1 | tee "$OUT/gpu_tests.log"
test_rc=${PIPESTATUS[0]}
echo "gpu tests: rc=$test_rc in $((SECONDS - start)) s" | tee -a "$OUT/gpu_tests.log"

start=$SECONDS
# shellcheck disable=SC2086
LONGREACH_TRITON_AUTOTUNE=0 timeout "$CONFIG_LIMIT" "$PY" -m pytest -q -k "every_autotune_config or test_triton_contract" \
  $workers -p no:cacheprovider tests/attention/test_triton_flash.py tests/attention/test_triton_decode.py \
  tests/attention/test_triton_contract.py 2>&1 | tee "$OUT/gpu_configs.log"
config_rc=${PIPESTATUS[0]}
echo "every autotune config + contract: rc=$config_rc in $((SECONDS - start)) s" | tee -a "$OUT/gpu_configs.log"

start=$SECONDS
timeout "$BENCH_LIMIT" "$PY" benchmarks/attention.py --out "$OUT" --budget-s $((BENCH_LIMIT - 40)) ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} \
  2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "benchmark: rc=$bench_rc in $((SECONDS - start)) s" | tee -a "$OUT/bench.log"

# 5. batch-invariant mode (issue 20): the engine on CUDA, bitwise solo == batched / chunked / preempted through the
#    Triton fixed-split kernel (gpu-marked), then off-vs-on throughput and decode -> $OUT/batch_invariant.log
start=$SECONDS
timeout "$BI_TEST_LIMIT" "$PY" -m pytest -q -p no:cacheprovider tests/engine/test_batch_invariant_triton.py \
  2>&1 | tee "$OUT/batch_invariant.log"
bi_rc=${PIPESTATUS[0]}
timeout "$BI_BENCH_LIMIT" "$PY" benchmarks/batch_invariant.py "${BI_ARGS[@]}" --json "$OUT/batch_invariant.json" \
  2>&1 | tee -a "$OUT/batch_invariant.log"
echo "batch invariant: tests rc=$bi_rc, benchmark rc=${PIPESTATUS[0]} in $((SECONDS - start)) s" \
  | tee -a "$OUT/batch_invariant.log"

[ "$test_rc" -eq 0 ] && [ "$config_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$bi_rc" -eq 0 ]
