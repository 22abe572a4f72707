"""MLA kernels: absorbed paged decode, non-absorbed varlen prefill, fused RoPE + RMSNorm + cache write.

Conventions shared by every function here:
  * Cache (absorbed form), paged, one kv head. kv_format "bf16": [num_blocks, page, 1, 576] in the query's float
    dtype (bf16 on GPUs; fp16/fp32 also accepted); kv_format "fp8": uint8 [num_blocks, page, 1, 656] per token
    = 512 e4m3 latent | 4 fp32 scales (latent group g of 128 is x_fp8 * scale[g]) | 64 bf16 rope key.
  * block_table [batch, max_blocks] int32: page ids of each sequence in order; page ids need not be increasing.
  * A sequence of length 0 is allowed: its rows get out = 0 and lse = -inf. Likewise a query row that sees no
    key under the causal mask.
  * lse is the natural-log log-sum-exp of the scaled logits, fp32.
Input values (seqlens against the block table, page ids against the cache, positions against the rope table,
cache slots against the cache) are checked with one device sync unless `validate=False` or a CUDA graph is being
captured; unchecked, the kernels confine them (never an out-of-bounds access): a seqlen is clamped to the block
table, a token on a page id outside the cache is skipped, a slot past the cache is not written, a position outside
the rope table rotates to NaN.
Precision: products on tensor cores in the operand dtype (fp32 operands run as TF32 on GPUs, Triton's default),
softmax and accumulation in fp32. The FP8 cache is decoded / encoded by bit manipulation (no fp8 type needed, so
sm_80 works too); encoding rounds to nearest-even via fp16, at most 1 ulp from a direct conversion.
"""
from __future__ import annotations

import math

import torch

from dskc.ops import _config as _cfg
from dskc.ops._validate import should_validate as _should_validate
from dskc.ops.mla_state import (FIXED_OVERHEAD_TILES, MLAMetadata, MLAStep, default_config, get_mla_metadata,  # noqa: F401
                               mla_step)
from dskc.templates.triton import mla_absorb as _abs
from dskc.templates.triton import mla_decode as _dec
from dskc.templates.triton import mla_prefill as _pre
from dskc.templates.triton import mla_rope as _rope
from dskc.templates.triton._problem import dtype_name as _dt

__all__ = ["MLAMetadata", "MLAStep", "get_mla_metadata", "mla_step", "mla_absorb_q", "mla_absorb_o", "mla_decode", "mla_prefill", "rope_norm_cache_write", "paged_slots",
           "quantize_mla_cache_fp8", "dequantize_mla_cache_fp8"]

