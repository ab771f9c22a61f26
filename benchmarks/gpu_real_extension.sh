#!/usr/bin/env bash
# The SmolLM2 8K -> 32K extension (benchmarks/real_extension.py, recipes/smollm2-yarn-32k.toml) on the lent H200.
#
# The device machine reaches nothing outside it, and a call carries at most 64 MiB of working tree: the GGUF
# (98 MB) travels in three parts over three calls to the same warm machine, each part copied to /tmp there.
#   here, once:      bash benchmarks/gpu_real_extension.sh prepare     # .gpu_carry/: 3 GGUF parts, gguf wheel, texts
#   device call 1:   bash benchmarks/gpu_real_extension.sh stash 1     # carry [".gpu_carry/part1", ".gpu_carry/common"]
#   device call 2:   bash benchmarks/gpu_real_extension.sh stash 2     # carry [".gpu_carry/part2"]
#   device call 3:   OUT=$OUT bash benchmarks/gpu_real_extension.sh run  # carry [".gpu_carry/part3"], timeout_s 590
# `run` joins the parts (SHA-256 checked), installs the gguf wheel to /tmp/site, points the real texts at the
# carried copy and runs the experiment into $OUT (summary.md, tables, plots; stage times in times.json).
# CPU rehearsal of the same path (parts under /tmp, --rehearse): REHEARSE=1 OUT=/tmp/o bash benchmarks/gpu_real_extension.sh all
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry
STASH="${STASH:-/tmp/smollm2-parts}"
PY="${PYTHON:-python3}"

prepare() {
  local gguf
  gguf=$("$PY" -c "from longreach.model.bundled import require_real_model_path as r; print(r())")
  grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$CARRY/" >> .git/info/exclude; }
  rm -rf "$CARRY" && mkdir -p "$CARRY"/part1 "$CARRY"/part2 "$CARRY"/part3 "$CARRY"/common/real-text
  split -n 3 -d "$gguf" "$CARRY/split-"
  mv "$CARRY/split-00" "$CARRY/part1/gguf.part"; mv "$CARRY/split-01" "$CARRY/part2/gguf.part"
  mv "$CARRY/split-02" "$CARRY/part3/gguf.part"
  sha256sum "$gguf" | cut -d' ' -f1 > "$CARRY/part3/gguf.sha256"
  basename "$gguf" > "$CARRY/part3/gguf.name"
  "$PY" -m pip download -q --no-deps -d "$CARRY/common" gguf==0.19.0
  cp "$("$PY" -c "from longreach.eval.real_text import real_text_dir; print(real_text_dir())")"/*.txt \
    "$CARRY/common/real-text/"
  cp "$("$PY" -c "from longreach.eval.real_text import real_text_dir; print(real_text_dir())")"/LICENSE-brotli \
    "$CARRY/common/real-text/"
  du -sh "$CARRY"/*
}

stash() {  # stash N: keep the carried part N (and the common files) outside the repo for the last call
  mkdir -p "$STASH/common"
  for f in "$CARRY/part$1/"*; do cp "$f" "$STASH/$1-$(basename "$f")"; done
  [ ! -d "$CARRY/common" ] || cp -r "$CARRY/common/." "$STASH/common/"
  ls -la "$STASH"
}

run() {
  stash 3
  local gguf="/tmp/$(cat "$STASH/3-gguf.name")"
  cat "$STASH/1-gguf.part" "$STASH/2-gguf.part" "$STASH/3-gguf.part" > "$gguf"
  echo "$(cat "$STASH/3-gguf.sha256")  $gguf" | sha256sum -c -
  if ! "$PY" -c "import gguf" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "$STASH"/common/gguf-*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LONGREACH_REAL_TEXT="$STASH/common/real-text"
  local args=(--model "$gguf" --out "${OUT:?set OUT}/real_extension")
  if [ "${REHEARSE:-0}" = 1 ]; then args+=(--rehearse --device cpu); else args+=(--device cuda); fi
  (command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv) || true
  "$PY" benchmarks/real_extension.py "${args[@]}"
  cp "$OUT/real_extension/summary.md" "$OUT/real_extension_summary.md"
}

case "${1:-}" in
  prepare) prepare ;;
  stash) stash "${2:?stash 1|2|3}" ;;
  run) run ;;
  all) prepare; stash 1; stash 2; run ;;
  *) echo "usage: $0 prepare | stash N | run | all (REHEARSE=1 for the CPU rehearsal)" >&2; exit 2 ;;
esac
