#!/usr/bin/env bash
# The GPU measurements still owed (none were possible since 2026-11-28), in one device call of about 9 minutes
# (run it with timeout_s 590). The demo models are shipped, so unlike gpu_all.sh nothing is trained here.
#   1. versions and nvidia-smi                                                -> $OUT/gpu_env.log
#   2. gpu-marked tests never run on a GPU: the engine through the CUDA kernels (int8/int4 KV, policies,
#      int8 weights), block-sparse Triton attention, int8 KV dequantized inside the paged decode kernel
#      (the every-autotune-config kernel tests run in gpu_check.sh, in a step of their own)
#                                                                             -> $OUT/gpu_tests.log
#   3. serving: a ~1B random Llama, 16 requests of 8K-32K tokens, ours vs transformers -> $OUT/serving_gpu.*
#   4. training: the 1B model at 32K tokens, Triton vs SDPA (16K was measured)  -> $OUT/train_gpu.*
# Each step has its own time limit, so a slow step still leaves the others' results.
# Usage: OUT=/some/dir bash benchmarks/gpu_owed.sh
# CPU rehearsal of the same command lines at toy sizes (GPU tests skip there): REHEARSE=1 OUT=/tmp/o bash benchmarks/gpu_owed.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if [ "${REHEARSE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  SERVING=(--preset 34m --device cpu --dtype fp32 --threads 1 --num-requests 2 --min-prompt 64 --max-prompt 128
           --output-len 4 --max-num-batched-tokens 256 --prefix-len 128 --prefix-requests 2)
  TRAIN=(--gpu --dry-run --gpu-seq-lens 256)
else
  unset TRITON_INTERPRET
  SERVING=(--preset 1b --device cuda --dtype bf16 --num-requests 16 --min-prompt 8192 --max-prompt 32768
           --output-len 64 --max-num-batched-tokens 8192 --prefix-len 16384 --prefix-requests 8)
  TRAIN=(--gpu --gpu-seq-lens 32768)
fi
status=0
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, remember a failure
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

{
  date -u
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/gpu_env.log" 2>&1

workers=""
"$PY" -c "import xdist" 2>/dev/null && workers="-n 8"
# shellcheck disable=SC2086
LONGREACH_TRITON_AUTOTUNE=0 step gpu_tests 150 "$PY" -m pytest -q -m gpu -k "not every_autotune_config" $workers \
  -p no:cacheprovider \
  tests/engine/test_gpu.py tests/attention/test_triton_sparse.py tests/attention/test_triton_decode.py
step serving_gpu 200 "$PY" benchmarks/serving.py "${SERVING[@]}" --systems ours,hf_single \
  --cases throughput,prefill,prefix --system-timeout 60 --json "$OUT/serving_gpu.json"
step train_gpu 150 "$PY" benchmarks/train.py "${TRAIN[@]}" --out "$OUT"
ls -la "$OUT"
exit $status
