"""fp8_gemm (1D2D block-scaled) and bf16_gemm against float64 references (interpreter on CPU, CUDA when present).

In the interpreter the bf16 GEMM is tested with fp16 operands (its tl.dot on bf16 is wrong, REFERENCE.md section 5);
bf16 runs in the gpu tier.
"""
import pytest
import torch

from dskc import knobs
from dskc.ops import bf16_gemm, fp8_gemm
from dskc.templates.triton import bf16_gemm as bf16_tpl
from dskc.templates.triton import fp8_gemm as fp8_tpl

HAS_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not (HAS_GPU or knobs.get().triton_interpret),
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
DEV = "cuda" if HAS_GPU else "cpu"
E4M3 = torch.float8_e4m3fn


def quant_rows(x: torch.Tensor):
    """Per-token 1x128 quantisation in plain PyTorch: (q [M, K] e4m3, s [M, K/128] fp32)."""
    m, k = x.shape
    v = x.float().view(m, k // 128, 128)
    s = v.abs().amax(-1).clamp(min=1e-4) / 448.0
    return (v / s[..., None]).to(E4M3).view(m, k), s


def quant_blocks(w: torch.Tensor):
    """Per 128x128 block quantisation in plain PyTorch: (q [N, K] e4m3, s [ceil(N/128), K/128] fp32)."""
    n, k = w.shape
    nb = -(-n // 128)
    padded = torch.zeros(nb * 128, k)
    padded[:n] = w.float()
    v = padded.view(nb, 128, k // 128, 128)
    s = v.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0
    return (v / s[:, None, :, None]).to(E4M3).view(nb * 128, k)[:n].contiguous(), s


def dequant_ref(a, sa, b, sb) -> torch.Tensor:
    """float64 (a * sa) @ (b * sb)^T."""
    m, k = a.shape
    n = b.shape[0]
    a64 = a.double().cpu() * sa.double().cpu().repeat_interleave(128, dim=1)
    sb_rows = sb.double().cpu().repeat_interleave(128, dim=0)[:n]
    b64 = b.double().cpu() * sb_rows.repeat_interleave(128, dim=1)
    return a64 @ b64.T


def rel_err(out, ref) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def make_fp8(M, N, K, device=DEV):
    a, sa = quant_rows(torch.randn(M, K) * torch.rand(M, 1) * 4)
    b, sb = quant_blocks(torch.randn(N, K) * 0.05)
    return a.to(device), sa.to(device), b.to(device), sb.to(device)


CONFIGS = {
    "sm90": fp8_tpl.DEFAULTS["sm90"],
    "sm80-upcast": fp8_tpl.DEFAULTS["sm80"],
    "splitk-n256": {**fp8_tpl.DEFAULTS["sm90"], "BLOCK_M": 32, "BLOCK_N": 256, "SPLIT_K": 2},
    "n64-splitk3": {**fp8_tpl.DEFAULTS["sm90"], "BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 1, "SPLIT_K": 3},
}


@pytest.mark.parametrize("M,N,K", [(1, 72, 128), (37, 200, 256), (130, 72, 384)])
@pytest.mark.parametrize("out_dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_fp8_gemm_default(M, N, K, out_dtype, tol):
    a, sa, b, sb = make_fp8(M, N, K)
    out = torch.full((M, N), float("nan"), dtype=out_dtype, device=DEV)
    res = fp8_gemm(a, sa, b, sb, out=out, out_dtype=out_dtype)
    assert res is out
    assert not torch.isnan(out).any()
    assert rel_err(out, dequant_ref(a, sa, b, sb)) < tol


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp8_gemm_configs(name):
    M, N, K = 37, 200, 384
    a, sa, b, sb = make_fp8(M, N, K)
    out = torch.full((M, N), float("nan"), dtype=torch.float32, device=DEV)
    fp8_gemm(a, sa, b, sb, out=out, out_dtype=torch.float32, config=CONFIGS[name])
    assert rel_err(out, dequant_ref(a, sa, b, sb)) < 1e-5


def test_fp8_gemm_column_major_scales_and_allocated_out():
    a, sa, b, sb = make_fp8(37, 200, 256)
    sa_cm = sa.t().contiguous().t()  # DeepGEMM keeps activation scales M-major
    out = fp8_gemm(a, sa_cm, b, sb)
    assert out.dtype == torch.bfloat16 and out.shape == (37, 200)
    assert rel_err(out, dequant_ref(a, sa, b, sb)) < 2e-2


def test_fp8_gemm_empty_m():
    a, sa, b, sb = make_fp8(1, 72, 128)
    out = fp8_gemm(a[:0], sa[:0], b, sb)
    assert out.shape == (0, 72)


@pytest.mark.parametrize("M,N,K", [(1, 72, 128), (37, 200, 200), (37, 72, 8)])
@pytest.mark.parametrize("config", ["sm90", "sm80"])
def test_bf16_gemm_fp16_operands(M, N, K, config):
    a = torch.randn(M, K, dtype=torch.float16, device=DEV)
    b = torch.randn(N, K, dtype=torch.float16, device=DEV)
    out = torch.full((M, N), float("nan"), dtype=torch.float16, device=DEV)
    bf16_gemm(a, b, out=out, config=bf16_tpl.DEFAULTS[config])
    ref = a.double().cpu() @ b.double().cpu().T
    assert rel_err(out, ref) < 2e-3


# ---- bad input raises before any launch ----

def test_fp8_gemm_rejects_bad_input():
    a, sa, b, sb = make_fp8(4, 72, 256)
    with pytest.raises(TypeError, match="a must have dtype"):
        fp8_gemm(a.float(), sa, b, sb)
    with pytest.raises(TypeError, match="sb must be"):
        fp8_gemm(a, sa, b, sb.double())
    with pytest.raises(ValueError, match="K differs"):
        fp8_gemm(a, sa, b[:, :128], sb[:, :1])
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_gemm(a[:, :200], sa, b[:, :200], sb)
    with pytest.raises(ValueError, match="sa must be"):
        fp8_gemm(a, sa[:, :1], b, sb)
    with pytest.raises(ValueError, match="sb must be"):
        fp8_gemm(a, sa, b, sb[:, :1])
    with pytest.raises(ValueError, match="contiguous"):
        fp8_gemm(torch.cat([a, a], 1)[:, ::2], sa, b, sb)
    with pytest.raises(ValueError, match="aligned"):
        fp8_gemm(torch.cat([a, a], 1)[:, 1:257], sa, b, sb)
    with pytest.raises(ValueError, match="one device"):
        fp8_gemm(a, sa, b.to("meta"), sb)
    with pytest.raises(ValueError, match="out must have shape"):
        fp8_gemm(a, sa, b, sb, out=torch.empty(4, 71, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(TypeError, match="out_dtype"):
        fp8_gemm(a, sa, b, sb, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="not in"):
        fp8_gemm(a, sa, b, sb, config={"BLOCK_Q": 64})
    with pytest.raises(ValueError, match="BLOCK_K == 128"):
        fp8_gemm(a, sa, b, sb, config={"BLOCK_K": 64})
    with pytest.raises(ValueError, match="SPLIT_K"):
        fp8_gemm(a, sa, b, sb, config={"SPLIT_K": 4})


def test_bf16_gemm_rejects_bad_input():
    a = torch.randn(4, 64, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(TypeError, match="b must have dtype"):
        bf16_gemm(a, a.half())
    with pytest.raises(TypeError, match="a must have dtype"):
        bf16_gemm(a.float(), a.float())
    with pytest.raises(ValueError, match="multiple of 8"):
        bf16_gemm(a[:, :60], a[:, :60])
    with pytest.raises(ValueError, match="K differs"):
        bf16_gemm(a, a[:, :32])
    with pytest.raises(TypeError, match="out must have dtype"):
        bf16_gemm(a, a, out=torch.empty(4, 4, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="out must have shape"):
        bf16_gemm(a, a, out=torch.empty(4, 5, dtype=torch.bfloat16, device=DEV))


def test_defaults_meet_constraints():
    from dskc.templates import registry
    for mod in (fp8_tpl, bf16_tpl):
        for family, cfg in mod.DEFAULTS.items():
            assert registry.satisfies(mod, cfg, {"M": 64, "N": 2112, "K": 7168}), (mod.STEM, family)


# ---- gpu tier ----

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 2112, 7168), (129, 576, 1536), (4096, 4096, 512)])
def test_fp8_gemm_gpu(M, N, K):
    a, sa, b, sb = make_fp8(M, N, K, device="cuda")
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    fp8_gemm(a, sa, b, sb, out=out)
    assert rel_err(out, dequant_ref(a, sa, b, sb)) < 2e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 2112, 7168), (129, 576, 1000), (2048, 2048, 2048)])
def test_bf16_gemm_gpu(M, N, K):
    a = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    bf16_gemm(a, b, out=out)
    assert rel_err(out, a.double().cpu() @ b.double().cpu().T) < 1e-2


@pytest.mark.parametrize("stem,problem", [("fp8_gemm_1d2d", {"M": 37, "N": 200, "K": 256}),
                                          ("bf16_gemm", {"M": 37, "N": 72, "K": 200}),
                                          ("act_quant", {"M": 37, "K": 200})])
def test_autotune_runners(stem, problem):
    """The runner each stem offers the GPU autotuner (autotune/gpu.py) launches and matches its reference."""
    from dskc.templates import registry
    mod = registry.get(stem)
    parts = mod.runner(problem, dict(mod.DEFAULTS["sm90"]), DEV)
    parts["launch"]()
    out, ref = parts["output"]().double().flatten().cpu(), parts["reference"]().double().flatten().cpu()
    assert torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out, ref, dim=0) > parts["min_cos"]
