"""MLA suite: absorbed paged decode (stem mla_decode, bf16 and FP8 caches) on FlashMLA's grid, and the
non-absorbed prefill (stem mla_prefill) at the V3 / V2-Lite head counts, next to torch SDPA on a contiguous cache,
torch.compile, FlashMLA when importable and the published FlashMLA / FlagGems figures.

GB/s counts the cache bytes one decode step must read (seqlen x 576 x 2 per sequence for bf16, x 656 for FP8), as
FlashMLA reports it."""
from __future__ import annotations

import math

import torch

from dskc.benchmark.cases import Case, Impl
from dskc.benchmark.common import (FLAGGEMS_GBPS, FLASHMLA_GBPS, FLASHMLA_GRID, FLASHMLA_SRC, FLASHMLA_TFLOPS, H800,
                                   Ctx, compile_impl, have, tuned_impl)

PAGE = 64


def decode_operands(h_q, batch, seqlen, kv_format, device, dtype=torch.bfloat16, page=PAGE):
    """(q, paged cache, block table, seqlens) with pages in a random order."""
    from dskc.ops import mla

    pages = math.ceil(seqlen / page)
    num_blocks = batch * pages
    bt = torch.randperm(num_blocks, device=device).view(batch, pages).to(torch.int32)
    latent = torch.randn(num_blocks, page, 1, 576, device=device, dtype=dtype)
    cache = mla.quantize_mla_cache_fp8(latent.bfloat16()) if kv_format == "fp8" else latent
    q = torch.randn(batch, 1, h_q, 576, device=device, dtype=dtype)
    return q, cache, bt, torch.full((batch,), seqlen, dtype=torch.int32, device=device)


def _contiguous_kv(cache, bt, seqlen, kv_format, dtype):
    """The cache gathered per sequence into [batch, 1, seqlen, 576] (what an SDPA user would hold)."""
    from dskc.ops import mla

    dense = mla.dequantize_mla_cache_fp8(cache).to(dtype) if kv_format == "fp8" else cache
    return dense[bt.long()].reshape(bt.shape[0], -1, 576)[:, :seqlen].unsqueeze(1).contiguous()


