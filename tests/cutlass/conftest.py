"""Shared fixtures of the CUTLASS tests: the two kernels the CPU tier really compiles (once per run, cached in
DSKC_CACHE_DIR, so a warm cache makes them free): the FP8 grouped default and the bf16 dense default."""
from __future__ import annotations

import shutil

import pytest

from dskc import knobs
from dskc.templates import cutlass

CI_BUILDS = ("sm90_fp8_grouped_gemm_1d2d", "sm90_bf16_gemm")


def have_nvcc() -> bool:
    return shutil.which(knobs.get().nvcc) is not None


@pytest.fixture(scope="session")
def default_builds():
    """{stem: NvccBuild} for CI_BUILDS on sm90a, built in parallel; fails (not skips) when a build fails."""
    if not have_nvcc():
        pytest.skip(f"nvcc ({knobs.get().nvcc}) is not on PATH; CUTLASS builds need the CUDA toolkit")
    items = [(stem, cutlass.default_config(stem, "sm90a")) for stem in CI_BUILDS]
    # One CUTLASS build takes 80-130 s alone on 2 busy cores, so two at once may pass the 300 s default limit.
    with knobs.scope(compile_timeout_s=max(knobs.get().compile_timeout_s, 900.0)):
        results = cutlass.build_many(items, "sm90a")
    failed = [r for r in results if not r.ok]
    assert not failed, f"default CUTLASS builds failed: {[(r.name, r.stage, r.message[:2000]) for r in failed]}"
    return {r.name: r for r in results}
