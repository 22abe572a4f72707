"""Real nvcc builds. The default tier compiles exactly two kernels (conftest.CI_BUILDS, once per run, cached in
DSKC_CACHE_DIR); the slow tier compiles every other render (each stem's default and its two VERIFIED configs)."""
from __future__ import annotations

import ctypes
import time

import pytest

from dskc import knobs
from dskc.build import cache, nvcc
from dskc.templates import cutlass
from dskc.templates.cutlass.spaces import VERIFIED

EXPECTED_MMA = {"sm90_fp8_grouped_gemm_1d2d": "QGMMA", "sm90_fp8_gemm_1d2d": "QGMMA", "sm90_bf16_gemm": "HGMMA"}


def _check_build(res, stem, cfg):
    assert res.ok, f"{stem} {cfg}: {res.stage}: {res.message[:3000]}"
    assert res.name == stem and res.arch == "sm90a" and dict(res.config) == cfg
    assert EXPECTED_MMA[stem] in res.tensor_core_ops, res.tensor_core_ops
    assert 64 <= res.registers <= 255
    lib = ctypes.CDLL(res.library)                      # loads on a machine without a GPU (static cudart)
    lib.dskc_kernel_config.restype = ctypes.c_char_p
    text = lib.dskc_kernel_config().decode()
    assert text.startswith(stem) and f"TILE={cfg['TILE_M']}x{cfg['TILE_N']}x{cfg['TILE_K']}" in text
    assert f"SCHEDULE={cfg['SCHEDULE']}" in text


@pytest.mark.parametrize("stem", ["sm90_fp8_grouped_gemm_1d2d", "sm90_bf16_gemm"])
def test_default_build(default_builds, stem):
    res = default_builds[stem]
    _check_build(res, stem, cutlass.default_config(stem, "sm90a"))
    assert not res.spills, (res.spill_store_bytes, res.spill_load_bytes)


def test_second_build_is_a_cache_hit(default_builds):
    items = [(s, cutlass.default_config(s, "sm90a")) for s in default_builds]
    start = time.monotonic()
    again = cutlass.build_many(items, "sm90a", progress=False)
    assert time.monotonic() - start < 10
    for res in again:
        assert res.ok and res.cached and res.seconds == 0.0
        assert res.library == default_builds[res.name].library


def test_workspace_query_runs_without_a_gpu(default_builds):
    lib = ctypes.CDLL(default_builds["sm90_fp8_grouped_gemm_1d2d"].library)
    size, err = ctypes.c_size_t(0), ctypes.create_string_buffer(256)
    fn = lib.dskc_fp8_grouped_gemm_workspace_bytes
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p, ctypes.c_int]
    assert fn(8, 132, ctypes.byref(size), err, 256) == 0 and size.value > 8 * 11 * 8
    small = size.value
    assert fn(64, 132, ctypes.byref(size), err, 256) == 0 and size.value > small
    assert fn(0, 132, ctypes.byref(size), err, 256) == 1 and b"groups must be positive" in err.value


def test_cache_entry_is_verified(default_builds):
    entry = cache.read_meta(__import__("pathlib").Path(default_builds["sm90_bf16_gemm"].library).parent)
    assert entry["tensor_core_ops"] and entry["kernels"]


@pytest.mark.slow
@pytest.mark.parametrize("stem", sorted(VERIFIED))
def test_every_verified_render_builds(stem):
    configs = [cutlass.default_config(stem, "sm90a"), *VERIFIED[stem]]
    with knobs.scope(compile_timeout_s=max(knobs.get().compile_timeout_s, 900.0)):
        results = cutlass.build_many([(stem, c) for c in configs], "sm90a")
    for cfg, res in zip(configs, results):
        _check_build(res, stem, cfg)


@pytest.mark.slow
def test_real_compiler_rejection_is_a_result():
    """A tile the constraints would stop (TILE_K = 64 < the 128-wide scale blocks), rendered past them on purpose:
    CUTLASS's static_assert comes back as a failed result carrying nvcc's message."""
    import jinja2

    cfg = {**cutlass.default_config("sm90_fp8_gemm_1d2d", "sm90a"), "TILE_K": 64}
    src = jinja2.Template((cutlass.HERE / "sm90_fp8_gemm_1d2d.cu.jinja").read_text()).render(**cfg)
    job = nvcc.NvccJob("sm90_fp8_gemm_1d2d", tuple(sorted(cfg.items())), src, "sm90a",
                       include_dirs=(str(cutlass.HERE),), depends=(str(cutlass.HEADER),))
    with knobs.scope(compile_timeout_s=max(knobs.get().compile_timeout_s, 900.0)):
        res = nvcc.build_many([job])[0]
    assert not res.ok and res.stage == "nvcc", res
    assert "error" in res.message and "static assertion failed" in res.message, res.message
