"""Triton helpers shared by the MLA stems: writing token rows into the paged latent cache (dense or FP8)."""
from __future__ import annotations

import triton
import triton.language as tl

DL = tl.constexpr(512)        # latent width
DR = tl.constexpr(64)         # rope width
FP8_TOK = tl.constexpr(656)   # bytes per token in the FP8 layout
FP8_MAX = tl.constexpr(448.0)


@triton.jit
def e4m3_bytes(x):
    """fp32 in [-448, 448] -> e4m3fn bit patterns (uint8) without an fp8 type (sm_80 has none).

    x / 256 in fp16 puts e4m3's exponent field (bias 7) where fp16's (bias 15) is, subnormals included; the low 7
    mantissa bits are then rounded off to nearest-even. (Two roundings: rarely 1 ulp off a direct conversion.)
    """
    bits = (x * (1.0 / 256.0)).to(tl.float16).to(tl.uint16, bitcast=True)
    mag = bits & 0x7FFF
    mag = (mag + 0x3F + ((mag >> 7) & 1)) >> 7
    return (((bits >> 8) & 0x80) | mag).to(tl.uint8)


@triton.jit
def store_cache_rows(cache_ptr, sc_ptr, rope_ptr, slots, lat, rope, mask, FP8: tl.constexpr):
    """Write [BT] tokens (latent [BT, 512] fp32, rope [BT, 64] fp32) at flat cache slots (page * page + offset).

    Dense: cache_ptr is the cache as rows of 576 elements (rope_ptr/sc_ptr unused).
    FP8: cache_ptr = the uint8 rows, sc_ptr = fp32 view + 128, rope_ptr = bf16 view + 264 of rows of 656 bytes; each
    group of 128 latent values is stored as e4m3(x / s) with s = max(amax, 1e-4) / 448; a NaN / inf latent value
    is stored as e4m3 NaN (0x7F) and left out of the amax (as act_quant), never as a finite byte.
    """
    slots = slots.to(tl.int64)
    if FP8:
        g = tl.reshape(lat, [lat.shape[0], 4, 128])
        finite = tl.abs(g) < float("inf")
        scale = tl.maximum(tl.max(tl.where(finite, tl.abs(g), 0.0), 2), 1e-4) / FP8_MAX
        q8 = tl.where(finite, g / scale[:, :, None], 0.0)
        q8 = e4m3_bytes(tl.clamp(tl.reshape(q8, [lat.shape[0], 512]), -FP8_MAX, FP8_MAX))
        q8 = tl.where(tl.reshape(finite, [lat.shape[0], 512]), q8, 0x7F).to(tl.uint8)
        tl.store(cache_ptr + slots[:, None] * FP8_TOK + tl.arange(0, DL)[None, :], q8, mask=mask[:, None])
        tl.store(sc_ptr + slots[:, None] * (FP8_TOK // 4) + tl.arange(0, 4)[None, :], scale, mask=mask[:, None])
        tl.store(rope_ptr + slots[:, None] * (FP8_TOK // 2) + tl.arange(0, DR)[None, :],
                 rope.to(tl.bfloat16), mask=mask[:, None])
    else:
        row = slots[:, None] * (DL + DR)
        ty = cache_ptr.dtype.element_ty
        tl.store(cache_ptr + row + tl.arange(0, DL)[None, :], lat.to(ty), mask=mask[:, None])
        tl.store(cache_ptr + row + DL + tl.arange(0, DR)[None, :], rope.to(ty), mask=mask[:, None])
