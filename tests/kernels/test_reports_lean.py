"""Cross-compiled reports (sm_90a, no GPU needed) of the kernels the lean decode step added or extended, at
DeepSeek-V3's decode shapes with their default configs: no spills, and wgmma (HGMMA / QGMMA) where they multiply
matrices. Figures are recorded in each stem's DEFAULTS comment."""
import pytest

from dskc.build.report import kernel_report
from dskc.templates import registry

V3_ROUTE = {"T": 64, "E": 256, "top_k": 8, "n_groups": 8, "n_limited_groups": 4, "sigmoid": 1, "has_bias": 1}
V3_GEMM1 = {"E": 257, "M": 257 * 64, "N": 2048, "K": 7168, "dtype": "fp8", "layout": "masked",
            "epilogue": "swiglu_quant", "rows_per_id": 1, "out_dtype": "fp8", "stacked_up": 1}

CASES = [   # (stem, problem, tensor-core op or None, kernels)
    ("mla_step", {"batch": 64, "s_q": 1, "split": 1}, None, ["mla_step_kernel"]),
    ("mla_step", {"batch": 64, "s_q": 1, "split": 0}, None, ["mla_step_kernel"]),
    ("mla_absorb", {"tokens": 64, "heads": 128, "nope": 128, "v_dim": 128, "op": "q"}, "HGMMA",
     ["mla_q_absorb_kernel"]),
    ("mla_absorb", {"tokens": 64, "heads": 128, "nope": 128, "v_dim": 128, "op": "o", "quant": 1}, "HGMMA",
     ["mla_o_absorb_kernel"]),
    ("mla_absorb", {"tokens": 64, "heads": 4, "nope": 64, "v_dim": 64, "op": "o", "quant": 1}, "HGMMA",
     ["mla_o_absorb_kernel"]),
    ("mla_decode", {"batch": 64, "s_q": 1, "h_q": 128, "seqlen": 4096, "split": 0}, "HGMMA",
     ["mla_decode_split_kernel"]),
    ("moe_gate", {"T": 64, "E": 256, "D": 7168}, "HGMMA", ["moe_gate_kernel"]),
    ("moe_route", {**V3_ROUTE, "n_shared": 1, "align": 1}, None, ["moe_route_align_kernel"]),
    ("moe_route", {**V3_ROUTE, "n_shared": 1}, None, ["moe_route_kernel"]),
    ("grouped_gemm", {**V3_GEMM1, "gather": "a"}, "QGMMA", ["grouped_gemm_kernel"]),
    ("grouped_gemm", {**V3_GEMM1, "N": 7168, "K": 2048, "epilogue": "weight", "out_dtype": "bf16",
                      "stacked_up": 0, "gather": "weight"}, "QGMMA", ["grouped_gemm_kernel"]),
    ("grouped_gemm", {"E": 1, "M": 64, "N": 18432, "K": 7168, "dtype": "fp8", "layout": "contiguous",
                      "epilogue": "swiglu_quant", "rows_per_id": 0, "out_dtype": "fp8", "stacked_up": 1}, "QGMMA",
     ["grouped_gemm_kernel"]),
    ("bf16_gemm", {"M": 64, "N": 129280, "K": 7168, "out_dtype": "fp32"}, "HGMMA", ["bf16_gemm_kernel"]),
    ("act_quant", {"M": 64, "K": 7168, "op": "add_rmsnorm_normed"}, None, ["rmsnorm_quant_kernel"]),
    ("act_quant", {"M": 64, "K": 7168, "op": "norm"}, None, ["rmsnorm_quant_kernel"]),
    ("moe_permute", {"T": 64, "E": 257, "top_k": 9, "D": 7168, "masked": 1, "shared": 0, "residual": 1,
                     "op": "combine"}, None, ["moe_combine_kernel"]),
]


@pytest.mark.parametrize("stem,problem,op,kernels", CASES,
                         ids=[f"{c[0]}-{c[1].get('op', '')}{c[1].get('gather', '')}-{i}" for i, c in enumerate(CASES)])
def test_lean_kernels_compile_without_spills_and_with_wgmma(stem, problem, op, kernels):
    reports = kernel_report(stem, problem, "sm90a")
    assert [r.name.split("[")[0] for r in reports] == kernels
    for r in reports:
        assert not r.spills and r.stack_bytes == 0, r
        if op is not None:
            assert op in r.tensor_core_ops, r


@pytest.mark.parametrize("tokens", [64, 128])
def test_gate_at_the_rules_config_for_a_prefill_bucket_does_not_spill(tokens):
    """The rule's config past the decode sizes (BLOCK_T 64, where 4 warps spilled 392 bytes: tiny's AOT build)."""
    problem = {"T": tokens, "E": 16, "D": 256}
    cfg = registry.default_config("moe_gate", "sm90a", problem)
    assert cfg["BLOCK_T"] == 64
    for r in kernel_report("moe_gate", problem, "sm90a", config=cfg):
        assert not r.spills and r.stack_bytes == 0 and "HGMMA" in r.tensor_core_ops, r


@pytest.mark.parametrize("tokens", [1, 64, 200, 4096])
def test_residual_gemm_at_the_rules_config_does_not_spill(tokens):
    """The residual-epilogue FP8 GEMM (wo / w2 with the block's residual add) at the config the runtime launches:
    the rule keeps its tiles to 64x128 / 128x64 on 8 warps (128x128, or 64x128 on 4 warps, left stack frames under
    Triton 3.6)."""
    problem = {"M": tokens, "N": 7168, "K": 18432, "residual": 1}
    cfg = registry.default_config("fp8_gemm_1d2d", "sm90a", problem)
    assert cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 64 * 128, cfg
    (r,) = kernel_report("fp8_gemm_1d2d", problem, "sm90a", config=cfg)
    assert not r.spills and r.stack_bytes == 0 and "QGMMA" in r.tensor_core_ops, r
