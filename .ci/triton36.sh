#!/usr/bin/env bash
# CI's second leg: dskc on the GPU host's Triton, 3.6 (the Triton of torch 2.11), in its own venv: torch 2.13.0's
# CPU build (as ./dev installs it) with triton 3.6 and numpy < 2.4 (3.6's interpreter calls int() on 1-element
# arrays, which numpy 2.4 refuses). It runs what depends on the Triton version: cross-compilation, the kernel
# reports (spills, wgmma), the AOT output and loading, the autotuner's compile-time pruning, and each stem's
# interpreted kernel tests. Budget: under 6 minutes on 2 cores, the venv included.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-triton36
PY=$VENV/bin/python

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
  "$PY" -m pip install -q torch==2.13.0 "triton==3.6.*" "numpy<2.4" 2>&1 | { grep -v -e "^WARNING: Location" || true; }
  # dskc and what these tests import (not the test extra's transformers / psycopg, which they do not use)
  "$PY" -m pip install -q -e . "triton==3.6.*" "numpy<2.4" pytest pytest-benchmark 2>&1 \
    | { grep -v -e "^WARNING: Location" || true; }
fi
# the combination must import and interpret before anything else is worth running
TRITON_INTERPRET=1 "$PY" - <<'EOF'
import numpy, torch, triton, triton.language as tl
assert triton.__version__.startswith("3.6."), triton.__version__
@triton.jit
def add_one(x, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x + offs, tl.load(x + offs, mask=offs < n) + 1, mask=offs < n)
x = torch.arange(5.0)
add_one[(1,)](x, 5, BLOCK=8)
assert x.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0], x
print(f"triton {triton.__version__}, torch {torch.__version__}, numpy {numpy.__version__}: imports and interprets")
EOF

export TRITON_INTERPRET=1 TRITON_DEFAULT_FP_FUSION=1 DSKC_CACHE_DIR=${DSKC_CACHE_DIR:-$PWD/.dskc-cache}
# each Triton stem's own interpreted tests (the composites fused_moe / deep_gemm / flash_mla / mla_model run in leg one)
k=tests/kernels
# -W: 3.6's interpreter converts 1-element arrays with int() (the numpy < 2.4 pin above), once per kernel argument
"$PY" -m pytest -q -p no:cacheprovider --durations=5 -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" \
  tests/build/test_triton_xc.py $k/test_reports_*.py tests/compiler/test_aot.py tests/compiler/test_aot_load.py \
  tests/autotune/test_autotune_study.py $k/test_act_quant.py $k/test_fp8_gemm.py $k/test_grouped_gemm.py \
  $k/test_moe_route.py $k/test_moe_permute.py $k/test_mla_decode.py $k/test_mla_prefill.py $k/test_mla_rope.py
