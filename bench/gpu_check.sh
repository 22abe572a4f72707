#!/usr/bin/env bash
# dskc's GPU check: the first hour on a lent GPU host, in one call that ends by a hard deadline.
#
# The device call (lent H200: Python 3.12, torch 2.11, triton 3.6, 16 cores, no network), from a session here:
#   /work/shared/tools/offline-wheels.sh .whl        # optuna, nvidia-cutlass, ... as wheels (.whl/ is git-ignored)
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The script ends within GPU_CHECK_BUDGET_S = 420 s of wall time whatever happens, so a second call still fits.
#
# Steps in order of value; each one's time limit is min(its plan, time left - reserve), the last takes what is left:
#   install        carried wheels, then dskc built from this checkout, into $GPU_CHECK_SITE; the CUTLASS nvcc builds
#                  then start in the background on all cores (python -m dskc.benchmark.gpucheck prebuild)
#   env            (a) environment and ceilings: bf16 matmul, device copy, fp8 torch._scaled_mm
#   stems          (b) tests/kernels on the GPU: every Triton stem against its PyTorch reference
#   model          (b) compiled tiny model vs eager, CUDA-graph decode, a `dskc compile --out` DIR loads compiling nothing
#   headline       (c) dskc bench --suite headline: FP8 GEMM on DeepGEMM's shapes, the V3 MoE layer at 1/128/4096
#                  tokens, MLA decode at h_q 16/128 x batch 64/128 x seqlen 4096/16384, bf16 and FP8 cache
#   cutlass        (d) waits for the builds, then the CUTLASS GPU tests
#   cutlass-bench  (d) bench/bench_cutlass.py rows (pytest-benchmark JSON)
#   autotune       (e) the autotuner's GPU tests
#   rest           (e) dskc bench --suite rest (model tokens/s, every other kernel row, torch.compile rows)
# Left out (not worth this call): tests/benchmark/test_bench_gpu.py (the headline step runs the same code) and the
# per-stem pytest-benchmark files bench/bench_{fp8_gemm,moe,mla,...}.py (the same shapes as dskc bench).
#
# Files in $OUT, each written as its step ends (the bench JSON after every case), so a kill keeps what was measured;
# 7 files, at most 2 folders down (the device returns 8): gpu_check.log, summary.md, steps.tsv, env.json,
# cutlass.json, bench/<gpu>/headline.json, bench/<gpu>/rest.json. Tables and plots of the bench files, here later:
#   .venv/bin/dskc bench --render FILES/bench/<gpu>/headline.json --out bench/results
#
# Settings (environment): OUT (default /tmp/gpu_check_out), PYTHON (python3), GPU_CHECK_SITE (/tmp/site),
# GPU_CHECK_BUDGET_S (420), GPU_CHECK_RESERVE_S (10), GPU_CHECK_WORKERS (8: pytest-xdist workers, where installed),
# GPU_CHECK_DRY (0; 1: the same steps on a CPU, pytest steps only collecting, bench steps on tiny shapes through the
# Triton interpreter: tests/benchmark/test_gpu_check.py). `bash bench/gpu_check.sh --plan` prints the plan only.
# Exit status: 0 when every step passed, 1 when one failed or ran out of time (summary.md says which).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# step:plan seconds:what (the plan adds up to budget - reserve = 410 s)
PLAN=(
  "install:25:carried wheels + dskc into the site folder; CUTLASS builds start in the background"
  "env:20:(a) environment, ceilings: bf16 matmul, device copy, fp8 _scaled_mm"
  "stems:100:(b) tests/kernels on the GPU: every Triton stem vs its PyTorch reference"
  "model:60:(b) compiled tiny model vs eager, CUDA-graph decode, AOT DIR loads compiling nothing"
  "headline:100:(c) dskc bench --suite headline: FP8 GEMM, V3 MoE layer, MLA decode"
  "cutlass:45:(d) wait for the CUTLASS builds, then the CUTLASS GPU tests"
  "cutlass-bench:20:(d) CUTLASS bench rows"
  "autotune:20:(e) the autotuner's GPU tests"
  "rest:20:(e) dskc bench --suite rest, with all the time left"
)
budget=${GPU_CHECK_BUDGET_S:-420}
reserve=${GPU_CHECK_RESERVE_S:-10}
grace=5          # seconds between a step's TERM and its KILL (inside the reserve)

