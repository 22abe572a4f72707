#!/usr/bin/env bash
# The whole GPU check in one call, from the repository root of a GPU host (offline is fine):
#   1. install into /tmp/site: the wheels carried in .whl/ (optuna, nvidia-cutlass, ...: see
#      ../shared/tools/offline-wheels.sh), then dskc itself built from this checkout (pure Python, no network);
#   2. the GPU test tier: pytest -m gpu over tests/;
#   3. dskc bench --suite all, writing bench/results/<gpu>/all.{json,md,png} (partial JSON after each sub-suite).
# A log goes to $OUT/gpu_check.log when OUT is set (else /tmp/gpu_check.log); the bench files are copied to $OUT.
# Time limits (seconds, environment): GPU_CHECK_TEST_S (default 200) for the tests, GPU_CHECK_BENCH_S (330) for
# the bench, GPU_CHECK_SUITE_S (70) per bench sub-suite and GPU_CHECK_COMPILE_S (25) of torch.compile max-autotune
# rows per sub-suite (tens of seconds per shape); together they stay inside a 10-minute call.
# Exit status: 0 when both steps passed, else the first failing step's status.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-/tmp}
log="$out/gpu_check.log"
exec > >(tee -a "$log") 2>&1
# PYTHONSAFEPATH: `python -m` must not put the checkout first on sys.path, where ./dskc (without the package-dir
# mapping of dskc.templates / dskc.autotune / dskc.model) would shadow the installed package.
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 TRITON_DEFAULT_FP_FUSION=1 DSKC_CACHE_DIR=${DSKC_CACHE_DIR:-/tmp/dskc-cache}
unset TRITON_INTERPRET
py=${PYTHON:-python3}
site=${GPU_CHECK_SITE:-/tmp/site}

echo "== gpu_check $(date -u +%FT%TZ) in $PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"
$py -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton",
triton.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())'

echo "== install"
# Carried wheels (optuna, nvidia-cutlass, ...) except a dskc wheel, which could be older than this checkout.
deps=$(compgen -G ".whl/*.whl" | grep -v '/dskc-' || true)
if [ -n "$deps" ]; then
  # shellcheck disable=SC2086
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $deps \
    || { echo "installing the carried wheels in .whl/ failed"; exit 3; }
fi
# dskc itself from this checkout: a wheel (keeps the torch_dynamo_backends entry point); if this host's setuptools
# cannot build it (needs >= 77), the package folders copied in the installed layout (no entry point then).
rm -rf /tmp/dskc-wheel "$site/dskc" "$site"/dskc-*.dist-info
if $py -m pip wheel -q --no-deps --no-build-isolation --no-index -w /tmp/dskc-wheel . ; then
  $py -m pip install -q --no-index --no-deps --no-compile --target "$site" /tmp/dskc-wheel/dskc-*.whl \
    || { echo "installing the dskc wheel failed"; exit 3; }
else
  echo "WARNING: no dskc wheel could be built here; copying the package folders (dynamo backend entry point absent)"
  mkdir -p "$site" && cp -r dskc "$site/dskc" && cp -r templates "$site/dskc/templates" \
    && cp -r autotune "$site/dskc/autotune" && cp -r model "$site/dskc/model" || exit 3
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
$py -c 'import dskc, dskc.templates, dskc.model, dskc.benchmark; print("dskc from", dskc.__file__)' || exit 3
case $($py -c 'import dskc; print(dskc.__file__)') in "$site"/*) ;; *) echo "dskc is not imported from $site"; exit 3;; esac

echo "== GPU tests (pytest -m gpu tests/)"
timeout -k 10 "${GPU_CHECK_TEST_S:-200}" $py -m pytest -m gpu tests/ -q -p no:cacheprovider
tests_rc=$?
echo "GPU tests exit status: $tests_rc"

echo "== dskc bench --suite all"
timeout -k 10 "${GPU_CHECK_BENCH_S:-330}" $py -m dskc.cli bench --suite all --out bench/results \
  --budget-s "${GPU_CHECK_SUITE_S:-70}" --compile-budget-s "${GPU_CHECK_COMPILE_S:-25}"
bench_rc=$?
echo "bench exit status: $bench_rc"

gpu_dir=$($py -c 'import torch; from dskc.benchmark.measure import gpu_slug; print(gpu_slug(torch.cuda.get_device_name()))' \
  2>/dev/null || true)
result="bench/results/${gpu_dir:-NO-GPU}/all.json"
if [ -n "${OUT:-}" ] && [ -n "$gpu_dir" ] && [ -d "bench/results/$gpu_dir" ]; then
  cp "bench/results/$gpu_dir"/all.* "$OUT"/ 2>/dev/null || echo "no bench files to copy"
fi
if ! $py -m dskc.cli bench --validate "$result" && [ "$bench_rc" -eq 0 ]; then
  bench_rc=4
fi
echo "== done: tests $tests_rc, bench $bench_rc; results in ${result%/all.json}/"
[ "$tests_rc" -ne 0 ] && exit "$tests_rc"
exit "$bench_rc"
