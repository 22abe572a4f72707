"""Every stem's sm_90a default, cross-compiled: no spills, no stack, and wgmma where the stem multiplies matrices.

CI runs this file with triton 3.9 (`./dev test`) and with triton 3.6, the GPU host's (.ci/triton36.sh), so it states
what holds on both. Registers differ between them (2026-11, the problems below): fp8_gemm_1d2d 184 (3.6: 254),
bf16_gemm 101 (254), grouped_gemm fp8 254 (254), mla_decode split 207 (212), mla_prefill 237 (254); the rest <= 128.
The problems are those of test_reports_gemm / _moe / _mla / _lean, so in one run the builds come from the cache.
"""
import pytest

from dskc.build.report import kernel_report
from dskc.templates import registry

# stem -> (problem, the wgmma opcode its main kernel must use, or None for stems without a matrix product)
SM90 = {
    "fp8_gemm_1d2d": ({"M": 4096, "N": 4096, "K": 4096}, "QGMMA"),
    "bf16_gemm": ({"M": 4096, "N": 4096, "K": 4096}, "HGMMA"),
    "grouped_gemm": ({"E": 8, "M": 4096, "N": 2048, "K": 7168, "layout": "contiguous", "dtype": "fp8",
                      "epilogue": "swiglu_quant"}, "QGMMA"),
    "mla_decode": (dict(batch=64, s_q=1, h_q=128, seqlen=4096, page_size=64, kv_fp8=0), "HGMMA"),
    "mla_prefill": (dict(batch=4, seqlen=4096, heads=16, d_qk=192, d_v=128, kv_fp8=0), "HGMMA"),
    "act_quant": ({"M": 4096, "K": 7168}, None),
    "moe_route": ({"T": 4096, "E": 256, "top_k": 8, "n_groups": 8, "n_limited_groups": 4, "sigmoid": True,
                   "has_bias": True}, None),
    "moe_permute": ({"T": 4096, "E": 256, "top_k": 8, "D": 7168, "align": 128, "masked": False}, None),
    "mla_rope": (dict(tokens=4096, h_q=16, kv_fp8=1), None),
    # the lean decode step's stems, at test_reports_lean's problems (more of their variants there)
    "mla_step": ({"batch": 64, "s_q": 1, "split": 1}, None),
    "mla_absorb": ({"tokens": 64, "heads": 128, "nope": 128, "v_dim": 128, "op": "q"}, "HGMMA"),
    "moe_gate": ({"T": 64, "E": 256, "D": 7168}, "HGMMA"),
}


def test_every_stem_is_listed():
    assert sorted(SM90) == registry.stems()


@pytest.mark.parametrize("stem", sorted(SM90))
def test_sm90_default_has_no_spills_and_uses_wgmma(stem):
    problem, wgmma = SM90[stem]
    reports = kernel_report(stem, problem, "sm90a")
    assert reports
    for r in reports:
        assert not r.spills and r.stack_bytes == 0 and r.registers <= 255, r
    if wgmma is not None:
        assert wgmma in reports[0].tensor_core_ops, reports[0]
