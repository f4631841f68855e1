#!/usr/bin/env bash
# The one script the GPU machine runs: GPU parity tests, the rank-classification benchmark and the PyTorch +
# PEFT baseline in the same run on the same GPU, then a table. Full logs and JSON go to $OUT.
#
# Here (no GPU needed), once per change:
#   benchmarks/device-check.sh --prepare
#     builds the CUDA addon (build-cuda/tfew.node), compiles the TypeScript (dist/), packs Node.js and the
#     node_modules the run needs into .device/ (the GPU machine has neither Node nor a registry).
# There (the `run` tool), carrying [".device", "build-cuda/tfew.node", "dist"]:
#   bash benchmarks/device-check.sh
# Environment: TFEW_DEVICE_BUDGET_S (default 540: seconds for all steps together; later steps get what is
# left), TFEW_DEVICE_STEPS (default "errors,tests,bench,torch"), TFEW_SKIP_COMPILE=1 (no torch.compile).
# Engine switches worth knowing when something fails there: TFEW_CUDA_DEBUG_SYNC=1 (sync after every
# kernel: faults name their kernel), TFEW_CUDA_GRAPHS=0, TFEW_CUDA_FUSED_ATTENTION=0, TFEW_CUDA_PRECISION=fp32.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

prepare() {
  set -e
  local jobs=2
  echo "== building the CUDA addon in build-cuda/"
  local inc
  inc=$(node -p "require('node-api-headers').include_dir")
  cmake -S . -B build-cuda -G Ninja -DTFEW_CUDA=ON -DCMAKE_BUILD_TYPE=Release -DCMAKE_JS_INC="$inc" \
    -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc >/dev/null
  ninja -C build-cuda -j "$jobs"
  echo "== compiling TypeScript to dist/"
  npx tsc -p tsconfig.json || echo "(tsc reported errors; JavaScript was emitted anyway)"
  echo "== packing Node.js and node_modules into .device/"
  bash "$ROOT/../shared/device/prepare.sh"
  # What the device run needs: jest + ts-jest + typescript for the tests, the runtime dependencies of lib/.
  # Plot and CLI-only packages stay behind (the 64 MiB carry limit).
  tar -C "$ROOT" --exclude='node_modules/vega*' --exclude='node_modules/d3-*' --exclude='node_modules/@resvg' \
    --exclude='node_modules/.cache' -cf - node_modules | xz -T2 -6 > .device/node_modules.tar.xz
  du -sh .device build-cuda/tfew.node dist
  echo 'carry: [".device", "build-cuda/tfew.node", "dist"]   command: bash benchmarks/device-check.sh'
}

if [ "${1:-}" = "--prepare" ]; then
  prepare
  exit $?
fi

# ---------------------------------------------------------------------------------------------------------
# on the GPU machine

OUT=${OUT:-/tmp/tfew-device-out}
mkdir -p "$OUT"
BUDGET=${TFEW_DEVICE_BUDGET_S:-540}
STEPS=${TFEW_DEVICE_STEPS:-errors,tests,bench,torch}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
want() { [[ ",$STEPS," == *",$1,"* ]]; }

# step NAME MAX_SECONDS command...: runs with a timeout capped by what is left of the budget.
step() {
  local name=$1 max=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    note "SKIP  $name (budget spent)"
    return 1
  fi
  local limit=$((max < left ? max : left))
  local t0
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then note "OK    $name (${dt} s)"; else note "FAIL  $name (rc $rc after ${dt} s, limit ${limit} s): see $name.log"; fi
  tail -n 40 "$OUT/$name.log"
  return $rc
}

if [ -f .device/env.sh ]; then
  # shellcheck disable=SC1091
  source .device/env.sh
fi
if [ ! -d node_modules ] && [ -f .device/node_modules.tar.xz ]; then
  xz -dc .device/node_modules.tar.xz | tar -xf -
fi
if [ -f build-cuda/tfew.node ]; then  # node-gyp-build (lib/native.ts) looks in build/Release
  mkdir -p build/Release
  cp build-cuda/tfew.node build/Release/tfew.node
fi

note "== device-check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
node -e "const n=require('./dist/lib/native');const p=n.native().probeCuda();console.log(JSON.stringify({build:n.native().buildInfo,probe:p}))" \
  > "$OUT/probe.json" 2>&1
cat "$OUT/probe.json" | tee -a "$SUMMARY"

RANDOM_DIR=/tmp/tfew-rand-t0w-2l
step random-checkpoint 120 node dist/benchmarks/random-t5.js --out "$RANDOM_DIR" --layers 2 --seed 1234 \
  --batch-json "$RANDOM_DIR/batch.json"

ERRORS="$OUT/pytorch-bf16-errors.json"
if want errors; then
  step pytorch-errors 180 python3 benchmarks/pytorch_baseline.py errors --fixtures test/fixtures --random "$RANDOM_DIR" \
    --out "$ERRORS"
fi

if want tests; then
  TFEW_BF16_ERRORS="$ERRORS" TFEW_RANDOM_T5_DIR="$RANDOM_DIR" \
    step jest-gpu 300 node node_modules/jest/bin/jest.js test/gpu --runInBand --verbose
  # A CUDA fault (illegal address, launch failure) is reported by whichever call syncs next; rerun the
  # fixture tests synchronising after every kernel so the log names the kernel that faulted.
  if grep -qE "E_CUDA|illegal|cudaError|CUDA context is no longer usable" "$OUT/jest-gpu.log" 2>/dev/null; then
    TFEW_CUDA_DEBUG_SYNC=1 TFEW_BF16_ERRORS="$ERRORS" \
      step jest-gpu-debug-sync 150 node node_modules/jest/bin/jest.js test/gpu/cuda-fixtures.test.ts --runInBand
  fi
fi

if want bench; then
  step rank-bench 240 node dist/benchmarks/rank-bench.js run --layers 24 --out "$OUT/rank-bench.json"
fi

if want torch; then
  extra=()
  [ "${TFEW_SKIP_COMPILE:-0}" = "1" ] && extra+=(--no-compile)
  step pytorch-bench 420 python3 benchmarks/pytorch_baseline.py bench "${extra[@]}" --out "$OUT/pytorch-bench.json"
fi

echo
if [ -f "$OUT/rank-bench.json" ]; then
  node dist/benchmarks/rank-bench.js table --ours "$OUT/rank-bench.json" --torch "$OUT/pytorch-bench.json" | tee "$OUT/table.md"
fi
echo
cat "$SUMMARY"
