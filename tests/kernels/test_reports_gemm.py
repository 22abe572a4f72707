"""Cross-compiled reports of the default configs: tensor-core SASS and no spills (no GPU needed).

Figures at M = N = K = 4096 (triton 3.9, ptxas from the wheel), recorded in the stems' DEFAULTS comments:
fp8_gemm_1d2d sm_90a 184 registers QGMMA, sm_100a 168 UTCQMMA, sm_80 168 HMMA (fp16 upcast);
bf16_gemm sm_90a 101 HGMMA, sm_100a 82 UTCHMMA, sm_80 176 HMMA; act_quant kernels 40-56 registers.
The assertions are what holds with both Triton versions CI runs (3.9, and 3.6 of the GPU host's torch 2.11): tensor
cores and no spills; register counts differ (3.6: fp8_gemm_1d2d and bf16_gemm 254 on sm_90a, fp8 183 on sm_80).
"""
import pytest

from dskc.build.report import kernel_report
from dskc.templates import registry

PROBLEM = {"M": 4096, "N": 4096, "K": 4096}

CASES = [
    ("fp8_gemm_1d2d", "sm90a", "QGMMA"),
    ("fp8_gemm_1d2d", "sm100a", "UTCQMMA"),
    ("fp8_gemm_1d2d", "sm80", "HMMA"),
    ("bf16_gemm", "sm90a", "HGMMA"),
    ("bf16_gemm", "sm100a", "UTCHMMA"),
    ("bf16_gemm", "sm80", "HMMA"),
]


@pytest.mark.parametrize("stem,arch,op", CASES)
def test_default_gemm_uses_tensor_cores_without_spills(stem, arch, op):
    reports = kernel_report(stem, PROBLEM, arch)
    assert len(reports) == 1
    r = reports[0]
    assert op in r.tensor_core_ops, r
    assert not r.spills and r.stack_bytes == 0, r
    assert r.registers <= 255


def test_splitk_and_small_tiles_compile_without_spills():
    cfg = {**registry.default_config("fp8_gemm_1d2d", "sm90a"), "BLOCK_M": 64, "BLOCK_N": 256, "SPLIT_K": 4}
    (r,) = kernel_report("fp8_gemm_1d2d", {"M": 64, "N": 2112, "K": 7168}, "sm90a", cfg)
    assert "QGMMA" in r.tensor_core_ops and not r.spills, r


@pytest.mark.parametrize("arch", ["sm90a", "sm80"])
def test_act_quant_kernels_compile_without_spills(arch):
    reports = [r for op in ("quant", "rmsnorm", "add_rmsnorm", "silu_mul")
               for r in kernel_report("act_quant", {"M": 4096, "K": 7168, "op": op}, arch)]
    assert [r.name.split("[")[0] for r in reports] == ["act_quant_kernel", "rmsnorm_quant_kernel",
                                                       "rmsnorm_quant_kernel", "silu_mul_quant_kernel"]
    assert {"HAS_RES=0", "HAS_RES=1"} <= {part for r in reports for part in r.name.replace("[", ",").split(",")}
    for r in reports:
        assert not r.spills and r.stack_bytes == 0, r


def test_stems_are_registered():
    assert {"act_quant", "fp8_gemm_1d2d", "bf16_gemm"} <= set(registry.stems())
