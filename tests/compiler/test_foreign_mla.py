"""The MLA core both doors run for transformers' DeepSeek attention (dskc.runtime.foreign.mla_attend): absorbed
attention on mla_decode over the latent cache as transformers holds it, against the non-absorbed attention written
in float64 (k = [w_uk^T kv; k_rope], v = w_uv^T kv), for a prefill, a decode step past a cache, and masks."""
import pytest
import torch

from dskc import knobs
from dskc.runtime.foreign import mla_attend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not knobs.get().triton_interpret,
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() and not knobs.get().triton_interpret else "cpu"
H, NOPE, R, V, C = 2, 32, 64, 32, 512


def _case(b, s, length, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, H, s, NOPE + R, generator=g)
    kv, kr = torch.randn(b, 1, length, C, generator=g), torch.randn(b, 1, length, R, generator=g)
    w_uk, w_uv = torch.randn(H, NOPE, C, generator=g) / C ** 0.5, torch.randn(H, V, C, generator=g) / C ** 0.5
    return q, kv, kr, w_uk, w_uv


def reference(q, kv, kr, w_uk, w_uv, scale, allowed):
    """Naive MLA in float64: per-head keys and values expanded from the latent (what transformers computes)."""
    q, kv, kr, w_uk, w_uv = (t.double() for t in (q, kv, kr, w_uk, w_uv))
    k = torch.cat([torch.einsum("blc,hdc->bhld", kv[:, 0], w_uk), kr.expand(-1, H, -1, -1)], -1)
    v = torch.einsum("blc,hdc->bhld", kv[:, 0], w_uv)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ v                                   # [B, H, S, V]
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _causal(s, length):
    return torch.arange(length)[None, :] <= torch.arange(s)[:, None] + (length - s)


@pytest.mark.parametrize("b,s,length", [(2, 5, 5), (2, 1, 9), (1, 3, 70)])   # prefill; decode; a chunk past a page
def test_causal_prefill_and_decode_match_naive_mla(b, s, length):
    q, kv, kr, w_uk, w_uv = _case(b, s, length, seed=b * 100 + s)
    scale = (NOPE + R) ** -0.5
    ref = reference(q, kv, kr, w_uk, w_uv, scale, _causal(s, length))
    mask = _causal(s, length)[None, None].expand(b, 1, s, length)
    for m in (None, mask, torch.zeros(b, 1, s, length).masked_fill(~mask, torch.finfo(torch.float32).min)):
        out = mla_attend(*(t.to(DEV) for t in (q, kv, kr)), None if m is None else m.to(DEV),
                         w_uk.to(DEV), w_uv.to(DEV), scale)
        assert out.shape == (b, s, H * V) and ((out.double().cpu() - ref).norm() / ref.norm()) < 1e-5


def test_a_padding_mask_is_honoured_not_replaced_by_causal(caplog):
    b, s, length = 2, 4, 6
    q, kv, kr, w_uk, w_uv = _case(b, s, length, seed=9)
    allowed = _causal(s, length)[None, None].repeat(b, 1, 1, 1)
    allowed[1, ..., :2] = False                                    # sequence 1 is left-padded by two tokens
    ref = reference(q, kv, kr, w_uk, w_uv, 0.1, allowed)
    out = mla_attend(*(t.to(DEV) for t in (q, kv, kr)), allowed.to(DEV), w_uk.to(DEV), w_uv.to(DEV), 0.1)
    assert ((out.double().cpu() - ref).norm() / ref.norm()) < 1e-5
    causal_only = mla_attend(*(t.to(DEV) for t in (q, kv, kr)), None, w_uk.to(DEV), w_uv.to(DEV), 0.1)
    assert ((causal_only.double().cpu() - ref).norm() / ref.norm()) > 1e-2   # the mask mattered here
