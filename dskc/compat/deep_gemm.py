"""DeepGEMM's Python names and signatures on dskc's kernels, so engines written against `deep_gemm` can swap.

Covered: `fp8_gemm_nt((a, sa), (b, sb), d)`, `m_grouped_fp8_gemm_nt_contiguous`, `m_grouped_fp8_gemm_nt_masked`,
`bf16_gemm_nt`, the layout helpers engines call (`get_mk_alignment_for_contiguous_layout` and its m/k aliases,
`get_tma_aligned_size`, `get_mn_major_tma_aligned_tensor`, `get_col_major_tma_aligned_tensor`), the math helpers
(`ceil_div`, `align`, `ceil_to_ue8m0`, `per_token_cast_to_fp8`, `per_block_cast_to_fp8`) and `get_num_sms`.
Semantics follow DeepGEMM's README (deepseek-ai/DeepGEMM); the code is dskc's. Only what the dskc kernels do is
accepted: the "nt" layout, 1x128 / 128x128 fp32 (or power-of-two) scales, K a multiple of 128.
"""
from __future__ import annotations

import torch

from dskc.ops import fp8 as _fp8

__all__ = ["fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked", "bf16_gemm_nt",
           "get_mk_alignment_for_contiguous_layout", "get_m_alignment_for_contiguous_layout",
           "get_k_alignment_for_contiguous_layout", "get_tma_aligned_size", "get_mn_major_tma_aligned_tensor",
           "get_col_major_tma_aligned_tensor", "ceil_div", "align", "ceil_to_ue8m0", "per_token_cast_to_fp8",
           "per_block_cast_to_fp8", "get_num_sms"]

_MK_ALIGNMENT = 128  # rows of each expert in the contiguous layout are padded to this (one M block)


def ceil_div(x: int, y: int) -> int:
    """ceil(x / y) for positive integers."""
    return (x + y - 1) // y


def align(x: int, y: int) -> int:
    """x rounded up to a multiple of y."""
    return ceil_div(x, y) * y


def get_mk_alignment_for_contiguous_layout() -> int:
    """Row alignment of each group in `m_grouped_fp8_gemm_nt_contiguous`'s A and m_indices (128)."""
    return _MK_ALIGNMENT


get_m_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout
get_k_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout


def get_tma_aligned_size(mn: int, element_size: int) -> int:
    """mn rounded up so that mn * element_size is a multiple of 16 bytes (TMA's alignment)."""
    if 16 % element_size:
        raise ValueError(f"element_size must divide 16, got {element_size}")
    return align(mn, 16 // element_size)


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """Scales [..., MN, K'] re-laid MN-major (column-major, MN padded to 16 bytes); values unchanged.

    dskc's kernels take scales in any strides, so this only reproduces DeepGEMM's layout for engines that expect it.
    """
    if sf.dim() not in (2, 3) or sf.dtype != torch.float32:
        raise ValueError(f"sf must be a 2-D or 3-D float32 tensor, got {sf.dim()}-D {sf.dtype}")
    mn, k = sf.shape[-2], sf.shape[-1]
    padded = get_tma_aligned_size(mn, sf.element_size())
    buf = torch.empty(*sf.shape[:-2], k, padded, dtype=sf.dtype, device=sf.device)
    view = buf.transpose(-1, -2)[..., :mn, :]
    view.copy_(sf)
    return view


get_col_major_tma_aligned_tensor = get_mn_major_tma_aligned_tensor


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """|x| rounded up to a power of two (exact, by exponent bits), as DeepGEMM's UE8M0 scales."""
    bits = x.abs().float().view(torch.int32)
    expo = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).int()
    return (expo.clamp(1, 254) << 23).view(torch.float32)


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128):
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, ceil(K/128)]) with dskc's act_quant kernel."""
    if gran_k != 128:
        raise ValueError(f"dskc quantises 1x128 blocks only, got gran_k={gran_k}")
    return _fp8.act_quant(x, 128, ue8m0=use_ue8m0)


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128):
    """Weights x [N, K] -> (e4m3 [N, K], fp32 scales [ceil(N/128), ceil(K/128)]) per 128x128 block (PyTorch ops)."""
    if gran_k != 128 or x.dim() != 2:
        raise ValueError("per_block_cast_to_fp8 takes a 2-D tensor and gran_k=128")
    n, k = x.shape
    padded = torch.zeros(align(n, 128), align(k, 128), dtype=torch.float32, device=x.device)
    padded[:n, :k] = x
    view = padded.view(padded.shape[0] // 128, 128, padded.shape[1] // 128, 128)
    sf = view.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4) / 448.0
    sf = ceil_to_ue8m0(sf) if use_ue8m0 else sf
    q = (view / sf).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view_as(padded)[:n, :k].contiguous()
    return q, sf.view(view.shape[0], view.shape[2])


