#!/usr/bin/env bash
# The one script the GPU machine runs: a first-light smoke check, the GPU parity tests, the rank-classification
# benchmark and the PyTorch + PEFT baseline in the same run on the same GPU, then a table. The summary (one line
# per step) is printed last. The device tool brings back at most 8 files from $OUT, so $OUT holds only
# summary.txt, table.md, rank-bench.json, pytorch-bench.json, pytorch-bf16-errors.json, ncu-summary.md and logs.tar.gz (every step's
# log, probe.json, the train-run JSONs; repacked after each step, so a run cut short keeps what it had).
#
# Here (no GPU needed), once per change:
#   bash benchmarks/device-check.sh --prepare
#     builds the CUDA addon (build-cuda/tfew.node), compiles the TypeScript (dist/), packs Node.js and the
#     node_modules the run needs into .device/ (the GPU machine has neither Node nor a registry), with the addon
#     compressed (.device/tfew.node.xz: the carry limit is 64 MiB).
# There (the `run` tool, timeout_s 600), carrying [".device", "dist"]:
#   bash benchmarks/device-check.sh
# Environment:
#   TFEW_DEVICE_BUDGET_S   seconds for all steps together (default 540); each step is capped by what is left
#   TFEW_DEVICE_STEPS      default "smoke,errors,tests,bench,torch"; e.g. "bench,torch" for a second call;
#                          "ncu" adds Nsight Compute's counters of our kernels (attention, norms, activation,
#                          softmax, dropout, (IA)3, losses, embedding, Adafactor) at the RANK-3B-B32 and TRAIN-3B shapes on a 2+2-layer checkpoint
#                          (benchmarks/kernel-profile.ts; ncu.log in logs.tar.gz; ~1 min);
#                          "trainrun" adds the full 1000-step run (benchmarks/train-run.ts), with fixed and
#                          with varied input lengths, and (after "bench") with the switches of rank-bench's TRAIN-3B
#                          best combination when it found one (up to 240 s each; ~45 s each on an H200)
#   TFEW_DEVICE_RESERVE_S  seconds the test steps leave for the benchmark (default 150)
#   TFEW_DEVICE_TESTS      the "tests" step runs only these files, e.g. "cuda-gemm-tuning,cuda-encoder-chunks"
#   TFEW_DEVICE_FORCE=1    run the later steps even when the probe or the smoke check failed
#   TFEW_SKIP_COMPILE=1    no torch.compile in the PyTorch baseline
#   TFEW_DEVICE_DRY=1      a rehearsal of this script without a GPU, on the CUDA emulator (npm run build:emu):
#                          TFEW_DEVICE_DRY=1 OUT=/tmp/dry bash benchmarks/device-check.sh
#                          the addon is build-emu/'s, the benchmarks run with --dry, time caps are 4x, no budget;
#                          the PyTorch steps fail where python3 has no torch. Checks the script, not the numbers.
# Order and failure policy: the probe first (no usable GPU for us: print what is missing and stop); then the
# smoke check on the tiny fixtures with TFEW_CUDA_DEBUG_SYNC=1 (a CUDA fault names its kernel); each GPU test
# file runs in its own process (a CUDA fault poisons the whole process, so one file cannot take the others
# down) with its own time cap (a hang costs one cap, not the budget); a file that hit a CUDA fault is rerun
# once with TFEW_CUDA_DEBUG_SYNC=1. When the smoke check failed, the benchmark and the PyTorch steps are
# skipped unless a fallback finds switches under which the core checks pass (smoke --core with, in turn, no
# switch, the cuBLAS attention backward, the WMMA attention forward, the fused attention off, the cross-attention
# precomputed): then the
# benchmarks run with those switches, which rank-bench.json records. rank-bench records a workload that fails
# and goes on; after a fault that loses the CUDA context it is rerun once with --resume for what is left.
# Engine switches worth knowing when something fails: TFEW_CUDA_DEBUG_SYNC=1, TFEW_CUDA_GRAPHS=0,
# TFEW_CUDA_FUSED_BACKWARD=0, TFEW_CUDA_FUSED_ATTENTION=0, TFEW_CUDA_PRECISION=fp32.
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
  # the addon, compressed (37 MiB as built, with code for sm_80 and sm_90; ~4.5 MiB as xz): the run unpacks it
  xz -T2 -6 -c build-cuda/tfew.node > .device/tfew.node.xz
  du -sh .device dist
  local total
  total=$(du -scb .device dist | tail -n 1 | cut -f1)
  echo "carry total: $((total >> 20)) MiB (limit 64 MiB)"
  if [ "$total" -gt $((64 << 20)) ]; then
    echo "the carry is over the 64 MiB limit" >&2
    return 1
  fi
  echo 'carry: [".device", "dist"]   command: bash benchmarks/device-check.sh   timeout_s: 600'
}

