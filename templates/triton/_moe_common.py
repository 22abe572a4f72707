"""Jitted helpers shared by the MoE stems (not a stem itself: it defines no STEM)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_e4m3(x, dtype: tl.constexpr, INTERP_FIX: tl.constexpr):
    """Cast fp32 x (|x| <= 448) to e4m3 `dtype`, rounding to nearest even.

    INTERP_FIX = 1 is for TRITON_INTERPRET only: triton 3.9's interpreter drops the carry when rounding crosses a
    power of two (127.8 -> 64 instead of 128; 2 % of random values) and truncates subnormals. Rounding the fp32
    mantissa to 3 bits first (nearest even) leaves it an exact cast for every normal e4m3 value; subnormals
    (|x| < 2^-6) may still be one subnormal step (2^-9) off, and turns NaN into 384 (kept NaN here). GPU builds use
    0: the hardware cvt rounds right and keeps NaN.
    """
    if INTERP_FIX:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
        y = bits.to(tl.float32, bitcast=True).to(dtype)
        # ... and turns NaN into 384: keep it NaN (e4m3fn's 0x7F), as the GPU's cvt does
        return tl.where(x == x, y, tl.full(x.shape, 0x7F, tl.uint8).to(dtype, bitcast=True))
    return x.to(dtype)
