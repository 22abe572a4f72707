"""CUTLASS stems without nvcc: spaces, constraints, candidates, rendering, failure results, ptxas parsing."""
from __future__ import annotations

import re
import stat
import time

import pytest

from dskc import knobs
from dskc.build import nvcc
from dskc.templates import cutlass

from dskc.templates.cutlass.spaces import VERIFIED as OTHER_CONFIGS

PROBLEMS = {"sm90_fp8_grouped_gemm_1d2d": {"G": 8, "M": 4096, "N": 4096, "K": 7168},
            "sm90_fp8_gemm_1d2d": {"M": 4096, "N": 2112, "K": 7168},
            "sm90_bf16_gemm": {"M": 4096, "N": 4096, "K": 4096}}


def test_stems_and_ops():
    assert cutlass.stems() == sorted(OTHER_CONFIGS)
    assert set(cutlass.OPS) == {"fp8_grouped_gemm_1d2d", "fp8_gemm_1d2d", "bf16_gemm"}
    with pytest.raises(KeyError, match="no CUTLASS stem implements op 'mla_decode'"):
        cutlass.candidates("mla_decode", "sm90a")
    with pytest.raises(KeyError, match="unknown CUTLASS stem"):
        cutlass.get("sm90_nope")


@pytest.mark.parametrize("stem", sorted(OTHER_CONFIGS))
def test_defaults_and_others_are_valid(stem):
    spec = cutlass.get(stem)
    assert set(spec.defaults) == {"sm90"}
    for cfg in (cutlass.default_config(stem, "sm90a"), *OTHER_CONFIGS[stem]):
        assert cutlass.violations(stem, cfg, PROBLEMS[stem]) == [], cfg
    flops, moved = spec.cost(PROBLEMS[stem])
    p = PROBLEMS[stem]
    assert flops == 2.0 * p["M"] * p["N"] * p["K"] and moved > 0


@pytest.mark.parametrize("op,stem", [("fp8_grouped_gemm_1d2d", "sm90_fp8_grouped_gemm_1d2d"),
                                     ("grouped_gemm", "sm90_fp8_grouped_gemm_1d2d"),
                                     ("fp8_gemm_1d2d", "sm90_fp8_gemm_1d2d"), ("bf16_gemm", "sm90_bf16_gemm")])
def test_candidates(op, stem):
    found = cutlass.candidates(op, "sm90a", PROBLEMS[stem])
    assert found[0] == (stem, cutlass.default_config(stem, "sm90a"))
    assert len(found) >= 4
    assert len({tuple(sorted(c.items())) for _, c in found}) == len(found)      # no duplicates
    for s, cfg in found:
        assert s == stem and cutlass.violations(stem, cfg, PROBLEMS[stem]) == []
    assert cutlass.candidates(op, "sm90a", PROBLEMS[stem], limit=2) == found[:2]
    # CUTLASS 3.x Hopper code only: other targets get no candidates (the Triton stems cover them).
    assert cutlass.candidates(op, "sm80") == [] and cutlass.candidates(op, "sm100a") == []


def test_problem_constraints_filter_candidates():
    assert cutlass.candidates("fp8_gemm_1d2d", "sm90a", {"M": 64, "N": 2112, "K": 100}) == []
    errors = cutlass.violations("sm90_fp8_gemm_1d2d", cutlass.default_config("sm90_fp8_gemm_1d2d", "sm90a"),
                                {"M": 64, "N": 2112, "K": 100})
    assert errors == ["constraint failed: K % 128 == 0"]


@pytest.mark.parametrize("stem", sorted(OTHER_CONFIGS))
def test_render(stem):
    for cfg in (cutlass.default_config(stem, "sm90a"), *OTHER_CONFIGS[stem]):
        src = cutlass.render(stem, cfg)
        assert "{{" not in src and "{%" not in src
        assert f"Shape<Int<{cfg['TILE_M']}>, Int<{cfg['TILE_N']}>, Int<{cfg['TILE_K']}>>" in src
        assert f"Shape<Int<{cfg['CLUSTER_M']}>, Int<{cfg['CLUSTER_N']}>, _1>" in src
        sched = "Cooperative" if cfg["SCHEDULE"] == "cooperative" else "Pingpong"
        assert re.search(rf"using KernelSchedule = cutlass::gemm::Kernel\w*{sched}", src)
        assert 'extern "C"' in src and '#include "dskc_cutlass.cuh"' in src