if [ "${1:-}" = "--prepare" ]; then
  prepare
  exit $?
fi

# ---------------------------------------------------------------------------------------------------------
# on the GPU machine

OUT=${OUT:-/tmp/tfew-device-out}
mkdir -p "$OUT"
LOGS=${TFEW_DEVICE_LOGS:-/tmp/tfew-device-logs}  # packed into $OUT/logs.tar.gz
rm -rf "$LOGS"
mkdir -p "$LOGS"
pack_logs() { tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null || true; }
DRY=${TFEW_DEVICE_DRY:-0}
BUDGET=${TFEW_DEVICE_BUDGET_S:-540}
DRY_ARGS=()
CAP_FACTOR=1
if [ "$DRY" = "1" ]; then
  export TFEW_NATIVE_ADDON="$ROOT/build-emu/Release/tfew.node"
  BUDGET=${TFEW_DEVICE_BUDGET_S:-7200}
  DRY_ARGS=(--dry)
  CAP_FACTOR=4
fi
STEPS=${TFEW_DEVICE_STEPS:-smoke,errors,tests,bench,torch}
RESERVE=${TFEW_DEVICE_RESERVE_S:-150}
FORCE=${TFEW_DEVICE_FORCE:-0}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
finish() {
  pack_logs
  echo
  echo "== summary ($(($(date +%s) - START)) s of the ${BUDGET} s budget; logs in \$OUT/logs.tar.gz)"
  cat "$SUMMARY"
  exit "$1"
}

# step NAME MAX_SECONDS RESERVE_SECONDS command...: runs with a timeout capped by what is left of the budget
# minus RESERVE_SECONDS (time kept for later steps).
step() {
  local name=$1 max=$2 keep=$3
  shift 3
  max=$((max * CAP_FACTOR))
  local left=$((BUDGET - ($(date +%s) - START) - keep))
  if [ "$left" -lt 20 ]; then
    note "SKIP  $name (budget spent)"
    return 1
  fi
  local limit=$((max < left ? max : left))
  local t0
  t0=$(date +%s)
  # (TFEW_STEP_LIMIT_S: the step's own limit, for commands that budget their time, e.g. pytorch_baseline.py)
  TFEW_STEP_LIMIT_S="$limit" timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then
    note "OK    $name (${dt} s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    note "FAIL  $name (timed out after ${dt} s, limit ${limit} s): see $name.log"
  else
    note "FAIL  $name (rc $rc after ${dt} s): see $name.log"
  fi
  tail -n 25 "$LOGS/$name.log"
  pack_logs
  return $rc
}

# A CUDA fault (illegal address, launch failure, ...) in a log: the test process's CUDA context was lost.
cuda_fault() { grep -qE "E_CUDA|illegal|cudaError|misaligned|launch failure|restart the process" "$1" 2>/dev/null; }

if [ -f .device/env.sh ]; then
  # shellcheck disable=SC1091
  source .device/env.sh
fi
if [ ! -d node_modules ] && [ -f .device/node_modules.tar.xz ]; then
  xz -dc .device/node_modules.tar.xz | tar -xf -
