"""FP8 (e4m3) weights with fp32 128x128 block scales: quantize for init/tests, dequantize exactly for eager runs.

Layout (DeepSeek-V3 after convert.py): weight [out, in] float8_e4m3fn, scale [ceil(out/128), ceil(in/128)] fp32,
real weight = weight * scale of its block. Partial edge blocks are allowed (out/in need not divide by 128).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0    # largest finite e4m3fn value
AMAX_FLOOR = 1e-4  # DeepSeek's recipe clamps the block amax from below


def scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the block-scale tensor for a [out_features, in_features] weight."""
    return (-(-out_features // BLOCK), -(-in_features // BLOCK))


def _check_pair(w: torch.Tensor, scale: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if w.dtype != FP8_DTYPE:
        raise TypeError(f"weight must be {FP8_DTYPE}, got {w.dtype}")
    if scale.dtype != torch.float32:
        raise TypeError(f"scale must be float32, got {scale.dtype}")
    if tuple(scale.shape) != scale_shape(*w.shape):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match weight {tuple(w.shape)}: "
                         f"expected {scale_shape(*w.shape)} (one per {BLOCK}x{BLOCK} block)")


def expand_scale(scale: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Broadcast block scales to a per-element [out, in] tensor (edge blocks cut to size)."""
    full = scale.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)
    return full[:out_features, :in_features]


def weight_dequant(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize an e4m3 weight with its fp32 block scales to `dtype`.

    The product weight(fp8 -> fp32) * scale is computed in float32, where it is exact up to one rounding (e4m3
    has a 4-bit significand), so the float32 result equals a float64 reference rounded to float32; other dtypes
    get that float32 value rounded once more.
    """
    _check_pair(w, scale)
    out = w.to(torch.float32) * expand_scale(scale, *w.shape)
    return out.to(dtype)


def quantize_weight(w: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float weight to (e4m3 weight, fp32 128x128 block scales).

    scale = max(amax(block), 1e-4) / 448 (so the block's largest magnitude maps to 448); with scale_fmt
    "ue8m0" the scale is rounded up to a power of two. Values are rounded to nearest by the e4m3 cast.
    """
    if w.dim() != 2 or not w.is_floating_point() or w.dtype == FP8_DTYPE:
        raise ValueError(f"quantize_weight needs a 2-D float (non-fp8) tensor, got {w.dtype} {tuple(w.shape)}")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    out_f, in_f = w.shape
    sm, sn = scale_shape(out_f, in_f)
    padded = F.pad(w.float(), (0, sn * BLOCK - in_f, 0, sm * BLOCK - out_f))
    amax = padded.abs().view(sm, BLOCK, sn, BLOCK).amax(dim=(1, 3))
    scale = amax.clamp(min=AMAX_FLOOR) / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (w.float() / expand_scale(scale, out_f, in_f)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


def act_quant_dequant(x: torch.Tensor) -> torch.Tensor:
    """Round activations through DeepSeek's 1x128 e4m3 quantisation and back, in x's dtype (what an FP8 GEMM sees).

    Per token and 128 channels: scale = max(amax, 1e-4) / 448, q = e4m3(x / scale), result q * scale.
    The last dimension must be a multiple of 128 (FP8 linears' input widths are, by the config check).
    """
    k = x.shape[-1]
    if k % BLOCK:
        raise ValueError(f"activation width {k} is not a multiple of {BLOCK}")
    blocks = x.float().unflatten(-1, (k // BLOCK, BLOCK))
    scale = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (q.float() * scale).flatten(-2).to(x.dtype)
