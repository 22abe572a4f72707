"""Grouped GEMM (fp8 1D2D and fp16 under the interpreter / bf16 on a GPU), both layouts and every epilogue,
against float64 references on the dequantised operands."""
import pytest
import torch
import torch.nn.functional as F

from dskc import knobs
from dskc.ops import moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not knobs.get().triton_interpret,
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")
INTERP = knobs.get().triton_interpret
DEV = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
HALF = torch.float16 if INTERP else torch.bfloat16   # the interpreter's bf16 tl.dot is wrong (triton #11584)
FP8 = torch.float8_e4m3fn
TOL = 2e-3 if INTERP else 5e-3   # fp16 outputs under the interpreter, bf16 (8-bit mantissa) on a GPU


def quant_rows(x):
    """1x128 activation quantisation (REFERENCE.md section 2) -> (e4m3, fp32 scales [..., K/128])."""
    g = x.float().reshape(*x.shape[:-1], -1, 128)
    s = g.abs().amax(-1).clamp(min=1e-4) / 448.0
    return (g / s[..., None]).to(FP8).reshape(x.shape), s


def quant_blocks(w):
    """128x128 weight blocks of w [E, N, K] (N padded to 128 for the scale grid) -> (e4m3, [E, ceil(N/128), K/128])."""
    e, n, k = w.shape
    npad = -(-n // 128) * 128
    wp = torch.cat([w, w.new_zeros(e, npad - n, k)], 1).view(e, npad // 128, 128, k // 128, 128)
    s = wp.abs().amax((2, 4)).clamp(min=1e-4) / 448.0
    q = (wp / s[:, :, None, :, None]).to(FP8).view(e, npad, k)[:, :n]
    return q.contiguous(), s


def deq_rows(q, s):
    return (q.double().reshape(*q.shape[:-1], -1, 128) * s.double()[..., None]).reshape(q.shape)


def deq_blocks(q, s):
    e, n, k = q.shape
    return q.double() * s.double().repeat_interleave(128, 1)[:, :n].repeat_interleave(128, 2)


def operands(fp8, rows_shape, E, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*rows_shape, K, generator=g)
    b = torch.randn(E, N, K, generator=g) / K ** 0.5
    if fp8:
        (qa, sa), (qb, sb) = quant_rows(a), quant_blocks(b)
        return [t.to(DEV) for t in (qa, sa, qb, sb)], deq_rows(qa, sa), deq_blocks(qb, sb)
    a, b = a.to(HALF), b.to(HALF)
    return [a.to(DEV), None, b.to(DEV), None], a.double(), b.double()


def contiguous_indices(counts, align=128):
    """DeepGEMM's contiguous layout: each expert's rows padded to `align`, -1 on padding rows."""
    ids = []
    for e, c in enumerate(counts):
        ids += [e] * c + [-1] * (-(-c // align) * align - c)
    return torch.tensor(ids, dtype=torch.int32)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("fp8", [True, False])
def test_contiguous_m_indices(fp8):
    counts, N, K = [5, 0, 70, 1], 192, 256          # an empty expert, a 2-block expert, a single row
    m_idx = contiguous_indices(counts)
    (a, sa, b, sb), A, B = operands(fp8, (len(m_idx),), len(counts), N, K, seed=1)
    out = torch.full((len(m_idx), N), float("nan"), dtype=HALF, device=DEV)
    moe.grouped_gemm_contiguous(a, sa, b, sb, m_idx.to(DEV), out)
    valid = m_idx >= 0
    ref = torch.einsum("mk,mnk->mn", A[valid], B[m_idx[valid].long()])
    assert rel_err(out.cpu()[valid], ref) < TOL
    assert out.cpu()[~valid].isnan().all()           # padding rows are left alone


@pytest.mark.parametrize("fp8", [True, False])
def test_masked(fp8):
    E, M_max, N, K = 4, 20, 160, 128
    masked_m = torch.tensor([0, 20, 3, 17], dtype=torch.int32)   # empty, full, and partial experts
    (a, sa, b, sb), A, B = operands(fp8, (E, M_max), E, N, K, seed=2)
    out = torch.full((E, M_max, N), float("nan"), dtype=HALF, device=DEV)
    moe.grouped_gemm_masked(a, sa, b, sb, masked_m.to(DEV), 10, out)
    for e in range(E):
        m = int(masked_m[e])
        if m:
            assert rel_err(out.cpu()[e, :m], A[e, :m] @ B[e].T) < TOL
        assert out.cpu()[e, m:].isnan().all()


def test_mn_major_activation_scales():
    """DeepGEMM hands over sa MN-major (column-major, padded): the kernel reads it through its strides."""
    E, M_max, N, K = 2, 21, 128, 256
    masked_m = torch.tensor([21, 6], dtype=torch.int32)
    (a, sa, b, sb), A, B = operands(True, (E, M_max), E, N, K, seed=8)
    sa_mn = torch.full((E, K // 128, 24), float("nan"), device=DEV)
    sa_mn[:, :, :M_max] = sa.transpose(1, 2)
    sa_mn = sa_mn.transpose(1, 2)[:, :M_max]                    # [E, M_max, K/128], strides (72, 1, 24)
    out = torch.full((E, M_max, N), float("nan"), dtype=HALF, device=DEV)
    moe.grouped_gemm_masked(a, sa_mn, b, sb, masked_m.to(DEV), 16, out)
    for e in range(E):
        m = int(masked_m[e])
        assert rel_err(out.cpu()[e, :m], A[e, :m] @ B[e].T) < TOL
    m_idx = contiguous_indices([128, 28])
    (a, sa, b, sb), A, B = operands(True, (len(m_idx),), E, N, K, seed=9)
    out = torch.full((len(m_idx), N), float("nan"), dtype=HALF, device=DEV)
    moe.grouped_gemm_contiguous(a, sa.t().contiguous().t(), b, sb, m_idx.to(DEV), out)
    valid = m_idx >= 0
    ref = torch.einsum("mk,mnk->mn", A[valid], B[m_idx[valid].long()])
    assert rel_err(out.cpu()[valid], ref) < TOL


def test_block_expert_with_row_weight():
    """dskc's own map (one expert per align-row block from moe_align) and the routed-weight epilogue."""
    T, E, top_k, N, K = 19, 5, 2, 136, 128
    torch.manual_seed(4)
    ids = torch.stack([torch.randperm(E)[:top_k] for _ in range(T)]).to(torch.int32)
    lay = moe.moe_align(ids.to(DEV), E, align=32)
    (a, sa, b, sb), A, B = operands(False, (lay.rows,), E, N, K, seed=3)
    rw = torch.rand(lay.rows, device=DEV) + 0.5
    out = torch.full((lay.rows, N), float("nan"), dtype=torch.float32, device=DEV)
    moe.grouped_gemm(a, sa, b, sb, out, block_expert=lay.block_expert, align=32, epilogue="weight", row_weight=rw,
                     config={"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64})
    m = lay.m_indices.cpu().long()
    valid = m >= 0
    ref = torch.einsum("mk,mnk->mn", A[valid], B[m[valid]]) * rw.cpu().double()[valid, None]
    assert rel_err(out.cpu()[valid], ref) < TOL


@pytest.mark.parametrize("fp8,masked", [(True, False), (False, True), (True, True)])
def test_swiglu_epilogue(fp8, masked):
    """b = stacked [gate; up]: out = silu(gate) * up; fp8 quantises it per 128 columns for the next GEMM."""
    E, I, K = 3, 128, 256
    if masked:
        rows_shape, masked_m = (E, 11), torch.tensor([11, 0, 4], dtype=torch.int32)
        maps = {"masked_m": masked_m.to(DEV)}
        valid = torch.arange(11)[None, :] < masked_m[:, None]
        experts = torch.arange(E)[:, None].expand(E, 11)[valid]
    else:
        m_idx = contiguous_indices([3, 66, 0])
        rows_shape, maps, valid, experts = (len(m_idx),), {"m_indices": m_idx.to(DEV)}, m_idx >= 0, None
        experts = m_idx[valid].long()
    (a, sa, b, sb), A, B = operands(fp8, rows_shape, E, 2 * I, K, seed=5)
    out = torch.full(rows_shape + (I,), float("nan"), dtype=FP8 if fp8 else HALF, device=DEV)
    out_scale = torch.full(rows_shape + (I // 128,), float("nan"), device=DEV) if fp8 else None
    moe.grouped_gemm(a, sa, b, sb, out, epilogue="swiglu_quant" if fp8 else "swiglu", out_scale=out_scale, **maps)
    h = torch.einsum("mk,mnk->mn", A[valid], B[experts])
    ref = F.silu(h[:, :I]) * h[:, I:]
    if fp8:
        got = deq_rows(out.cpu()[valid], out_scale.cpu()[valid])
        ref_q, ref_s = quant_rows(ref)
        assert rel_err(got, deq_rows(ref_q, ref_s)) < 5e-3   # against the reference quantised the same way
        assert rel_err(got, ref) < 4e-2                      # e4m3's own rounding (3 mantissa bits) is ~2.5 %
        torch.testing.assert_close(out_scale.cpu()[valid].double(), ref_s.double(), rtol=1e-3, atol=0)
    else:
        assert rel_err(out.cpu()[valid], ref) < TOL
    assert out.cpu().float()[~valid].isnan().all()


def test_bad_input_raises_before_launch():
    (a, sa, b, sb), _, _ = operands(True, (128,), 2, 128, 256, seed=6)
    m_idx = contiguous_indices([100, 28])[:128].to(DEV)
    out = torch.empty(128, 128, dtype=HALF, device=DEV)
    cases = [
        (lambda: moe.grouped_gemm_contiguous(a[:, :192], sa[:, :1], b[:, :, :192], sb, m_idx, out), "contiguous"),
        (lambda: moe.grouped_gemm_contiguous(a, sa[:, :1], b, sb, m_idx, out), "sa must have shape"),
        (lambda: moe.grouped_gemm_contiguous(a, sa, b, sb[:, :, :1], m_idx, out), "sb must have shape"),
        (lambda: moe.grouped_gemm_contiguous(a, None, b, sb, m_idx, out), "sa and sb"),
        (lambda: moe.grouped_gemm_contiguous(a, sa, b, sb, m_idx[:64], out), "m_indices"),
        (lambda: moe.grouped_gemm_contiguous(a, sa, b, sb, m_idx.long(), out), "dtype"),
        (lambda: moe.grouped_gemm_contiguous(a, sa, b, sb, m_idx, out[:, :64]), "out must have shape"),
        (lambda: moe.grouped_gemm_masked(a, sa, b, sb, m_idx[:2], 4, out), "masked_m"),
        (lambda: moe.grouped_gemm_masked(a.view(2, 64, 256), sa.view(2, 64, 2), b, sb, m_idx[:2], 0,
                                         out.view(2, 64, 128)), "expected_m"),
        (lambda: moe.grouped_gemm(a, sa, b, sb, out, m_indices=m_idx, epilogue="gelu"), "epilogue"),
        (lambda: moe.grouped_gemm(a, sa, b, sb, out, m_indices=m_idx, epilogue="weight"), "row_weight"),
        (lambda: moe.grouped_gemm(a, sa, b, sb, out, m_indices=m_idx, config={"BLOCK_K": 256}), "constraints"),
        (lambda: moe.grouped_gemm(a, sa, b, sb, out, m_indices=m_idx, config={"TILE": 3}), "space"),
    ]
    for call, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            call()
    a16 = torch.randn(128, 96, device=DEV).to(HALF)
    b16 = torch.randn(2, 64, 96, device=DEV).to(torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        moe.grouped_gemm_contiguous(a16, None, b16, None, m_idx, torch.empty(128, 64, dtype=HALF, device=DEV))
    with pytest.raises(ValueError, match="constraints"):   # K % BLOCK_K: no masks in the K loop
        moe.grouped_gemm_contiguous(a16, None, b16.to(HALF), None, m_idx, torch.empty(128, 64, dtype=HALF,
                                                                                       device=DEV))