fi
# (unpacked every call: a warm machine keeps the last call's build-cuda/, which may be an older build)
if [ "$DRY" != "1" ] && [ -f .device/tfew.node.xz ]; then
  mkdir -p build-cuda
  xz -dc .device/tfew.node.xz > build-cuda/tfew.node
fi
if [ "$DRY" != "1" ] && [ -f build-cuda/tfew.node ]; then  # node-gyp-build (lib/native.ts) looks in build/Release
  mkdir -p build/Release
  cp build-cuda/tfew.node build/Release/tfew.node
fi

note "== device-check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') steps $STEPS"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 | tee -a "$SUMMARY"

# ---- probe: can the addon load, and does it see a usable GPU, driver and cuBLAS?
node -e "const n=require('./dist/lib/native');const p=n.native().probeCuda();console.log(JSON.stringify({build:n.native().buildInfo,probe:p}));process.exit(p.usable?0:3)" \
  > "$LOGS/probe.json" 2>&1
probe_rc=$?
cat "$LOGS/probe.json" | tee -a "$SUMMARY"
if [ $probe_rc -ne 0 ]; then
  note "FAIL  probe: the CUDA backend is not usable here (see probe.json; diagnostics in probe-diagnostics.log)"
  {
    echo "== node"; command -v node; node --version
    echo "== addon"; ls -la build/Release/ build-cuda/ 2>&1
    echo "== ldd"; ldd build/Release/tfew.node 2>&1
    echo "== cuBLAS"; ls -la /usr/local/cuda/lib64/libcublas* 2>&1; ldconfig -p 2>/dev/null | grep -E "libcublas|libcuda\.so" || true
    echo "== driver"; nvidia-smi 2>&1 | head -20
    echo "== LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  } > "$LOGS/probe-diagnostics.log" 2>&1
  tail -n 40 "$LOGS/probe-diagnostics.log"
  [ "$FORCE" = "1" ] || finish 1
fi

# ---- smoke: tiny checkpoints on the GPU vs the CPU backend, synchronising after every kernel
smoke_ok=1
if want smoke; then
  if ! TFEW_CUDA_DEBUG_SYNC=1 step smoke 120 0 node dist/benchmarks/rank-bench.js smoke --fixtures test/fixtures; then
    smoke_ok=0
    note "      the smoke check failed: the benchmarks are skipped unless a fallback below passes (TFEW_DEVICE_FORCE=1 runs them anyway)"
  fi
fi
# Fallback: when the smoke check failed, find switches under which the paths the benchmark takes by default
# still work (the core checks: no check that forces a path by a load option), from none to the most
# conservative, so that the benchmark can still give numbers and the logs say which path is broken.
BENCH_ENV=()
if want smoke && [ "$smoke_ok" = "0" ] && [ "$FORCE" != "1" ] && { want bench || want trainrun; }; then
  n=0
  # (the fused attention backward, the default since session 18, alone first: the core checks train)
  for cfg in "" "TFEW_CUDA_FUSED_BACKWARD=0" "TFEW_CUDA_ATTENTION_KERNEL=wmma" "TFEW_CUDA_FUSED_ATTENTION=0" \
             "TFEW_CUDA_FUSED_ATTENTION=0 TFEW_CUDA_CROSS_ATTENTION=precomputed"; do
    n=$((n + 1))
    read -r -a cfg_words <<< "$cfg"
    if TFEW_CUDA_DEBUG_SYNC=1 step "smoke-fallback-$n" 90 "$RESERVE" env "${cfg_words[@]}" \
         node dist/benchmarks/rank-bench.js smoke --core --fixtures test/fixtures; then
      BENCH_ENV=("${cfg_words[@]}")
      smoke_ok=1
      note "      the core checks pass with switches [${cfg}]: the benchmarks run with them (rank-bench.json: engineEnv)"
      break
    fi
  done
fi
later_ok() { [ "$smoke_ok" = "1" ] || [ "$FORCE" = "1" ]; }

RANDOM_DIR=/tmp/tfew-rand-t0w-2l
ERRORS="$OUT/pytorch-bf16-errors.json"
if want tests || want errors || want ncu; then
  step random-checkpoint 90 0 node dist/benchmarks/random-t5.js --out "$RANDOM_DIR" --layers 2 --seed 1234 \
    --batch-json "$RANDOM_DIR/batch.json"
fi

# ---- PyTorch's own bf16 error: the tolerance of the bf16 GPU tests
if want errors && later_ok; then
  step pytorch-errors 150 "$RESERVE" python3 benchmarks/pytorch_baseline.py errors --fixtures test/fixtures \
    --random "$RANDOM_DIR" --out "$ERRORS"
fi

# ---- the GPU tests, one process per file
if want tests; then
  debug_rerun_done=0
  for t in cuda-fixtures:90 cuda-training:120 cuda-session:60 cuda-random:180 cuda-few-rows:60 cuda-gemm-tuning:60 cuda-programmatic-launch:60 cuda-encoder-chunks:60 cuda-behaviour:120 cuda-graphs:90 cuda-reserve:60 cuda-devices:45 cuda-fuzz-api:45; do
    file=${t%%:*}
    [ -z "${TFEW_DEVICE_TESTS:-}" ] || [[ ",$TFEW_DEVICE_TESTS," == *",$file,"* ]] || continue
    cap=${t##*:}
    TFEW_BF16_ERRORS="$ERRORS" TFEW_RANDOM_T5_DIR="$RANDOM_DIR" \
      step "jest-$file" "$cap" "$RESERVE" node node_modules/jest/bin/jest.js --selectProjects tfew --runInBand --verbose "test/gpu/$file.test.ts"
    # A CUDA fault is reported by whichever call synchronises next; rerun once synchronising after every
    # kernel, so the log names the kernel that faulted.
    # (not for cuda-graphs and cuda-reserve: their tests are about graphs, which debug-sync turns off; the other
    # files run the padded shapes too, and so does debug-sync)
    if [ "$debug_rerun_done" = "0" ] && [ "$file" != "cuda-graphs" ] && [ "$file" != "cuda-reserve" ] && cuda_fault "$LOGS/jest-$file.log"; then
      debug_rerun_done=1
      TFEW_CUDA_DEBUG_SYNC=1 TFEW_BF16_ERRORS="$ERRORS" TFEW_RANDOM_T5_DIR="$RANDOM_DIR" \
        step "jest-$file-debug-sync" 120 "$RESERVE" node node_modules/jest/bin/jest.js --selectProjects tfew --runInBand --verbose "test/gpu/$file.test.ts"
    fi
  done
fi

# ---- our benchmark, then the PyTorch + PEFT baseline on the same GPU
if want bench; then
  if later_ok; then
    # (a workload that fails is recorded and the others run; a fault that loses the CUDA context stops the
    # process, and one rerun with --resume does what is left in a fresh one)
    # (keeps ~100 s for the PyTorch bench after it: its numbers are the comparison this run is for)
    TORCH_KEEP=0
    want torch && TORCH_KEEP=100
    step rank-bench 240 "$TORCH_KEEP" env "${BENCH_ENV[@]}" node dist/benchmarks/rank-bench.js run "${DRY_ARGS[@]}" --out "$OUT/rank-bench.json"
    if grep -q "rerun with --resume" "$LOGS/rank-bench.log" 2>/dev/null; then
      step rank-bench-resume 200 "$TORCH_KEEP" env "${BENCH_ENV[@]}" node dist/benchmarks/rank-bench.js run "${DRY_ARGS[@]}" --resume \
        --out "$OUT/rank-bench.json"
    fi
  else
    note "SKIP  rank-bench (smoke check failed)"
  fi
fi

# a whole 1000-step T-Few run on T0-3B-sized random weights (not in the default steps: ~1-2 min of device time)
if want trainrun; then
  if later_ok; then
    step train-run 240 0 env "${BENCH_ENV[@]}" node dist/benchmarks/train-run.js "${DRY_ARGS[@]}" --out "$LOGS/train-run.json"
    # the same with inputs of 64-256 tokens: batches of changing lengths, as a Trainer on real data gives
    step train-run-varied 240 0 env "${BENCH_ENV[@]}" node dist/benchmarks/train-run.js "${DRY_ARGS[@]}" --lengths varied \
      --out "$LOGS/train-run-varied.json"
    # and with the switches that made TRAIN-3B fastest in this call's rank-bench (the "bench" step must run in the
    # same call: $OUT starts empty): its best combination where that row beat the default, else its fastest row
    BEST_TRAIN=$(node -e "
      const r = JSON.parse(require('fs').readFileSync(process.argv[1], 'utf8')), b = (r.best || {})['TRAIN-3B'];
      if (!b) process.exit(0);
      const ms = (row) => (r.workloads[row] || {}).medianForwardMs, d = ms('TRAIN-3B');
      console.log(JSON.stringify(ms(b.row) < 0.99 * d ? b.cuda : b.winners[0].cuda));" "$OUT/rank-bench.json" 2>/dev/null)
    if [ -n "$BEST_TRAIN" ]; then
      note "      train-run-best: the switches rank-bench found fastest for TRAIN-3B: $BEST_TRAIN"
      step train-run-best 240 0 env "${BENCH_ENV[@]}" node dist/benchmarks/train-run.js "${DRY_ARGS[@]}" --cuda "$BEST_TRAIN" \
        --out "$LOGS/train-run-best.json"
    fi
  else
    note "SKIP  train-run (smoke check failed)"
  fi
fi

# Nsight Compute on our kernels: speed of light (compute and memory throughput against the peaks), occupancy, warp
# stall reasons, launch shape, memory workload; clocks left alone (--clock-control none, as the device notes advise)
if want ncu; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  if [ "$DRY" = "1" ] || [ -z "$NCU" ]; then
    note "SKIP  ncu (no GPU profiler in a dry run, or no ncu on the PATH or in /opt/nvidia/nsight-compute)"
  elif later_ok; then
    step ncu 180 0 "$NCU" --clock-control none --target-processes all \
      --kernel-name regex:"attention|norm|ffn|softmax|gelu|dropout|ia3|loss|logprob|embedding|bias|adafactor" --launch-count 200 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
      --section MemoryWorkloadAnalysis --csv --page details \
      node dist/benchmarks/kernel-profile.js "$RANDOM_DIR"
    # (the log is ncu's CSV, one row per kernel launch and metric, after the script's own lines): summed per kernel
    # and grid into $OUT/ncu-summary.md (benchmarks/ncu-summary.ts), its top lines printed here
    if node dist/benchmarks/ncu-summary.js "$LOGS/ncu.log" --top 60 > "$OUT/ncu-summary.md" 2>&1; then
      head -n 22 "$OUT/ncu-summary.md"
    else
      note "      ncu-summary: could not summarise ncu.log ($(head -c 200 "$OUT/ncu-summary.md"))"
    fi
  else
    note "SKIP  ncu (smoke check failed)"
  fi
fi

if want torch; then
  if later_ok; then
    extra=()
    [ "${TFEW_SKIP_COMPILE:-0}" = "1" ] && extra+=(--no-compile)
    # the random T0-3B checkpoint rank-bench wrote: PyTorch runs on the same weights
    # (written completely: random-t5.ts writes .random-t5.json last)
    [ -f /tmp/tfew-bench-t0-3b-24l/.random-t5.json ] && extra+=(--model-dir /tmp/tfew-bench-t0-3b-24l)
    step pytorch-bench 300 0 python3 benchmarks/pytorch_baseline.py bench "${extra[@]}" --out "$OUT/pytorch-bench.json"
  else
    note "SKIP  pytorch-bench (smoke check failed)"
  fi
fi

echo
if [ -f "$OUT/rank-bench.json" ]; then
  node dist/benchmarks/rank-bench.js table --ours "$OUT/rank-bench.json" --torch "$OUT/pytorch-bench.json" | tee "$OUT/table.md"
fi
if grep -q "^FAIL" "$SUMMARY"; then finish 1; fi
finish 0
