"""FlashMLA's dense-decode entry points with FlashMLA's names and signatures, backed by dskc's Triton MLA decode.

An engine written against `flash_mla` switches by changing the import:

    from dskc.compat.flash_mla import get_mla_metadata, flash_mla_with_kvcache
    tile_md, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, tile_md, num_splits,
                                      softmax_scale, causal)

Semantics follow FlashMLA's classic (pre-sparse) interface: q [b, s_q, h_q, 576], k_cache [blocks, page, 1, 576]
(bf16) or, with is_fp8_kvcache=True, the 656-byte FP8 layout [blocks, page, 1, 656] (uint8 or float8_e4m3fn
bytes); returns out [b, s_q, h_q, 512] in q's dtype and lse [b, h_q, s_q] fp32. The scheduling tensors are
dskc's own (same shapes: int32 [num_sm_parts, 8] and int32 [b + 1]); they are only meaningful to this module.
Not supported (raise): sparse attention (indices / topk), fp8 queries with descales, h_kv != 1.
"""
from __future__ import annotations

import torch

from dskc.ops import mla as _mla

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache"]


def get_mla_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int,
                     num_heads_q: int | None = None, is_fp8_kvcache: bool = False, topk: int | None = None):
    """Split-KV schedule for a decode step: (tile_scheduler_metadata int32 [parts, 8], num_splits int32 [b+1]).

    num_q_tokens_per_head_k = s_q * h_q // num_heads_k. Computed on the device of cache_seqlens, no host sync.
    """
    if topk is not None:
        raise NotImplementedError("dskc.compat.flash_mla supports dense decode only (topk must be None)")
    md = _mla.get_mla_metadata(cache_seqlens, int(num_q_tokens_per_head_k), int(num_heads_k))
    return md.tile_scheduler_metadata, md.num_splits


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int, tile_scheduler_metadata: torch.Tensor,
                           num_splits: torch.Tensor, softmax_scale: float | None = None, causal: bool = False,
                           descale_q: torch.Tensor | None = None, descale_k: torch.Tensor | None = None,
                           is_fp8_kvcache: bool = False, indices: torch.Tensor | None = None):
    """Dense MLA decode with FlashMLA's contract; returns (out, softmax_lse). See the module docstring."""
    if head_dim_v != _mla.D_LATENT:
        raise ValueError(f"head_dim_v must be {_mla.D_LATENT}, got {head_dim_v}")
    if indices is not None:
        raise NotImplementedError("sparse attention (indices) is not supported by dskc.compat.flash_mla")
    if descale_q is not None or descale_k is not None:
        raise NotImplementedError("fp8 queries with descale_q/descale_k are not supported; pass a bf16 query")
    if not isinstance(tile_scheduler_metadata, torch.Tensor) or not isinstance(num_splits, torch.Tensor):
        raise TypeError("tile_scheduler_metadata and num_splits must be the tensors from get_mla_metadata")
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, s_q, h_q, 576], got {tuple(q.shape)}")
    if k_cache.dim() == 4 and k_cache.shape[2] != 1:
        raise ValueError(f"MLA has one kv head; k_cache has {k_cache.shape[2]}")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    kv_format = "fp8" if is_fp8_kvcache else "bf16"
    if is_fp8_kvcache and k_cache.dtype == torch.float8_e4m3fn:
        k_cache = k_cache.view(torch.uint8)
    cfg = _mla.default_config(q.device)
    if tile_scheduler_metadata.dim() != 2 or tile_scheduler_metadata.shape[1] != 8 or \
            tile_scheduler_metadata.dtype != torch.int32:
        raise TypeError("tile_scheduler_metadata must be int32 [num_sm_parts, 8] from get_mla_metadata")
    metadata = _mla.MLAMetadata(tile_scheduler_metadata, num_splits, cfg["BLOCK_M"], cfg["BLOCK_N"],
                                q.shape[1] * q.shape[2])
    return _mla.mla_decode(q, k_cache, block_table, cache_seqlens, float(softmax_scale), causal=causal,
                           kv_format=kv_format, metadata=metadata, config=cfg)