D_LATENT, D_ROPE, D_QK = _dec.D_LATENT, _dec.D_ROPE, _dec.D_QK
FP8_TOKEN_BYTES = _dec.FP8_TOKEN_BYTES
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _check_decode(q, kv_cache, block_table, cache_seqlens, kv_format):
    """Shapes, dtypes and devices of mla_decode's operands; returns (batch, s_q, h_q, num_blocks, page)."""
    if q.dim() != 4 or q.shape[-1] != D_QK:
        raise ValueError(f"q must be [batch, s_q, h_q, {D_QK}] (512 latent + 64 rope), got {tuple(q.shape)}")
    if q.dtype not in _FLOATS:
        raise TypeError(f"q must be bf16/fp16/fp32, got {q.dtype}")
    if not q.is_contiguous() or q.data_ptr() % 16:
        raise ValueError("q must be contiguous with a 16-byte aligned base")
    b, s_q, h_q, _ = q.shape
    if not 1 <= h_q <= 128:
        raise ValueError(f"h_q must be in 1..128, got {h_q}")
    if kv_format == "bf16":
        if kv_cache.dim() != 4 or kv_cache.shape[2] != 1 or kv_cache.shape[3] != D_QK:
            raise ValueError(f"kv_cache (bf16 format) must be [num_blocks, page, 1, {D_QK}], got "
                             f"{tuple(kv_cache.shape)}")
        if kv_cache.dtype != q.dtype:
            raise TypeError(f"kv_cache dtype {kv_cache.dtype} must match q dtype {q.dtype} in the bf16 format")
    elif kv_format == "fp8":
        if kv_cache.dim() != 4 or kv_cache.shape[2] != 1 or kv_cache.shape[3] != FP8_TOKEN_BYTES:
            raise ValueError(f"kv_cache (fp8 format) must be uint8 [num_blocks, page, 1, {FP8_TOKEN_BYTES}], got "
                             f"{tuple(kv_cache.shape)}")
        if kv_cache.dtype != torch.uint8:
            raise TypeError(f"kv_cache in the fp8 format must be uint8 bytes, got {kv_cache.dtype}")
        if q.dtype == torch.float32:
            raise TypeError("the fp8 cache needs a 16-bit query (bf16 or fp16)")
    else:
        raise ValueError(f"kv_format must be 'bf16' or 'fp8', got {kv_format!r}")
    if not kv_cache.is_contiguous() or kv_cache.data_ptr() % 16:
        raise ValueError("kv_cache must be contiguous with a 16-byte aligned base")
    page = kv_cache.shape[1]
    if not 1 <= page <= 256:
        raise ValueError(f"page size must be in 1..256, got {page}")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != b:
        raise TypeError(f"block_table must be int32 [batch={b}, max_blocks], got {block_table.dtype} "
                        f"{tuple(block_table.shape)}")
    if block_table.stride(-1) != 1:
        raise ValueError("block_table must have a contiguous last dimension")
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (b,):
        raise TypeError(f"cache_seqlens must be int32 [batch={b}], got {cache_seqlens.dtype} "
                        f"{tuple(cache_seqlens.shape)}")
    for name, t in (("kv_cache", kv_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    return b, s_q, h_q, kv_cache.shape[0], page


def validate_paged(block_table, cache_seqlens, num_blocks: int, page: int) -> None:
    """Seqlens within 0..max_blocks*page, used page ids within 0..num_blocks-1 (one device sync)."""
    cap = block_table.shape[1] * page
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page < cache_seqlens[:, None]
    bad_ids = used & ((block_table < 0) | (block_table >= num_blocks))
    flags = torch.stack([(cache_seqlens < 0).any(), (cache_seqlens > cap).any(), bad_ids.any()]).tolist()
    if flags[0]:
        raise ValueError(f"cache_seqlens has negative entries: {cache_seqlens.tolist()}")
    if flags[1]:
        raise ValueError(f"cache_seqlens exceed the block table's capacity {cap} tokens "
                         f"({block_table.shape[1]} blocks x page {page}): max {int(cache_seqlens.max())}")
    if flags[2]:
        bad = block_table[bad_ids]
        raise ValueError(f"block_table holds page ids outside 0..{num_blocks - 1} where the sequence is in use, "
                         f"e.g. {bad[:4].tolist()}")


def _cache_views(kv_cache, kv_format):
    """(kv, scales, rope) views of the cache whose bases the kernel offsets by token * constexpr stride."""
    if kv_format == "fp8":
        flat = kv_cache.view(-1, FP8_TOKEN_BYTES)
        return (flat, flat.view(torch.float32)[:, D_LATENT // 4:],
                flat.view(torch.bfloat16)[:, (D_LATENT + 16) // 2:])
    flat = kv_cache.view(-1, D_QK)
    return flat, flat, flat[:, D_LATENT:]


def mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal=False, kv_format="bf16",
               num_splits=None, metadata=None, config=None, validate=None):
    """Absorbed MLA decode over a paged latent cache.

    q: [batch, s_q, h_q, 576] bf16/fp16/fp32 (512 latent-space query + 64 rope), h_q in 1..128;
    kv_cache, block_table, cache_seqlens: see the module docstring; softmax_scale: float multiplying q.k;
    causal: query row s (of s_q) sees keys [0, seqlen - s_q + s]; otherwise all `seqlen` keys.
    num_splits: number of programs the work is balanced over (default: SMs / row blocks); ignored when
    `metadata` (from get_mla_metadata / mla_step with the same seqlens and s_q*h_q) is given. A metadata of one part
    per sequence (combine False) launches the split kernel alone.
    Returns out [batch, s_q, h_q, 512] in q's dtype and lse [batch, h_q, s_q] fp32.
    """
    b, s_q, h_q, num_blocks, page = _check_decode(q, kv_cache, block_table, cache_seqlens, kv_format)
    split = metadata is None or metadata.combine
    problem = _dec.Problem(b, s_q, h_q, block_table.shape[1] * page, page, kv_format == "fp8", _dt(q.dtype),
                           bool(causal), int(split))
    cfg = dict(_cfg.resolve(_dec.STEM, q.device, config, problem))
    rows = s_q * h_q
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale}")
    if _should_validate(validate, q.device):       # before any launch (the schedule's included)
        validate_paged(block_table, cache_seqlens, num_blocks, page)
    if metadata is None:
        metadata = get_mla_metadata(cache_seqlens, rows, 1, block_m=cfg["BLOCK_M"], block_n=cfg["BLOCK_N"],
                                    block_dv=cfg["BLOCK_DV"], num_parts=num_splits)
    elif metadata.num_q_rows != rows or metadata.num_splits.shape[0] != b + 1:
        raise ValueError(f"metadata was made for {metadata.num_q_rows} rows and batch "
                         f"{metadata.num_splits.shape[0] - 1}; this call has {rows} rows and batch {b}")
    cfg["BLOCK_N"] = metadata.block_n
    out = torch.empty(b, s_q, h_q, D_LATENT, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    if b == 0:
        return out, lse
    parts = metadata.tile_scheduler_metadata.shape[0]
    acc_rows = b + parts if split else 1          # unsplit: every piece is written straight to out / lse
    oacc = torch.empty(acc_rows, rows, D_LATENT, dtype=torch.float32, device=q.device)
    lacc = torch.empty(acc_rows, rows, dtype=torch.float32, device=q.device)
    kv, sc, rope = _cache_views(kv_cache, kv_format)
    grid = (parts, triton_cdiv(rows, cfg["BLOCK_M"]), D_LATENT // cfg["BLOCK_DV"])
    kw = _dec.bind(problem, cfg)
    _dec.mla_decode_split_kernel[grid](
        q, kv, sc, rope, block_table, cache_seqlens, metadata.tile_scheduler_metadata, metadata.num_splits,
        out, lse, oacc, lacc, s_q, h_q, block_table.stride(0), lse.stride(0), lse.stride(1), num_blocks,
        block_table.shape[1] * page, float(softmax_scale) * math.log2(math.e), **kw["mla_decode_split_kernel"])
    if split:
        _dec.mla_decode_combine_kernel[(b, triton_cdiv(rows, _dec.COMBINE_BLOCK_R))](
            out, lse, oacc, lacc, metadata.num_splits, s_q, h_q, out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1), **kw["mla_decode_combine_kernel"])
    return out, lse


def mla_absorb_q(q, w_uk_t, rope_table, rope_rows, out_dtype, config=None):
    """The absorbed decode query, assembled in place: [T, H, 576] of out_dtype (one launch).

    q [T, H, nope + 64] (wq / wq_b's output as [tokens, heads, width]; unit last stride, any row / head strides;
    nope a power of two in 16..256),
    w_uk_t [H, 512, nope] of out_dtype (wkv_b's K half, each head transposed), rope_table fp32 [max_pos, 32, 2],
    rope_rows int32 [T] (each token's row of the table; not checked: dskc.ops.mla_step made them; a row outside the
    table gives that token a NaN rope part, never a read outside it).
    Returns qq with qq[..., :512] = q[..., :nope] @ W_UK[h] and qq[..., 512:] = RoPE(q[..., nope:]), q's elements
    rounded to out_dtype first (as a query converted for the cache dtype), fp32 accumulation.
    """
    if q.dim() != 3 or q.stride(-1) != 1 or q.dtype not in _FLOATS:
        raise ValueError(f"q must be float [T, H, nope + 64] with a unit last stride, got {q.dtype} {tuple(q.shape)}")
    t, h, width = q.shape
    nope = width - D_ROPE
    if out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be bf16/fp16/fp32, got {out_dtype}")
    if not 16 <= nope <= 256 or nope & (nope - 1):      # the whole no-rope width is one dot's K (a power of two)
        raise ValueError(f"mla_absorb_q serves a no-rope width of 16, 32, 64, 128 or 256, got q's {width} = "
                         f"{nope} + {D_ROPE}")
    if tuple(w_uk_t.shape) != (h, D_LATENT, nope) or w_uk_t.dtype != out_dtype or not w_uk_t.is_contiguous():
        raise ValueError(f"w_uk_t must be contiguous {out_dtype} [{h}, {D_LATENT}, {nope}], got {w_uk_t.dtype} "
                         f"{tuple(w_uk_t.shape)}")
    if rope_table.dtype != torch.float32 or rope_table.dim() != 3 or rope_table.shape[1:] != (D_ROPE // 2, 2):
        raise TypeError(f"rope_table must be fp32 [max_pos, {D_ROPE // 2}, 2], got {tuple(rope_table.shape)}")
    if rope_rows.dtype != torch.int32 or tuple(rope_rows.shape) != (t,):
        raise TypeError(f"rope_rows must be int32 [{t}]")
    problem = _abs.Problem(t, h, nope, 0, _dt(out_dtype), _dt(q.dtype), "q")
    cfg = _cfg.resolve(_abs.STEM, q.device, config, problem)
    qq = torch.empty(t, h, D_QK, dtype=out_dtype, device=q.device)
    if t:
        grid = (h, triton_cdiv(t, cfg["BLOCK_T"]), D_LATENT // cfg["BLOCK_C"])
        _abs.mla_q_absorb_kernel[grid](q, w_uk_t, rope_table.contiguous(), rope_rows, qq, t, h, q.stride(0),
                                       q.stride(1), rope_table.shape[0],
                                       **_abs.bind(problem, cfg)["mla_q_absorb_kernel"])
    return qq


def mla_absorb_o(out, w_uv, act_dtype, quant: bool, config=None):
    """The attention output through wkv_b's V half, ready for wo (one launch).

    out [T, H, 512] (mla_decode's, contiguous), w_uv [H, V, 512] of out's dtype (V = 64 or a multiple of 128).
    o = out @ W_UV[h]^T per head, rounded to out's dtype then to act_dtype (the unfused path's roundings), flattened to
    [T, H * V]. quant: returns (q e4m3 [T, H*V], s fp32 [T, H*V / 128]) quantised as act_quant does, for an FP8 wo;
    else o [T, H * V] in out's dtype (holding act_dtype's values: what a 16-bit wo's GEMM takes).
    """
    if out.dim() != 3 or out.shape[-1] != D_LATENT or not out.is_contiguous() or out.dtype not in _FLOATS:
        raise ValueError(f"out must be contiguous float [T, H, {D_LATENT}], got {out.dtype} {tuple(out.shape)}")
    t, h, _ = out.shape
    if act_dtype not in _FLOATS:
        raise TypeError(f"act_dtype must be bf16/fp16/fp32, got {act_dtype}")
    if w_uv.dim() != 3 or w_uv.shape[0] != h or w_uv.shape[2] != D_LATENT or w_uv.dtype != out.dtype \
            or not w_uv.is_contiguous():
        raise ValueError(f"w_uv must be contiguous {out.dtype} [{h}, V, {D_LATENT}], got {w_uv.dtype} "
                         f"{tuple(w_uv.shape)}")
    v = w_uv.shape[1]
    if not (v == 64 and h % 2 == 0) and v % 128:
        raise ValueError(f"mla_absorb_o serves V = 64 (an even number of heads) or a multiple of 128, got V={v}, "
                         f"H={h}")
    problem = _abs.Problem(t, h, 0, v, _dt(out.dtype), _dt(act_dtype), "o", int(quant))
    cfg = _cfg.resolve(_abs.STEM, out.device, config, problem)
    if quant:
        y = torch.empty(t, h * v, dtype=torch.float8_e4m3fn, device=out.device)
        s = torch.empty(t, h * v // 128, dtype=torch.float32, device=out.device)
    else:
        y = torch.empty(t, h * v, dtype=out.dtype, device=out.device)
        s = y
    if t:
        _abs.mla_o_absorb_kernel[(triton_cdiv(t, cfg["BLOCK_T"]), h * v // 128)](
            out, w_uv, y.view(torch.uint8) if quant else y, s if quant else out, t, h,
            **_abs.bind(problem, cfg)["mla_o_absorb_kernel"])
    return (y, s) if quant else y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def quantize_mla_cache_fp8(kv: torch.Tensor) -> torch.Tensor:
    """Pack float [..., 576] (512 latent + 64 rope) into the 656-byte FP8 token layout, uint8 [..., 656].

    Each group of 128 latent values gets scale = max(amax, 1e-4) / 448 (fp32) and e4m3 values x / scale; a NaN or
    inf latent value is stored as e4m3 NaN and left out of the amax (act_quant's contract, as the kernels' cache
    writes); the rope key is stored as bf16.
    """
    if kv.shape[-1] != D_QK or kv.dtype not in _FLOATS:
        raise ValueError(f"kv must be float [..., {D_QK}], got {kv.dtype} {tuple(kv.shape)}")
    lead = kv.shape[:-1]
    lat = kv[..., :D_LATENT].float().reshape(*lead, 4, 128)
    finite = torch.isfinite(lat)
    lat = torch.where(finite, lat, 0.0)
    scale = lat.abs().amax(-1).clamp_min(1e-4) / 448.0
    q8 = torch.where(finite, (lat / scale[..., None]).clamp(-448, 448), float("nan"))
    q8 = q8.to(torch.float8_e4m3fn).reshape(*lead, D_LATENT)
    out = torch.empty(*lead, FP8_TOKEN_BYTES, dtype=torch.uint8, device=kv.device)
    out[..., :D_LATENT] = q8.view(torch.uint8)
    out[..., D_LATENT:D_LATENT + 16] = scale.contiguous().view(torch.uint8).reshape(*lead, 16)
    rope = kv[..., D_LATENT:].to(torch.bfloat16).contiguous()
    out[..., D_LATENT + 16:] = rope.view(torch.uint8).reshape(*lead, 2 * D_ROPE)
    return out


def dequantize_mla_cache_fp8(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_mla_cache_fp8: uint8 [..., 656] -> float32 [..., 576]."""
    if packed.shape[-1] != FP8_TOKEN_BYTES or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8 [..., {FP8_TOKEN_BYTES}], got {packed.dtype} {tuple(packed.shape)}")
    lead = packed.shape[:-1]
    p = packed.contiguous()
    lat = p[..., :D_LATENT].view(torch.float8_e4m3fn).float().reshape(*lead, 4, 128)
    scale = p[..., D_LATENT:D_LATENT + 16].contiguous().view(torch.float32).reshape(*lead, 4)
    rope = p[..., D_LATENT + 16:].contiguous().view(torch.bfloat16).float()
    return torch.cat([(lat * scale[..., None]).reshape(*lead, D_LATENT), rope], -1)


def paged_slots(block_table: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor, page_size: int):
    """Flat cache slots (page id * page_size + offset), int32, for tokens at `positions` of sequences `seq_ids`."""
    pos = positions.long()
    return (block_table[seq_ids.long(), pos // page_size].long() * page_size + pos % page_size).to(torch.int32)


def _check_cache_target(kv_cache, slots, kv_format, tokens, device, validate=None):
    if kv_format not in ("bf16", "fp8"):
        raise ValueError(f"kv_format must be 'bf16' or 'fp8', got {kv_format!r}")
    width = FP8_TOKEN_BYTES if kv_format == "fp8" else D_QK
    if kv_cache.dim() != 4 or kv_cache.shape[2] != 1 or kv_cache.shape[3] != width:
        raise ValueError(f"kv_cache ({kv_format}) must be [num_blocks, page, 1, {width}], got {tuple(kv_cache.shape)}")
    if kv_format == "fp8" and kv_cache.dtype != torch.uint8:
        raise TypeError(f"kv_cache in the fp8 format must be uint8, got {kv_cache.dtype}")
    if not kv_cache.is_contiguous() or kv_cache.device != device:
        raise ValueError("kv_cache must be contiguous and on the inputs' device")
    if slots is None or slots.dtype != torch.int32 or tuple(slots.shape) != (tokens,):
        raise TypeError(f"slots must be int32 [{tokens}] (see paged_slots), got "
                        f"{None if slots is None else (slots.dtype, tuple(slots.shape))}")
    capacity = kv_cache.shape[0] * kv_cache.shape[1]
    if tokens and _should_validate(validate, device) and bool((slots >= capacity).any()):
        raise ValueError(f"slots beyond the cache's {capacity} token slots")


def _rope_dtype(kv_a, q_pe, dense_cache) -> torch.dtype:
    """The dtype of the rope kernel's query and norm weight: q_pe's, else the dense cache's, else kv_a's (kv_a and
    the cache may differ: converted on the write)."""
    if dense_cache is not None and dense_cache.dtype not in _FLOATS:
        raise TypeError(f"a dense kv_cache must be bf16/fp16/fp32, got {dense_cache.dtype}")
    if q_pe is not None:
        return q_pe.dtype
    return dense_cache.dtype if dense_cache is not None else kv_a.dtype


def rope_norm_cache_write(kv_a, norm_weight, rope_table, positions, q_pe=None, *, eps=1e-6, kv_cache=None,
                          slots=None, kv_format="bf16", config=None, validate=None):
    """RMSNorm the latent, rotate the rope key (and q_pe in place), optionally write both into the paged cache.

    kv_a: [T, 576] (wkv_a output: 512 latent | 64 rope key, last dim contiguous, any row stride: e.g. a column
    slice of a stacked projection's output); norm_weight [512]; rope_table: fp32 [max_pos, 32, 2] (cos, sin) as
    dskc.model.mla.precompute_rope; positions: int32 [T]; q_pe: [T, H, 64] with unit last stride (e.g. q[..., 128:]),
    rotated in place; kv_cache (see module doc) with slots int32 [T] = page id * page + offset (negative: skip).
    A dense cache may have another float dtype than kv_a and q_pe (values are converted on the write; a norm_weight
    of another dtype than the query's, else the cache's, is converted first). Returns (latent [T, 512], k_pe [T, 64]) in kv_a's dtype. RoPE pairs
    (x[2i], x[2i+1]); math in fp32. validate: positions and slots are checked (one sync) unless False or a CUDA graph
    is being captured (see the module docstring for what the kernel does unchecked).
    """
    if kv_a.dim() != 2 or kv_a.shape[1] != D_QK or kv_a.stride(1) != 1 or kv_a.dtype not in _FLOATS:
        raise ValueError(f"kv_a must be float [T, {D_QK}] with a unit last stride, got {kv_a.dtype} "
                         f"{tuple(kv_a.shape)}")
    t = kv_a.shape[0]
    if tuple(norm_weight.shape) != (D_LATENT,):
        raise ValueError(f"norm_weight must be [{D_LATENT}], got {tuple(norm_weight.shape)}")
    if norm_weight.dtype not in _FLOATS:
        raise TypeError(f"norm_weight must be bf16/fp16/fp32, got {norm_weight.dtype}")
    if rope_table.dtype != torch.float32 or rope_table.dim() != 3 or rope_table.shape[1:] != (D_ROPE // 2, 2):
        raise TypeError(f"rope_table must be fp32 [max_pos, {D_ROPE // 2}, 2], got {rope_table.dtype} "
                        f"{tuple(rope_table.shape)}")
    if positions.dtype != torch.int32 or tuple(positions.shape) != (t,):
        raise TypeError(f"positions must be int32 [{t}]")
    if t and _should_validate(validate, positions.device) and bool(
            ((positions < 0) | (positions >= rope_table.shape[0])).any()):
        raise ValueError(f"positions outside the rope table's 0..{rope_table.shape[0] - 1}")
    if q_pe is not None and (q_pe.dim() != 3 or q_pe.shape[0] != t or q_pe.shape[2] != D_ROPE
                             or q_pe.stride(2) != 1 or q_pe.dtype not in _FLOATS):
        raise ValueError(f"q_pe must be float [{t}, H, {D_ROPE}] with a unit last stride, got "
                         f"{q_pe.dtype} {tuple(q_pe.shape)}")
    write = kv_cache is not None
    if write:
        _check_cache_target(kv_cache, slots, kv_format, t, kv_a.device, validate)
    heads = q_pe.shape[1] if q_pe is not None else 0
    dense = kv_cache if write and kv_format == "bf16" else None
    dtype = _rope_dtype(kv_a, q_pe, dense)
    if norm_weight.dtype != dtype:
        norm_weight = norm_weight.to(dtype)
    problem = _rope.Problem(t, heads, write and kv_format == "fp8", _dt(dtype), write,
                            "" if kv_a.dtype == dtype else _dt(kv_a.dtype),
                            "" if dense is None or dense.dtype == dtype else _dt(dense.dtype))
    cfg = _cfg.resolve(_rope.STEM, kv_a.device, config, problem)
    lat = torch.empty(t, D_LATENT, dtype=kv_a.dtype, device=kv_a.device)
    pe = torch.empty(t, D_ROPE, dtype=kv_a.dtype, device=kv_a.device)
    if t == 0:
        return lat, pe
    qp = q_pe if q_pe is not None else pe.view(t, 1, D_ROPE)[:, :0]
    if write:
        cache, sc, crope = _cache_views(kv_cache, kv_format)
    else:
        cache = sc = crope = lat
        slots = positions
    _rope.mla_rope_norm_kernel[(triton_cdiv(t, cfg["BLOCK_T"]),)](
        kv_a, norm_weight, rope_table.contiguous(), positions, qp, lat, pe, slots, cache, sc, crope, t,
        qp.shape[1], kv_a.stride(0), qp.stride(0), max(qp.stride(1), 1), rope_table.shape[0],
        kv_cache.shape[0] * kv_cache.shape[1] if write else 0, float(eps),
        **_rope.bind(problem, cfg)["mla_rope_norm_kernel"])
    return lat, pe


def _check_prefill(q, k, v, cu_q, cu_k):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [tokens, heads, dim], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.dtype not in _FLOATS or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1:] != k.shape[1:] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"head counts / q-k widths / k-v token counts disagree: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k, v need a unit last stride")
    d_v = v.shape[2]
    if d_v & (d_v - 1):
        raise ValueError(f"v head dim must be a power of two, got {d_v}")
    _pre.split_qk(q.shape[2])
    for name, cu, total in (("cu_seqlens_q", cu_q, q.shape[0]), ("cu_seqlens_k", cu_k, k.shape[0])):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1 or cu.device != q.device:
            raise TypeError(f"{name} must be int32 [batch + 1] on q's device")
        if cu.numel() != cu_q.numel():
            raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length")
        if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name} must rise from 0 to {total} tokens, got {cu.tolist()[:8]}...")
    return int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0


def mla_prefill(q, k, v, cu_seqlens_q, softmax_scale, causal=True, *, cu_seqlens_k=None, max_seqlen_q=None,
                kv_latent=None, k_rope=None, kv_cache=None, slots=None, kv_format="bf16", config=None, validate=None):
    """Non-absorbed MLA prefill: varlen attention with q/k width D_QK (e.g. 192 = 128 + 64) and v width D_V (128).

    q [T_q, H, D_QK], k [T_k, H, D_QK], v [T_k, H, D_V] (one float dtype, unit last stride); cu_seqlens_q/k int32
    [batch + 1] (k defaults to q's). causal: query i of a sequence sees keys [0, len_k - len_q + i].
    With kv_cache: the new tokens' kv_latent [T_q, 512] and k_rope [T_q, 64] (already normed / rotated, see
    rope_norm_cache_write) are written into the paged cache at int32 `slots` [T_q] in the same launch.
    max_seqlen_q: the longest query sequence (computed from cu_seqlens_q when None); a larger value only adds
    idle programs, a smaller one is refused (ValueError: it sizes the grid). validate: the cache slots are checked
    as in rope_norm_cache_write.
    Returns out [T_q, H, D_V] in q's dtype and lse [T_q, H] fp32 (-inf where a row sees no key, out 0 there).
    """
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    longest = _check_prefill(q, k, v, cu_seqlens_q, cu_k)
    if max_seqlen_q is None:
        max_seqlen_q = longest
    elif not isinstance(max_seqlen_q, int) or max_seqlen_q < longest:
        raise ValueError(f"max_seqlen_q={max_seqlen_q!r} must be an int >= the longest query sequence ({longest}): "
                         f"it sizes the grid, and rows past it would be left unwritten")
    t_q, heads, d_qk = q.shape
    d_a, d_b = _pre.split_qk(d_qk)
    write = kv_cache is not None
    if write:
        _check_cache_target(kv_cache, slots, kv_format, t_q, q.device, validate)
        for name, x, w in (("kv_latent", kv_latent, D_LATENT), ("k_rope", k_rope, D_ROPE)):
            if x is None or x.dim() != 2 or tuple(x.shape) != (t_q, w) or x.stride(1) != 1:
                raise ValueError(f"{name} must be [{t_q}, {w}] with a unit last stride when kv_cache is given")
        cache, sc, crope = _cache_views(kv_cache, kv_format)
    else:
        kv_latent = k_rope = cache = sc = crope = q
        slots = cu_seqlens_q
    out = torch.empty(t_q, heads, v.shape[2], dtype=q.dtype, device=q.device)
    lse = torch.empty(t_q, heads, dtype=torch.float32, device=q.device)
    batch = cu_seqlens_q.numel() - 1
    problem = _pre.Problem(max(batch, 1), max(max_seqlen_q, 1), heads, d_qk, v.shape[2],
                           write and kv_format == "fp8", _dt(q.dtype), bool(causal), write)
    cfg = _cfg.resolve(_pre.STEM, q.device, config, problem)
    if batch == 0 or max_seqlen_q == 0 or heads == 0:
        return out, lse
    grid = (triton_cdiv(max_seqlen_q, cfg["BLOCK_M"]), batch, heads)
    _pre.mla_prefill_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_k, kv_latent, k_rope, slots, cache, sc, crope,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), kv_latent.stride(0), k_rope.stride(0), kv_cache.shape[0] * kv_cache.shape[1] if write else 0,
        float(softmax_scale) * math.log2(math.e), **_pre.bind(problem, cfg)["mla_prefill_kernel"])
    return out, lse
