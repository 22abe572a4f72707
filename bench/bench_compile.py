"""Cold and warm cross-compilation of deepseek-v2-lite for sm_90a (no GPU needed): `dskc compile` cost.

Cold: an empty build cache, every kernel built (Triton -> PTX -> cubin, ptxas and cuobjdump reports). Warm: the
same plan again; the cache must serve everything (asserted with the build counter), so the time is lookups only.
"""
from __future__ import annotations

import time

import pytest

from dskc import compiler, knobs
from dskc.build import triton_xc
from dskc.model import Transformer, get_config


@pytest.fixture(scope="module")
def v2_lite_meta():
    return Transformer(get_config("deepseek-v2-lite"), device="meta")


def test_compile_deepseek_v2_lite_sm90a_cold_then_warm(benchmark, v2_lite_meta, tmp_path_factory):
    with knobs.scope(cache_dir=tmp_path_factory.mktemp("cold-cache")):
        t0 = time.perf_counter()
        before = triton_xc.build_count()
        cold_plan = compiler.build(compiler.plan(v2_lite_meta, "sm90a"), progress=False)
        cold_s = time.perf_counter() - t0
        built = triton_xc.build_count() - before
        assert built > 0 and cold_plan.fallbacks == []
        warm = benchmark.pedantic(lambda: compiler.build(compiler.plan(v2_lite_meta, "sm90a"), progress=False),
                                  rounds=3, iterations=1)
        assert triton_xc.build_count() - before == built  # the warm path compiled nothing
        assert warm.fallbacks == [] and len(warm.reports) == len(cold_plan.reports)
    benchmark.extra_info.update(cold_seconds=round(cold_s, 2), kernels_built=built, regions=len(warm.choices),
                                note="CPU cross-compilation time, not kernel performance")