@pytest.mark.parametrize("config,stage,needle", [
    ({"TILE_K": 64}, "space", "TILE_K=64 is not in the space"),
    ({"TILE_M": 256, "SCHEDULE": "pingpong"}, "constraints", "SCHEDULE != 'pingpong' or TILE_M in (64, 128)"),
    ({"TILE_M": 64, "SCHEDULE": "cooperative"}, "constraints", "TILE_M % 128 == 0"),
    ({"TILE_N": 256}, "constraints", "TILE_N == 128"),       # nvcc: "Accumulator and scaleB must have same shape"
    ({"BLOCK_M": 64}, "space", "unknown parameter 'BLOCK_M'"),
])
def test_invalid_config_is_a_result_before_nvcc(config, stage, needle):
    cfg = {**cutlass.default_config("sm90_fp8_grouped_gemm_1d2d", "sm90a"), **config}
    start = time.monotonic()
    with knobs.scope(nvcc="/nonexistent/nvcc"):              # proves nvcc is never reached
        res = cutlass.build("sm90_fp8_grouped_gemm_1d2d", cfg, "sm90a")
    assert time.monotonic() - start < 5
    assert not res.ok and res.stage == stage and needle in res.message, res
    with pytest.raises(ValueError, match="invalid config"):
        cutlass.render("sm90_fp8_grouped_gemm_1d2d", cfg)


def test_wrong_arch_is_a_result():
    res = cutlass.build("sm90_bf16_gemm", cutlass.default_config("sm90_bf16_gemm", "sm90a"), "sm80")
    assert not res.ok and res.stage == "space" and "sm90a" in res.message


def _fake_nvcc(tmp_path, body: str):
    exe = tmp_path / "nvcc"
    exe.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'Cuda compilation tools, release 13.0, "
                   "V13.0.88'; exit 0; fi\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def test_compiler_rejection_is_a_result_with_its_message(tmp_path, capsys):
    exe = _fake_nvcc(tmp_path, "echo 'kernel.cu(41): error: static assertion failed with \"tile too big\"' >&2\n"
                               "echo 'note: instantiated from here' >&2\nexit 2\n")
    items = [(stem, cutlass.default_config(stem, "sm90a")) for stem in sorted(OTHER_CONFIGS)]
    items.append(("sm90_fp8_gemm_1d2d", {**items[1][1], "TILE_K": 256}))     # caught before nvcc
    with knobs.scope(nvcc=exe, cache_dir=tmp_path / "cache", jobs=2):
        results = cutlass.build_many(items, "sm90a")
    assert [r.ok for r in results] == [False] * 4
    for r in results[:3]:
        assert r.stage == "nvcc" and 'static assertion failed with "tile too big"' in r.message
        assert "note: instantiated" not in r.message                         # only the error lines
    assert results[3].stage == "space"
    err = capsys.readouterr().err
    assert err.count("[dskc nvcc ") == 3 and "FAILED (nvcc)" in err
    assert not any((tmp_path / "cache" / "cutlass").glob("[0-9a-f]*"))       # failures are not cached


def test_missing_nvcc_is_a_result(tmp_path):
    with knobs.scope(nvcc=str(tmp_path / "no-nvcc"), cache_dir=tmp_path):
        res = cutlass.build("sm90_bf16_gemm", cutlass.default_config("sm90_bf16_gemm", "sm90a"), "sm90a")
    assert not res.ok and res.stage == "tools" and "DSKC_NVCC" in res.message


def test_cache_key_covers_config_source_and_toolchain():
    src = cutlass.render("sm90_bf16_gemm", cutlass.default_config("sm90_bf16_gemm", "sm90a"))
    job = nvcc.NvccJob("sm90_bf16_gemm", (("TILE_M", 128),), src, "sm90a", depends=(str(cutlass.HEADER),))
    tools = (("cutlass", "4.2.0.0"), ("nvcc", "V13.0.88"))
    base = nvcc.cache_key(job, tools).digest()
    import dataclasses
    assert nvcc.cache_key(dataclasses.replace(job, config=(("TILE_M", 64),)), tools).digest() != base
    assert nvcc.cache_key(dataclasses.replace(job, source=src + "\n"), tools).digest() != base
    assert nvcc.cache_key(job, (("cutlass", "4.2.0.0"), ("nvcc", "V13.1.0"))).digest() != base
    assert nvcc.cache_key(job, tools).kind == "cutlass"


PTXAS = """ptxas info    : Compiling entry function '_Z4fillv' for 'sm_90a'
ptxas info    : Function properties for _Z4fillv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
ptxas info    : Compiling entry function '_ZN7cutlass13device_kernelE' for 'sm_90a'
ptxas info    : Function properties for _ZN7cutlass13device_kernelE
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 168 registers, used 2 barriers, 1024 bytes smem
"""


def test_parse_ptxas():
    kernels = nvcc.parse_ptxas(PTXAS)
    assert [k["name"] for k in kernels] == ["_Z4fillv", "_ZN7cutlass13device_kernelE"]
    assert kernels[1] == {"name": "_ZN7cutlass13device_kernelE", "registers": 168, "stack": 8,
                          "spill_stores": 12, "spill_loads": 16, "shared": 1024}
    assert nvcc.tensor_core_ops("  QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4]\n HGMMA.x\n IMAD") == \
        ["HGMMA", "QGMMA"]
