import pytest

from dskc import knobs
from dskc.build import triton_xc as xc

SIG = {"a": "*fp16", "b": "*fp16", "c": "*fp16", "M": "i32", "N": "i32", "K": "i32",
       "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}


def _spec(bm=64, warps=4, sig=SIG):
    return xc.CompileSpec.make("dskc.build._probe", "probe_dot_kernel", sig, {"BM": bm, "BN": 64, "BK": 64}, warps, 3)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("xc")
    with knobs.scope(cache_dir=d):
        yield d


def test_sm90a_report_shows_wgmma_and_resources(cache_dir):
    r = xc.report(_spec(), "sm90a")
    assert r.arch == "sm90a" and "HGMMA" in r.tensor_core_ops
    assert 0 < r.registers <= 255 and r.shared_bytes > 0 and not r.spills


def test_sm100a_uses_tcgen05(cache_dir):
    assert "UTCHMMA" in xc.report(_spec(), "sm100a").tensor_core_ops


def test_warm_cache_does_not_rebuild(cache_dir):
    xc.report(_spec(bm=128, warps=8), "sm90a")
    before = xc.build_count()
    again = xc.report(_spec(bm=128, warps=8), "sm90a")
    assert xc.build_count() == before and "HGMMA" in again.tensor_core_ops


def test_failing_config_is_a_result_not_a_crash(cache_dir):
    bad = _spec(sig={**SIG, "a": "*not_a_type"})
    out = xc.compile_kernels([bad, _spec()], "sm90a")
    assert isinstance(out[0], xc.CompileError) and isinstance(out[1], xc.KernelReport)


def test_parsers():
    assert xc.parse_spills("  24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads") == (16, 8)
    assert xc.parse_resource_usage("REG:96 STACK:0 SHARED:1024 LOCAL:0")["registers"] == 96
    assert xc.tensor_core_ops("/*0a0*/ QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4] ;\n HMMA.16816") == ["HMMA", "QGMMA"]