plan_of() { local e; for e in "${PLAN[@]}"; do [ "${e%%:*}" = "$1" ] && { e=${e#*:}; echo "${e%%:*}"; return; }; done; }
print_plan() {
  local e total=0 p
  echo "timing plan (seconds; deadline ${budget} s after the start, ${reserve} s of it kept for the end):"
  for e in "${PLAN[@]}"; do
    p=${e#*:}; p=${p%%:*}; total=$((total + p))
    printf '  %-14s %4d  %s\n' "${e%%:*}" "$p" "${e#*:*:}"
  done
  printf '  %-14s %4d\n  %-14s %4d  (budget %d)\n' reserve "$reserve" total "$((total + reserve))" "$budget"
}
if [ "${1:-}" = "--plan" ]; then print_plan; exit 0; fi

t_start=$(date +%s)
deadline=$((t_start + budget))
last_step=${PLAN[-1]%%:*}
dry=${GPU_CHECK_DRY:-0}
export OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT" || exit 1
work=$(mktemp -d /tmp/gpu_check.XXXXXX)
log="$OUT/gpu_check.log"
steps="$OUT/steps.tsv"
py=${PYTHON:-python3}
site=${GPU_CHECK_SITE:-/tmp/site}
# PYTHONSAFEPATH: `python -m` must not put the checkout first on sys.path, where ./dskc (without the package-dir
# mapping of dskc.templates / dskc.autotune / dskc.model) would shadow the installed package.
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 TRITON_DEFAULT_FP_FUSION=1 DSKC_CACHE_DIR=${DSKC_CACHE_DIR:-/tmp/dskc-cache}
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if [ "$dry" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
if [ -z "${DSKC_NVCC:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export DSKC_NVCC=/usr/local/cuda/bin/nvcc
fi
printf 'step\tplan_s\tlimit_s\ttook_s\trc\tstatus\tdetail\n' > "$steps"
: > "$log"

now() { date +%s; }
say() { echo "[gpu_check +$(( $(now) - t_start ))s] $*"; echo "[gpu_check +$(( $(now) - t_start ))s] $*" >> "$log"; }
record() {  # record STEP LIMIT TOOK RC STATUS DETAIL
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$(plan_of "$1")" "$2" "$3" "$4" "$5" "${6//$'\t'/ }" >> "$steps"
  say "$1: $5 (rc $4, ${3} s of ${2} s) $6"
  write_summary
}

# step NAME [MIN]: begin a step: STEP, STEP_LIMIT and STEP_END; false (and recorded as skipped) with < MIN s left.
step() {
  local plan left
  STEP=$1; plan=$(plan_of "$1"); left=$((deadline - reserve - $(now)))
  STEP_LIMIT=$(( plan < left ? plan : left ))
  [ "$1" = "$last_step" ] && STEP_LIMIT=$left
  STEP_T0=$(now); STEP_END=$((STEP_T0 + STEP_LIMIT))
  if (( STEP_LIMIT < ${2:-10} )); then record "$1" "$STEP_LIMIT" 0 - skipped "no time left"; return 1; fi
  echo "== [$STEP] limit ${STEP_LIMIT} s" >> "$log"
}

# run CMD...: run CMD until the step's end (TERM, then KILL after $grace s), its output to the log; record it.
run() {
  local left=$((STEP_END - $(now))) start rc status detail cmd
  if (( left < 3 )); then record "$STEP" "$STEP_LIMIT" "$(( $(now) - STEP_T0 ))" - skipped "no time left"; return; fi
  cmd="$*"; echo "\$ ${cmd:0:300}" >> "$log"
  start=$(stat -c %s "$log")
  timeout -k "$grace" "$left" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in 0) status=ok;; 124|137) status=timeout;; 5) status="no tests";; *) status=failed;; esac
  # pytest's closing tally (e.g. "3 failed, 120 passed in 80.1s"), else the step's last output line
  detail=$(tail -c +"$((start + 1))" "$log" | grep -E '^=* ?[0-9/]+ (passed|failed|errors?|skipped|deselected|warnings?|tests? collected)' \
           | tail -n 1)
  [ -n "$detail" ] || detail=$(tail -c +"$((start + 1))" "$log" | grep -v '^\s*$' | tail -n 1)
  detail=$(echo "$detail" | sed 's/=\{3,\}//g; s/^ *//; s/ *$//' | cut -c 1-200)
  record "$STEP" "$STEP_LIMIT" "$(( $(now) - STEP_T0 ))" "$rc" "$status" "$detail"
}

write_summary() {  # summary.md: the steps and failed tests ($work/head.md, printed at the end), then the tables
  local f
  {
    echo "# dskc GPU check ($(date -u +%FT%TZ)$([ "$dry" = 1 ] && echo ', DRY MODE: CPU, no GPU figures'))"
    echo
    echo "- host: ${gpu_line:-?}; ${versions:-?}"
    echo "- wall time: $(( $(now) - t_start )) s of a ${budget}-s deadline (plan: bash bench/gpu_check.sh --plan)"
    echo "- files: gpu_check.log (everything), steps.tsv, env.json, cutlass.json, bench/<gpu>/{headline,rest}.json"
    echo
    echo "| step | plan s | limit s | took s | rc | status | detail |"
    echo "|---|---|---|---|---|---|---|"
    tail -n +2 "$steps" | sed 's/|/\//g; s/\t/ | /g; s/^/| /; s/$/ |/'
    if grep -qE '^(FAILED|ERROR) ' "$log"; then
      echo; echo "## Failed tests"; echo; grep -E '^(FAILED|ERROR) ' "$log" | head -n 60 | sed 's/^/    /'
    fi
  } > "$work/head.md"
  { cat "$work/head.md"; for f in "$work"/table-*.md; do [ -f "$f" ] && { echo; cat "$f"; }; done; } > "$OUT/summary.md"
}

table() {  # table NAME FILE: the result FILE as markdown for the summary (well under a second: no torch import),
  local left=$((deadline - $(now) - 2))  # bounded by the deadline too, as it may follow the last step
  (( left > 10 )) && left=10
  (( left > 0 )) && [ -f "$2" ] && timeout "$left" "$py" -m dskc.benchmark.gpucheck table "$2" \
    > "$work/table-$1.md.tmp" 2>> "$log" && { printf '## %s\n\n' "$1"; cat "$work/table-$1.md.tmp"; } > "$work/table-$1.md"
  write_summary
}

install_site() {  # the carried wheels (except a dskc wheel, which could be older than this checkout), then dskc
  set -e
  local deps
  deps=$(compgen -G ".whl/*.whl" | grep -v '/dskc-' || true)
  if [ -n "$deps" ]; then
    # shellcheck disable=SC2086
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $deps
  else
    echo "WARNING: no wheels in .whl/: call with carry [\".whl\"] (optuna, nvidia-cutlass are not on the host)"
  fi
  rm -rf "$site/dskc" "$site"/dskc-*.dist-info "$work/wheel"
  # a wheel keeps the torch_dynamo_backends entry point; a setuptools < 77 cannot build it: copy the folders then
  if "$py" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$work/wheel" . >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$work"/wheel/dskc-*.whl
  else
    echo "no dskc wheel could be built here: copying the package folders (no dynamo backend entry point)"
    mkdir -p "$site" && cp -r dskc "$site/dskc" && cp -r templates "$site/dskc/templates" \
      && cp -r autotune "$site/dskc/autotune" && cp -r model "$site/dskc/model"
  fi
  "$py" -c 'import dskc, dskc.templates, dskc.model, dskc.benchmark; print("dskc from", dskc.__file__)'
  case $("$py" -c 'import dskc; print(dskc.__file__)') in "$site"/*) ;; *) echo "dskc is not imported from $site"; exit 3;; esac
}

wait_prebuild() {  # until the background CUTLASS builds end or $1 s pass; recorded as step cutlass-builds
  local until=$(( $(now) + $1 )) rc
  while kill -0 "$prebuild_pid" 2>/dev/null && (( $(now) < until )); do sleep 1; done
  if kill -0 "$prebuild_pid" 2>/dev/null; then rc=-; else wait "$prebuild_pid"; rc=$?; fi
  cat "$work/prebuild.log" >> "$log"
  printf '%s\t-\t-\t-\t%s\t%s\t%s\n' cutlass-builds "$rc" \
    "$([ "$rc" = 0 ] && echo ok || { [ "$rc" = - ] && echo "still running" || echo failed; })" \
    "$(grep -E '^\[prebuild\] [0-9]+ built' "$work/prebuild.log" | tail -n 1)" >> "$steps"
}

finish() {
  [ -n "${prebuild_pid:-}" ] && kill "$prebuild_pid" 2>/dev/null
  write_summary
  cat "$work/head.md"
  echo "(the bench tables follow in summary.md)"
  rm -rf "$work"
}
trap finish EXIT
export py site work

print_plan | tee -a "$log"
gpu_line=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
versions=$(timeout 60 "$py" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
  "triton", triton.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -n 1)
say "start in $PWD; OUT=$OUT; GPU: ${gpu_line:-none}; $versions"
[ "$dry" = 1 ] && say "DRY MODE: pytest steps collect only, bench steps run tiny shapes through the interpreter"

pytest=("$py" -m pytest -p no:cacheprovider -rfE -v --continue-on-collection-errors)
bench=("$py" -m dskc.cli bench --out "$OUT/bench" --json-only)
if [ "$dry" = 1 ]; then pytest+=(--collect-only -q); bench+=(--smoke); fi
xdist=()
"$py" -c 'import xdist' 2>/dev/null && xdist=(-n "${GPU_CHECK_WORKERS:-8}")

step install && run bash -c "$(declare -f install_site); install_site"
( exec env DSKC_JOBS="$(nproc)" timeout -k "$grace" "$((deadline - reserve - $(now)))" \
  "$py" -m dskc.benchmark.gpucheck prebuild ) > "$work/prebuild.log" 2>&1 &
prebuild_pid=$!

step env && run "$py" -m dskc.benchmark.gpucheck env "$OUT/env.json"
step stems && run "${pytest[@]}" "${xdist[@]}" tests/kernels --ignore-glob='*/test_reports_*'
step model && run "${pytest[@]}" "${xdist[@]}" tests/model/test_model_gpu.py tests/compiler/test_block_fusion.py \
  tests/compiler/test_decode_graphs.py::test_gpu_decode_graphs_replay_the_compiled_forward \
  tests/compiler/test_aot_load.py::test_gpu_run_from_dir_compiles_nothing
if step headline 30; then
  run "${bench[@]}" --suite headline --torch-compile off --time-limit-s "$((STEP_END - $(now) - 12))"
  table headline "$(compgen -G "$OUT/bench/*/headline.json" | head -n 1)"
fi
if step cutlass; then
  wait_prebuild "$((STEP_LIMIT - 20))"
  run "${pytest[@]}" -m gpu tests/cutlass/test_cutlass_gpu.py tests/compiler/test_cutlass_selection.py \
    tests/autotune/test_autotune_backends.py
fi
if step cutlass-bench; then
  run "${pytest[@]}" -m gpu bench/bench_cutlass.py --benchmark-enable --benchmark-json "$OUT/cutlass.json" \
    --benchmark-max-time 0.25
  table cutlass "$OUT/cutlass.json"
fi
step autotune && run "${pytest[@]}" -m gpu tests/autotune/test_autotune_gpu.py
if step rest 20; then
  left=$((STEP_END - $(now) - 12))
  run "${bench[@]}" --suite rest --time-limit-s "$left" --budget-s "$((left / 2))" --compile-budget-s 30
  table rest "$(compgen -G "$OUT/bench/*/rest.json" | head -n 1)"
fi
say "done"
! grep -qE $'\t(failed|timeout)\t' "$steps"
