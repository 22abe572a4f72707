"""dskc.compat.deep_gemm: DeepGEMM's names and signatures, checked against float64 references."""
import pytest
import torch

from dskc import knobs
from dskc.compat import deep_gemm as dg

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or knobs.get().triton_interpret),
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def dequant_rows(q, s):
    return q.double().cpu() * s.double().cpu().repeat_interleave(128, dim=-1)[..., : q.shape[-1]]


def dequant_blocks(q, s):
    n = q.shape[-2]
    rows = s.double().cpu().repeat_interleave(128, dim=-2)[..., :n, :]
    return q.double().cpu() * rows.repeat_interleave(128, dim=-1)[..., : q.shape[-1]]


def rel_err(out, ref) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def test_math_and_layout_helpers():
    assert dg.ceil_div(129, 128) == 2 and dg.ceil_div(128, 128) == 1
    assert dg.align(130, 64) == 192
    assert dg.get_mk_alignment_for_contiguous_layout() == 128
    assert dg.get_m_alignment_for_contiguous_layout() == 128
    assert dg.get_tma_aligned_size(37, 4) == 40 and dg.get_tma_aligned_size(37, 1) == 48
    x = torch.tensor([0.3, 1.0, 1.5, -0.01, 1e-30])
    torch.testing.assert_close(dg.ceil_to_ue8m0(x), torch.tensor([0.5, 1.0, 2.0, 2.0 ** -6, 2.0 ** -99]))


def test_mn_major_tma_aligned_tensor_keeps_values():
    sf = torch.rand(37, 3) + 0.1
    t = dg.get_mn_major_tma_aligned_tensor(sf)
    assert t.shape == (37, 3) and t.stride() == (1, 40)
    assert torch.equal(t, sf)
    with pytest.raises(ValueError, match="float32"):
        dg.get_mn_major_tma_aligned_tensor(sf.double())


@pytest.mark.parametrize("M,N,K", [(1, 72, 256), (37, 200, 128)])
def test_fp8_gemm_nt(M, N, K):
    x = torch.randn(M, K) * 2
    w = torch.randn(N, K) * 0.1
    a = dg.per_token_cast_to_fp8(x.to(DEV))
    b = dg.per_block_cast_to_fp8(w.to(DEV))
    assert rel_err(dequant_rows(*a), x.double()) < 0.05 and rel_err(dequant_blocks(*b), w.double()) < 0.05
    a = (a[0], dg.get_mn_major_tma_aligned_tensor(a[1]))
    d = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    assert dg.fp8_gemm_nt(a, b, d, compiled_dims="nk", disable_ue8m0_cast=True) is None
    ref = dequant_rows(*a) @ dequant_blocks(*b).T
    assert rel_err(d, ref) < 2e-2


def test_fp8_gemm_nt_rejects_what_dskc_does_not_do():
    a = dg.per_token_cast_to_fp8(torch.randn(4, 128, device=DEV))
    b = dg.per_block_cast_to_fp8(torch.randn(8, 128, device=DEV))
    d = torch.empty(4, 8, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(NotImplementedError):
        dg.fp8_gemm_nt(a, b, d, c=d)
    with pytest.raises(ValueError, match="recipe"):
        dg.fp8_gemm_nt(a, b, d, recipe=(1, 1, 128))
    with pytest.raises(TypeError, match="pair"):
        dg.fp8_gemm_nt(a[0], b, d)
    with pytest.raises(NotImplementedError, match="psum"):
        dg.m_grouped_fp8_gemm_nt_contiguous(a, b, d, torch.zeros(4, dtype=torch.int32, device=DEV), use_psum_layout=True)
    with pytest.raises(ValueError, match="recipe"):
        dg.m_grouped_fp8_gemm_nt_masked(a, b, d, torch.ones(1, dtype=torch.int32, device=DEV), 4, recipe=(1, 1, 128))
    with pytest.raises(ValueError, match="gran_k"):
        dg.per_token_cast_to_fp8(torch.randn(4, 128, device=DEV), gran_k=64)


def test_bf16_gemm_nt_fp16():
    a = torch.randn(37, 64, dtype=torch.float16, device=DEV)
    b = torch.randn(72, 64, dtype=torch.float16, device=DEV)
    d = torch.full((37, 72), float("nan"), dtype=torch.float16, device=DEV)
    dg.bf16_gemm_nt(a, b, d)
    assert rel_err(d, a.double().cpu() @ b.double().cpu().T) < 2e-3


def test_m_grouped_contiguous():
    G, N, K, rows = 3, 72, 128, (5, 0, 130)
    mk = dg.get_mk_alignment_for_contiguous_layout()
    padded = [dg.align(r, mk) for r in rows]
    M = sum(padded)
    m_indices = torch.full((M,), -1, dtype=torch.int32)
    start = 0
    for g, (r, p) in enumerate(zip(rows, padded)):
        m_indices[start:start + r] = g
        start += p
    a = dg.per_token_cast_to_fp8(torch.randn(M, K).to(DEV))
    w = torch.randn(G, N, K) * 0.1
    bq, bs = zip(*(dg.per_block_cast_to_fp8(w[g].to(DEV)) for g in range(G)))
    b = (torch.stack(bq), torch.stack(bs))
    d = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    dg.m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices.to(DEV))
    a64, b64 = dequant_rows(*a), dequant_blocks(*b)
    valid = m_indices >= 0
    ref = torch.einsum("mk,mnk->mn", a64[valid], b64[m_indices[valid].long()])
    assert rel_err(d.cpu()[valid], ref) < 2e-2
    assert torch.isnan(d.cpu()[~valid]).all()  # padding rows untouched


def test_m_grouped_masked():
    G, M_max, N, K = 2, 40, 72, 128
    masked_m = torch.tensor([37, 1], dtype=torch.int32)
    x = torch.randn(G * M_max, K)
    qa, sa = dg.per_token_cast_to_fp8(x.to(DEV))
    a = (qa.view(G, M_max, K), sa.view(G, M_max, 1))
    w = torch.randn(G, N, K) * 0.1
    bq, bs = zip(*(dg.per_block_cast_to_fp8(w[g].to(DEV)) for g in range(G)))
    b = (torch.stack(bq), torch.stack(bs))
    d = torch.full((G, M_max, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    dg.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m.to(DEV), expected_m=32)
    a64, b64 = dequant_rows(*a), dequant_blocks(*b)
    for g in range(G):
        m = int(masked_m[g])
        assert rel_err(d[g, :m], a64[g, :m] @ b64[g].T) < 2e-2
        assert torch.isnan(d[g, m:].cpu()).all()
