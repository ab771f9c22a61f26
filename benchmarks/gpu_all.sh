#!/usr/bin/env bash
# Every GPU job of this project in one command (one lease of the H200), about 9 minutes (run it with timeout_s 590):
#   0. benchmarks/triton_sanity.py: are our Triton kernels right here? picks the training attention backend
#   1. longreach demo train   (the base model, 512 tokens)
#   2. longreach demo retrieval -> $OUT/demo-base (stage 2: passkey documents finish the copy circuit), then
#      longreach demo extend  -> $OUT/demo-yarn8x    (YaRN x8 + continued pretraining at 4096)
#   3. benchmarks/gpu_check.sh: GPU kernel tests + the attention benchmark -> $OUT/*.log, attention.md/json
# Each step has its own time limit; a training step cut short still exports its latest checkpoint.
# What comes back is three archives (the device tool returns at most 8 files of 16 MiB):
#   $OUT/logs.tgz (every log, metric file and benchmark table), $OUT/demo-base.tgz, $OUT/demo-yarn8x.tgz
# each re-packed as soon as its step ends, so a run cut short still returns what it finished.
# Usage: OUT=/some/dir bash benchmarks/gpu_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL_OUT="${OUT:-./out}"
mkdir -p "$FINAL_OUT"
OUT="$FINAL_OUT/work"
mkdir -p "$OUT"
pack() {  # pack NAME PATHS...: $FINAL_OUT/NAME.tgz from paths relative to $OUT
  local name=$1; shift
  (cd "$OUT" && tar czf "$FINAL_OUT/$name.tgz.tmp" "$@" 2>/dev/null && mv "$FINAL_OUT/$name.tgz.tmp" "$FINAL_OUT/$name.tgz")
  rm -f "$FINAL_OUT/$name.tgz.tmp"
}
packlogs() { pack logs $(cd "$OUT" && ls *.log *.jsonl *.md *.json 2>/dev/null); }
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
RUN=/tmp/longreach-demo
TRAIN_LIMIT="${TRAIN_LIMIT:-210}"
EXTEND_LIMIT="${EXTEND_LIMIT:-70}"
# extra flags for a CPU rehearsal of this script, e.g. TRAIN_ARGS="--max-steps 4 --set training.batch_size=4 ..."
TRAIN_ARGS="${TRAIN_ARGS:-}"
EXTEND_ARGS="${EXTEND_ARGS:-}"

if timeout 60 "$PY" benchmarks/triton_sanity.py 2>&1 | tee "$OUT/sanity.log"; then
  backend=triton
else
  backend=sdpa
fi
echo "training attention backend: $backend" | tee -a "$OUT/sanity.log"
packlogs
export LONGREACH_ATTENTION_BACKEND=$backend LONGREACH_TRITON_AUTOTUNE=0  # one config: no tuning inside the time limit

latest() {  # the newest HF directory under a training output: final/ if it exists, else the last step-N/
  if [ -f "$1/final/config.json" ]; then echo "$1/final"; else ls -d "$1"/step-* 2>/dev/null | sort | tail -n 1; fi
}

start=$SECONDS
timeout "$TRAIN_LIMIT" "$PY" -m longreach demo train --run-dir "$RUN" --set training.progress=false \
  --set checkpoint.save_every=250 $TRAIN_ARGS 2>&1 | tail -n 40 | tee "$OUT/demo_train.log"
base=$(latest "$RUN/base")
echo "base training: ${SECONDS}s elapsed, exporting $base" | tee -a "$OUT/demo_train.log"
cp "$RUN/base/metrics.jsonl" "$OUT/demo_train_metrics.jsonl" 2>/dev/null
packlogs

timeout "${RETRIEVAL_LIMIT:-60}" "$PY" -m longreach demo retrieval --base "$base" --run-dir "$RUN" \
  --max-steps "${RETRIEVAL_STEPS:-450}" --prompt-steps "${PROMPT_STEPS:-150}" 2>&1 | tail -n 20 | tee "$OUT/demo_retrieval.log"
retrieved=$(latest "$RUN/retrieval-prompt")
[ -n "$retrieved" ] && base=$retrieved
echo "stage 2: extending $base" | tee -a "$OUT/demo_retrieval.log"
# the model before extension (stage 2 when it ran) is the experiment's base
"$PY" -c "from longreach.demo.train import export_bf16; export_bf16('$base', '$OUT/demo-base')" 2>&1 | tee -a "$OUT/demo_retrieval.log"
[ -d "$OUT/demo-base" ] && pack demo-base demo-base; packlogs
start=$SECONDS
timeout "$EXTEND_LIMIT" "$PY" -m longreach demo extend --base "$base" --run-dir "$RUN" \
  --mix passkey-prompt --set schedule.decay=cosine --set training.progress=false --set checkpoint.save_every=50 $EXTEND_ARGS 2>&1 | tail -n 30 | tee "$OUT/demo_extend.log"
ext=$(latest "$RUN/yarn-8x")
echo "extension: $((SECONDS - start))s, exporting $ext" | tee -a "$OUT/demo_extend.log"
cp "$RUN/yarn-8x/metrics.jsonl" "$OUT/demo_extend_metrics.jsonl" 2>/dev/null
[ -n "$ext" ] && "$PY" -c "from longreach.demo.train import export_bf16; export_bf16('$ext', '$OUT/demo-yarn8x')" 2>&1 | tee -a "$OUT/demo_extend.log"
[ -d "$OUT/demo-yarn8x" ] && pack demo-yarn8x demo-yarn8x; packlogs

unset LONGREACH_ATTENTION_BACKEND LONGREACH_TRITON_AUTOTUNE
TEST_LIMIT="${TEST_LIMIT:-90}" BENCH_LIMIT="${BENCH_LIMIT:-140}" OUT="$OUT" bash benchmarks/gpu_check.sh
packlogs
rm -rf "$OUT"
ls -la "$FINAL_OUT"
