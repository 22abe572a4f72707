"""Cross-compiled reports of the MoE stems' default configs (no GPU needed): tensor cores, no spills.

Figures (triton 3.9, E=8, M=4096, DeepSeek-V3's (N, K) = (2048, 7168) for w13 and (7168, 2048) for w2), recorded
in templates/triton/grouped_gemm.py: fp8 SwiGLU+quant 220 registers QGMMA on sm_90a, 234 UTCQMMA on sm_100a;
bf16 SwiGLU 197 HGMMA; moe_route (E=256, top-8 of 4/8 groups) 64 registers; moe_permute kernels <= 128.
"""
import pytest

from dskc.build.report import kernel_report
from dskc.templates import registry

W13 = {"E": 8, "M": 4096, "N": 2048, "K": 7168, "layout": "contiguous"}
W2 = {"E": 8, "M": 4096, "N": 7168, "K": 2048, "layout": "contiguous"}

CASES = [
    ({**W13, "dtype": "fp8", "epilogue": "swiglu_quant"}, "sm90a", "QGMMA"),
    ({**W2, "dtype": "fp8", "epilogue": "weight"}, "sm90a", "QGMMA"),
    ({**W2, "dtype": "fp8", "epilogue": "none", "layout": "masked"}, "sm90a", "QGMMA"),
    ({**W13, "dtype": "bf16", "epilogue": "swiglu"}, "sm90a", "HGMMA"),
    ({**W2, "dtype": "bf16", "epilogue": "weight"}, "sm90a", "HGMMA"),
    ({**W13, "dtype": "fp8", "epilogue": "swiglu_quant"}, "sm100a", "UTCQMMA"),
    ({**W2, "dtype": "fp8", "epilogue": "weight"}, "sm100a", "UTCQMMA"),
    ({**W13, "dtype": "bf16", "epilogue": "swiglu"}, "sm100a", "UTCHMMA"),
    ({**W13, "dtype": "bf16", "epilogue": "swiglu"}, "sm80", "HMMA"),     # sm_80: bf16 only (no e4m3 types)
]


@pytest.mark.parametrize("problem,arch,op", CASES,
                         ids=[f"{p['dtype']}-{p['epilogue']}-{p['layout']}-{a}" for p, a, _ in CASES])
def test_grouped_gemm_default_uses_tensor_cores_without_spills(problem, arch, op):
    (r,) = kernel_report("grouped_gemm", problem, arch)
    assert op in r.tensor_core_ops, r
    assert not r.spills and r.stack_bytes == 0, r


@pytest.mark.parametrize("arch", ["sm90a", "sm100a"])
def test_route_and_permute_compile_without_spills(arch):
    route = kernel_report("moe_route", {"T": 4096, "E": 256, "top_k": 8, "n_groups": 8, "n_limited_groups": 4,
                                        "sigmoid": True, "has_bias": True}, arch)
    perm = kernel_report("moe_permute", {"T": 4096, "E": 256, "top_k": 8, "D": 7168, "align": 128,
                                         "masked": False}, arch)
    assert [r.name.split("[")[0] for r in route + perm] == [
        "moe_route_kernel", "moe_count_kernel", "moe_scan_kernel", "moe_scatter_kernel", "moe_fill_rows_kernel",
        "moe_gather_kernel", "moe_combine_kernel"]
    for r in route + perm:
        assert not r.spills and r.stack_bytes == 0, r


def test_moe_stems_are_registered_with_valid_defaults():
    assert {"moe_route", "moe_permute", "grouped_gemm"} <= set(registry.stems())
    gg = registry.get("grouped_gemm")
    for family in ("sm80", "sm90", "sm100"):
        for problem, _, _ in CASES:
            assert registry.satisfies(gg, gg.DEFAULTS[family], problem), (family, problem)
    assert registry.satisfies(registry.get("moe_permute"), registry.get("moe_permute").DEFAULTS["sm90"],
                              {"T": 1, "E": 256, "top_k": 8, "D": 7168, "align": 128, "masked": True})