def get_num_sms() -> int:
    """Streaming multiprocessors of the current GPU (raises without one)."""
    if not torch.cuda.is_available():
        raise RuntimeError("get_num_sms needs a CUDA GPU; none is visible")
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _pair(name: str, pair):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be a (tensor, scales) pair as in DeepGEMM, got {type(pair).__name__}")
    return pair


def _check_recipe(recipe) -> None:
    if recipe not in (None, (1, 128, 128)):
        raise ValueError(f"dskc supports the 1D2D recipe (1, 128, 128) only, got {recipe}")


def fp8_gemm_nt(a, b, d: torch.Tensor, c: torch.Tensor | None = None, recipe=None, compiled_dims: str = "nk",
                disable_ue8m0_cast: bool = False) -> None:
    """d[M, N] = a @ b^T for a = (a [M, K] e4m3, sa [M, K/128]), b = (b [N, K] e4m3, sb [ceil(N/128), K/128]).

    d is bf16 (or fp32) and is written in place. `c` (accumulate into) is not supported; recipe must be None or
    (1, 128, 128). compiled_dims (a JIT hint) and disable_ue8m0_cast (dskc never casts scales) are accepted and
    change nothing.
    """
    if c is not None:
        raise NotImplementedError("fp8_gemm_nt with an accumulator c is not supported by dskc")
    _check_recipe(recipe)
    (qa, sa), (qb, sb) = _pair("a", a), _pair("b", b)
    _fp8.fp8_gemm(qa, sa, qb, sb, out=d, out_dtype=d.dtype)


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """d[M, N] = a[M, K] @ b[N, K]^T in bf16, written in place (`c` is not supported)."""
    if c is not None:
        raise NotImplementedError("bf16_gemm_nt with an accumulator c is not supported by dskc")
    _fp8.bf16_gemm(a, b, out=d)


def m_grouped_fp8_gemm_nt_contiguous(a, b, d: torch.Tensor, m_indices: torch.Tensor, recipe=None,
                                     compiled_dims: str = "nk", disable_ue8m0_cast: bool = False,
                                     use_psum_layout: bool = False) -> None:
    """Grouped GEMM, contiguous layout: rows of a (aligned per group to 128) use weight group m_indices[row].

    a = (a [M, K] e4m3, sa [M, K/128]); b = (b [G, N, K] e4m3, sb [G, ceil(N/128), K/128]); d [M, N] bf16;
    m_indices [M] int32, -1 for padding rows (left unwritten). Delegates to dskc.ops.moe.grouped_gemm_contiguous.
    The prefix-sum layout (use_psum_layout=True) is not supported; compiled_dims / disable_ue8m0_cast change nothing.
    """
    from dskc.ops import moe

    if use_psum_layout:
        raise NotImplementedError("m_grouped_fp8_gemm_nt_contiguous(use_psum_layout=True) is not supported by dskc")
    _check_recipe(recipe)

    (qa, sa), (qb, sb) = _pair("a", a), _pair("b", b)
    moe.grouped_gemm_contiguous(qa, sa, qb, sb, m_indices, d)


def m_grouped_fp8_gemm_nt_masked(a, b, d: torch.Tensor, masked_m: torch.Tensor, expected_m: int, recipe=None,
                                 compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """Grouped GEMM, masked layout: a [G, M_max, K] x b [G, N, K] -> d [G, M_max, N], group g's first masked_m[g] rows.

    a = (a, sa [G, M_max, K/128]); b = (b, sb [G, ceil(N/128), K/128]); masked_m [G] int32 on the device (CUDA graph
    friendly); expected_m is a hint for the tile choice. Delegates to dskc.ops.moe.grouped_gemm_masked.
    """
    from dskc.ops import moe

    _check_recipe(recipe)

    (qa, sa), (qb, sb) = _pair("a", a), _pair("b", b)
    moe.grouped_gemm_masked(qa, sa, qb, sb, masked_m, expected_m, d)