def _sdpa_decode(q, k, scale):
    """q [b, 1, h, 576], k [b, 1, n, 576] -> [b, 1, h, 512] (value = the first 512 latent channels).

    One KV head: the h query heads are passed as h query rows of a single head (the same result for a one-token
    non-causal decode), so SDPA never expands the cache to h heads."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, k[..., :512], scale=scale)


def _flash_mla(q, cache, bt, seq, scale, fp8):
    import flash_mla

    meta, splits = flash_mla.get_mla_metadata(seq, q.shape[1] * q.shape[2], 1)
    extra = {"is_fp8_kvcache": True} if fp8 else {}
    return lambda: flash_mla.flash_mla_with_kvcache(q, cache, bt, seq, 512, meta, splits, softmax_scale=scale,
                                                    causal=False, **extra)


def decode_case(ctx: Ctx, h_q, batch, seqlen, kv_format, page=PAGE, dtype=torch.bfloat16) -> Case:
    from dskc.ops import mla

    q, cache, bt, seq = decode_operands(h_q, batch, seqlen, kv_format, ctx.device, dtype, page)
    scale = 192 ** -0.5
    problem = {"batch": batch, "s_q": 1, "h_q": h_q, "seqlen": seqlen, "page_size": page,
               "kv_fp8": kv_format == "fp8"}
    base = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, BLOCK_DV=256, num_warps=4, num_stages=1) if ctx.smoke else None

    def dskc(config):
        meta = mla.get_mla_metadata(seq, h_q, 1)
        return lambda: mla.mla_decode(q, cache, bt, seq, scale, kv_format=kv_format, metadata=meta,
                                      config=config, validate=False)[0]
    impls = [Impl("dskc-default", lambda: dskc(base)),
             tuned_impl(ctx, "mla_decode", problem, dskc)]
    k = _contiguous_kv(cache, bt, seqlen, kv_format, dtype)
    impls.append(Impl("torch-sdpa", lambda: (lambda: _sdpa_decode(q, k, scale)),
                      note="contiguous cache (gather not timed)" + (", dequantised to bf16" if kv_format == "fp8"
                                                                     else "")))
    impls.append(compile_impl(ctx, lambda: (_sdpa_decode, (q, k, scale))))
    if ctx.gpu and have("flash_mla"):
        impls.append(Impl("flash_mla", lambda: _flash_mla(q, cache, bt, seq, scale, kv_format == "fp8")))
    if not ctx.smoke:
        compute_bound = h_q >= 128
        published = (FLASHMLA_TFLOPS, H800, FLASHMLA_SRC, "tflops") if compute_bound else \
            (FLASHMLA_GBPS, H800, FLASHMLA_SRC, "gbps")
        impls.append(Impl("published-flashmla", published=published, note=(
            "compute-bound: 660 TFLOPS published, GB/s implied on this case" if compute_bound
            else "memory-bound figure (GB/s)")))
        if kv_format == "bf16":
            impls.append(Impl("published-flaggems", published=(FLAGGEMS_GBPS, "H800", "FlagGems (REFERENCE.md "
                                                                                          "section 3), best figure")))
    token_bytes = mla.FP8_TOKEN_BYTES if kv_format == "fp8" else 576 * cache.element_size()
    ref = _sdpa_decode(q.double(), k.double(), scale) if ctx.smoke else None
    return Case("mla", f"decode kv={kv_format} h_q={h_q} batch={batch} seqlen={seqlen}", "mla_decode",
                {"h_q": h_q, "batch": batch, "seqlen": seqlen, "kv_format": kv_format, "page": page}, tuple(impls),
                flops=2.0 * batch * h_q * seqlen * (576 + 512), bytes=float(batch * seqlen * token_bytes),
                primary="gbps", ref=(lambda: ref) if ref is not None else None)


def _sdpa_prefill(q, k, v, scale):
    """[T, H, D] single sequence, causal (as [1, H, T, D]: the fused SDPA backends take 4-D inputs only)."""
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out[0].transpose(0, 1)


def prefill_case(ctx: Ctx, heads, seqlen, label, dtype=torch.bfloat16) -> Case:
    from dskc.ops import mla

    q, k = (torch.randn(seqlen, heads, 192, device=ctx.device, dtype=dtype) for _ in range(2))
    v = torch.randn(seqlen, heads, 128, device=ctx.device, dtype=dtype)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=ctx.device)
    scale = 192 ** -0.5
    impls = [Impl("dskc-default", lambda: (lambda: mla.mla_prefill(q, k, v, cu, scale, causal=True)[0]))]
    problem = {"batch": 1, "seqlen": seqlen, "heads": heads, "d_qk": 192, "d_v": 128, "kv_fp8": False}
    impls.append(tuned_impl(ctx, "mla_prefill", problem,
                            lambda cfg: (lambda: mla.mla_prefill(q, k, v, cu, scale, causal=True, config=cfg)[0])))
    impls.append(Impl("torch-sdpa", lambda: (lambda: _sdpa_prefill(q, k, v, scale))))
    impls.append(compile_impl(ctx, lambda: (_sdpa_prefill, (q, k, v, scale))))
    ref = _sdpa_prefill(q.double(), k.double(), v.double(), scale) if ctx.smoke else None
    flops = 2.0 * heads * seqlen * seqlen * (192 + 128) / 2
    return Case("mla", f"prefill {label} heads={heads} seqlen={seqlen}", "mla_prefill",
                {"heads": heads, "seqlen": seqlen, "d_qk": 192, "d_v": 128}, tuple(impls), flops=flops,
                bytes=float((2 * 192 + 2 * 128) * heads * seqlen * q.element_size()),
                ref=(lambda: ref) if ref is not None else None)


def torch_rope_norm(kv_a, weight, rope_table, positions, eps=1e-6):
    """RMSNorm of the 512 latent channels and RoPE of the 64 rope-key channels of kv_a [T, 576], in PyTorch."""
    from dskc.model.mla import apply_rope

    latent = torch.nn.functional.rms_norm(kv_a[:, :512], (512,), weight, eps)
    k_pe = apply_rope(kv_a[None, :, None, 512:], rope_table[positions.long()])
    return latent, k_pe.view(-1, 64)


def rope_case(ctx: Ctx, tokens: int, label: str, dtype=torch.bfloat16) -> Case:
    """The fused RMSNorm + RoPE of the new tokens' latent and rope key (stem mla_rope), no cache write."""
    from dskc.model import get_config
    from dskc.model.mla import precompute_rope
    from dskc.ops import mla

    table = precompute_rope(get_config("deepseek-v3", max_seq_len=8192), device=ctx.device)
    kv = torch.randn(tokens, 576, device=ctx.device, dtype=dtype)
    weight = 1 + 0.1 * torch.randn(512, device=ctx.device, dtype=dtype)
    pos = torch.randint(0, 8192, (tokens,), device=ctx.device, dtype=torch.int32)
    impls = [Impl("dskc-default", lambda: (lambda: mla.rope_norm_cache_write(kv, weight, table, pos))),
             tuned_impl(ctx, "mla_rope", {"tokens": tokens, "h_q": 0, "kv_fp8": False},
                        lambda cfg: (lambda: mla.rope_norm_cache_write(kv, weight, table, pos, config=cfg))),
             Impl("torch-bf16", lambda: (lambda: torch_rope_norm(kv, weight, table, pos))),
             compile_impl(ctx, lambda: (torch_rope_norm, (kv, weight, table, pos)))]
    ref = torch_rope_norm(kv.double(), weight.double(), table.double(), pos)[0] if ctx.smoke else None
    return Case("mla", f"rope+norm {label} tokens={tokens}", "mla_rope", {"T": tokens}, tuple(impls),
                bytes=float(2 * tokens * 576 * kv.element_size() + tokens * 4), primary="gbps",
                ref=(lambda: ref) if ref is not None else None)


def cases(ctx: Ctx):
    if ctx.smoke:  # fp16 through the interpreter (its bf16 tl.dot is wrong, triton #11584)
        yield decode_case(ctx, 4, 2, 40, "bf16", page=16, dtype=torch.float16)
        yield prefill_case(ctx, 2, 24, "smoke", dtype=torch.float16)
        yield rope_case(ctx, 7, "smoke", dtype=torch.float32)
        return
    for kv_format in ("bf16", "fp8"):
        for h_q, batch, seqlen in FLASHMLA_GRID:
            yield decode_case(ctx, h_q, batch, seqlen, kv_format)
    for name, heads in (("deepseek-v3", 128), ("deepseek-v2-lite", 16)):
        yield prefill_case(ctx, heads, 4096, name)
    for tokens in (64, 4096):
        yield rope_case(ctx, tokens, "deepseek-v3")
