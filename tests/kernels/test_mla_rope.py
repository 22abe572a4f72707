"""Fused RMSNorm + DeepSeek RoPE + paged cache write (dskc.ops.mla.rope_norm_cache_write) against PyTorch."""
import math

import pytest
import torch
import triton
import triton.language as tl

from dskc.model import get_config
from dskc.model.mla import precompute_rope
from dskc.ops import mla
from dskc.templates.triton._mla_common import e4m3_bytes


@triton.jit
def encode(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, e4m3_bytes(tl.load(x_ptr + i, mask=i < n, other=0.0)), mask=i < n)


def rope_ref(x, table, pos):
    """Interleaved pairs as complex numbers times exp(i * angle), float64."""
    c = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    ang = torch.complex(table[pos.long(), :, 0].double(), table[pos.long(), :, 1].double())
    while ang.dim() < c.dim():
        ang = ang.unsqueeze(-2)
    return torch.view_as_real(c * ang).flatten(-2)


def norm_ref(x, w, eps):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def yarn_table():
    args = get_config("tiny")
    args = type(args)(**{**args.__dict__, "max_seq_len": 300, "original_seq_len": 64})  # YaRN active
    return precompute_rope(args)


@pytest.mark.parametrize("dtype,kv_format,heads", [(torch.float16, "bf16", 3), (torch.bfloat16, "fp8", 16),
                                                   (torch.float32, "bf16", 1)])
def test_rope_norm_cache_write(dtype, kv_format, heads):
    g = torch.Generator().manual_seed(heads)
    t, page, nb = 7, 16, 5
    table = yarn_table()
    kv_a = (torch.randn(t, 576, generator=g) * 2).to(dtype)
    w = (torch.rand(512, generator=g) + 0.5).to(dtype)
    pos = torch.randint(0, table.shape[0], (t,), generator=g, dtype=torch.int32)
    q = torch.randn(t, heads, 192, generator=g).to(dtype)
    q0 = q.clone()
    bt = torch.tensor([[4, 1], [0, 3]], dtype=torch.int32)
    slots = mla.paged_slots(bt, torch.tensor([0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 1, 17, 2, 3, 30, 5]), page)
    slots[2] = -1                                         # a token that is not cached
    if kv_format == "fp8":
        cache = torch.full((nb, page, 1, 656), 0x7F, dtype=torch.uint8)
    else:
        cache = torch.full((nb, page, 1, 576), float("nan"), dtype=dtype)
    before = cache.clone()
    lat, pe = mla.rope_norm_cache_write(kv_a, w, table, pos, q[..., 128:], eps=1e-6, kv_cache=cache, slots=slots,
                                        kv_format=kv_format)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)
    ref_lat = norm_ref(kv_a[:, :512], w, 1e-6)
    ref_pe = rope_ref(kv_a[:, 512:], table, pos)
    torch.testing.assert_close(lat.double(), ref_lat, **tol)
    torch.testing.assert_close(pe.double(), ref_pe, **tol)
    torch.testing.assert_close(q[..., 128:].double(), rope_ref(q0[..., 128:], table, pos), **tol)
    assert torch.equal(q[..., :128], q0[..., :128])       # the nope part is untouched
    flat = cache.view(nb * page, -1)
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        if kv_format == "fp8":
            row = mla.dequantize_mla_cache_fp8(flat[s]).double()
            cos = torch.nn.functional.cosine_similarity(row[:512], ref_lat[i], dim=0)
            assert cos > 0.995   # e4m3 keeps 3 mantissa bits; compared by similarity
            torch.testing.assert_close(row[512:], ref_pe[i], atol=3e-2, rtol=2e-2)
        else:
            torch.testing.assert_close(flat[s].double(), torch.cat([ref_lat[i], ref_pe[i]]), **tol)
    written = set(s for s in slots.tolist() if s >= 0)
    untouched = [s for s in range(nb * page) if s not in written]
    assert torch.equal(flat[untouched].view(torch.uint8), before.view(nb * page, -1)[untouched].view(torch.uint8))


def test_rope_without_cache_and_bad_inputs():
    table = yarn_table()
    kv_a = torch.randn(3, 576)
    w = torch.ones(512)
    pos = torch.tensor([0, 5, 299], dtype=torch.int32)
    lat, pe = mla.rope_norm_cache_write(kv_a, w, table, pos)
    torch.testing.assert_close(pe.double(), rope_ref(kv_a[:, 512:], table, pos), atol=1e-5, rtol=1e-5)
    assert not math.isnan(lat.sum().item())
    with pytest.raises(ValueError):
        mla.rope_norm_cache_write(kv_a, w, table, torch.tensor([0, 5, 300], dtype=torch.int32))
    with pytest.raises(TypeError):
        mla.rope_norm_cache_write(kv_a, w, table, pos.long())
    with pytest.raises(ValueError):
        mla.rope_norm_cache_write(kv_a[:, :512], w, table, pos)
    with pytest.raises(TypeError):
        mla.rope_norm_cache_write(kv_a, w, table, pos, kv_cache=torch.zeros(2, 16, 1, 576))


def test_e4m3_encoding_without_fp8_type():
    """The bit-level e4m3 encoder used for cache writes matches torch's conversion (exact on representable
    values, at most 1 ulp off on random ones)."""
    codes = torch.arange(256, dtype=torch.uint8)
    exact = codes.view(torch.float8_e4m3fn).float()
    exact = exact[torch.isfinite(exact)]
    rand = (torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 448 * \
        torch.logspace(-4, 0, 4096)
    x = torch.cat([exact, rand]).contiguous()
    y = torch.empty(x.numel(), dtype=torch.uint8)
    encode[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(y[: exact.numel()], want[: exact.numel()])
    diff = (y.to(torch.int16) - want.to(torch.int16)).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99
