"""Multi-head Latent Attention (MLA) with YaRN rotary embeddings, "naive" and "absorb" variants.

naive:  caches per-head K (qk_nope + qk_rope) and V (v_head_dim), like ordinary multi-head attention.
absorb: caches the normalised latent kv (kv_lora_rank) and the shared rope key (qk_rope) per token; wkv_b's K
        half is folded into the query and its V half into the output. Both give the same result up to rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .args import ModelArgs
from .parallel import TP, Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, dtype: torch.dtype, eps: float = 1e-6, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _yarn_ramp(args: ModelArgs) -> torch.Tensor:
    """1 where a frequency keeps its value (fast rotations), 0 where it is divided by rope_factor (slow)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta

    def correction_dim(rotations: float) -> float:
        return dim * math.log(args.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(args.beta_fast)), 0)
    high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return 1 - ramp


def precompute_rope(args: ModelArgs, device=None) -> torch.Tensor:
    """cos/sin table [max_seq_len, qk_rope_head_dim // 2, 2] (float32). With args.yarn: YaRN frequencies (as the
    reference's precompute_freqs_cis and transformers' yarn rope) and cos/sin times args.rope_attn_factor
    (transformers' attention_factor; 1.0 for DeepSeek's own configs). max_seq_len only sets the table's length."""
    dim = args.qk_rope_head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.yarn:
        smooth = _yarn_ramp(args)
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), freqs)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    if args.yarn and args.rope_attn_factor != 1.0:
        table = table * args.rope_attn_factor
    return table.to(device)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as complex numbers, as the reference does.

    x: [bsz, seqlen, heads, rope_dim]; rope: [seqlen, rope_dim // 2, 2] (cos, sin). Computed in float32.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


class MLA(nn.Module):
    """Multi-head latent attention; attn_impl "naive" or "absorb" picks the cache layout (see module doc)."""

    def __init__(self, args: ModelArgs, attn_impl: str, *, dtype: torch.dtype, tp: TP = TP(), device=None):
        super().__init__()
        fp8 = args.dtype == "fp8"
        lin = dict(dtype=dtype, fp8=fp8, tp=tp, device=device)
        self.attn_impl = attn_impl
        self.n_local_heads = tp.split(args.n_heads, "n_heads")
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        if self.q_lora_rank == 0:
            self.wq = Linear(args.dim, args.n_heads * args.qk_head_dim, split="column", **lin)
        else:
            self.wq_a = Linear(args.dim, args.q_lora_rank, **lin)
            self.q_norm = RMSNorm(args.q_lora_rank, dtype=dtype, eps=args.norm_eps, device=device)
            self.wq_b = Linear(args.q_lora_rank, args.n_heads * args.qk_head_dim, split="column", **lin)
        self.wkv_a = Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim, **lin)
        self.kv_norm = RMSNorm(args.kv_lora_rank, dtype=dtype, eps=args.norm_eps, device=device)
        self.wkv_b = Linear(args.kv_lora_rank, args.n_heads * (self.nope + self.v_dim), split="column", **lin)
        self.wo = Linear(args.n_heads * self.v_dim, args.dim, split="row", **lin)
        self.softmax_scale = args.softmax_scale
        cache = (args.max_batch_size, args.max_seq_len)
        if attn_impl == "naive":
            h = self.n_local_heads
            self.register_buffer("k_cache", torch.zeros(*cache, h, args.qk_head_dim, dtype=dtype, device=device),
                                 persistent=False)
            self.register_buffer("v_cache", torch.zeros(*cache, h, self.v_dim, dtype=dtype, device=device),
                                 persistent=False)
        else:
            self.register_buffer("kv_cache", torch.zeros(*cache, self.kv_lora_rank, dtype=dtype, device=device),
                                 persistent=False)
            self.register_buffer("pe_cache", torch.zeros(*cache, self.rope, dtype=dtype, device=device),
                                 persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int, rope: torch.Tensor, mask: torch.Tensor | None):
        """x [bsz, seqlen, dim] at positions start_pos..start_pos+seqlen-1; writes the cache, returns [bsz, seqlen, dim].

        mask: None (seqlen == 1) or [seqlen, start_pos + seqlen] float32 with -inf above the causal diagonal.
        """
        attend = self._naive if self.attn_impl == "naive" else self._absorb
        out = attend(*self._project(x, rope), start_pos, mask)
        return self.wo(out.flatten(2))

    def forward_uncached(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of x [bsz, seqlen, dim] (positions 0..seqlen-1) over itself only: the naive form's arithmetic
        without reading or writing the KV cache, so it is differentiable and takes any batch size (training,
        dskc.model.train). rope: the table's first seqlen rows; mask: causal [seqlen, seqlen] or None."""
        q_nope, q_pe, kv, k_pe = self._project(x, rope)
        k_nope, v = self._kv_heads(kv)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_local_heads, -1)], -1)
        probs = self._softmax(torch.einsum("bshd,bthd->bsht", q, k), mask, q)
        return self.wo(torch.einsum("bsht,bthd->bshd", probs, v).flatten(2))

    def _project(self, x: torch.Tensor, rope: torch.Tensor):
        """x -> (q_nope, q_pe [bsz, seqlen, heads, *] with RoPE, latent kv [bsz, seqlen, kv_lora_rank] (before
        kv_norm), k_pe [bsz, seqlen, 1, qk_rope] with RoPE)."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(bsz, seqlen, self.n_local_heads, self.nope + self.rope)
        q_nope, q_pe = torch.split(q, [self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, rope)
        kv, k_pe = torch.split(self.wkv_a(x), [self.kv_lora_rank, self.rope], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), rope)
        return q_nope, q_pe, kv, k_pe

    def _kv_heads(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent kv [bsz, seqlen, kv_lora_rank] -> per-head (k_nope, v) through kv_norm and wkv_b."""
        bsz, seqlen = kv.shape[:2]
        kv = self.wkv_b(self.kv_norm(kv)).view(bsz, seqlen, self.n_local_heads, self.nope + self.v_dim)
        return torch.split(kv, [self.nope, self.v_dim], dim=-1)

    def _softmax(self, scores: torch.Tensor, mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        scores = scores.float() * self.softmax_scale
        if mask is not None:
            scores = scores + mask[:, None, :]  # [s, t] -> [s, 1 (heads), t]
        return scores.softmax(dim=-1).to(like.dtype)

    def _naive(self, q_nope, q_pe, kv, k_pe, start_pos, mask):
        bsz, seqlen = kv.shape[:2]
        end = start_pos + seqlen
        q = torch.cat([q_nope, q_pe], dim=-1)
        k_nope, v = self._kv_heads(kv)
        self.k_cache[:bsz, start_pos:end] = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_local_heads, -1)], -1)
        self.v_cache[:bsz, start_pos:end] = v
        scores = torch.einsum("bshd,bthd->bsht", q, self.k_cache[:bsz, :end])
        probs = self._softmax(scores, mask, q)
        return torch.einsum("bsht,bthd->bshd", probs, self.v_cache[:bsz, :end])

    def _absorb(self, q_nope, q_pe, kv, k_pe, start_pos, mask):
        bsz, seqlen = kv.shape[:2]
        end = start_pos + seqlen
        wkv_b = self.wkv_b.dense_weight().view(self.n_local_heads, self.nope + self.v_dim, self.kv_lora_rank)
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :self.nope])
        self.kv_cache[:bsz, start_pos:end] = self.kv_norm(kv)
        self.pe_cache[:bsz, start_pos:end] = k_pe.squeeze(2)
        scores = (torch.einsum("bshc,btc->bsht", q_latent, self.kv_cache[:bsz, :end])
                  + torch.einsum("bshr,btr->bsht", q_pe, self.pe_cache[:bsz, :end]))
        probs = self._softmax(scores, mask, q_nope)
        out_latent = torch.einsum("bsht,btc->bshc", probs, self.kv_cache[:bsz, :end])
        return torch.einsum("bshc,hdc->bshd", out_latent, wkv_b[:, self.nope:])
