"""MLA attention on generated kernels: absorbed form over a paged latent cache.

Prologue (one kernel): RMSNorm of the latent kv, RoPE of q_pe and k_pe, write into the paged cache.
Core: `mla_decode` (split-KV flash decoding, causal over the new tokens, so prefill runs through it too).
wkv_b is absorbed ahead of time: its K half folds into the query, its V half into the output.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dskc import ops
from dskc.runtime.modules import dot_dtype
from dskc.runtime.table import config as _cfg
from dskc.select.launches import MLA_PAGE

PAGE = MLA_PAGE   # the page size selection plans with (a table's decode problem names it)


class KernelMLA(nn.Module):
    """table: the region's ConfigTable (slots "rope", "decode", "prefill"); None: the ops choose."""

    def __init__(self, src: nn.Module, node, max_batch: int, max_seq: int, table=None):
        super().__init__()
        self.node, self.table = node, table
        self.page = table.problem("decode", 1)["page_size"] if table is not None else PAGE
        self.heads, self.nope, self.rope_dim, self.v_dim = src.n_local_heads, src.nope, src.rope, src.v_dim
        self.c = src.kv_lora_rank
        if self.c != 512 or self.rope_dim != 64:
            raise ValueError(f"{node.name}: the MLA kernels serve kv_lora_rank 512 + rope 64 (576), got "
                             f"{self.c} + {self.rope_dim}")
        self.q_lora_rank, self.softmax_scale, self.eps = src.q_lora_rank, src.softmax_scale, src.kv_norm.eps
        # the projections stay child modules (each lowered on its own as a linear region)
        for name in ("wq", "wq_a", "q_norm", "wq_b", "wkv_a", "wo"):
            if hasattr(src, name):
                setattr(self, name, getattr(src, name))
        dtype = src.kv_norm.weight.dtype
        self.kdtype = dot_dtype(dtype)
        wkv_b = src.wkv_b.dense_weight().view(self.heads, self.nope + self.v_dim, self.c)
        self.register_buffer("w_uk", wkv_b[:, :self.nope].to(self.kdtype).contiguous(), persistent=False)
        self.register_buffer("w_uv", wkv_b[:, self.nope:].to(self.kdtype).contiguous(), persistent=False)
        self.register_buffer("kv_norm_weight", src.kv_norm.weight.detach().to(self.kdtype), persistent=False)
        pages = -(-max_seq // self.page)
        self.register_buffer("cache", torch.zeros(max_batch * pages, self.page, 1, self.c + self.rope_dim,
                                                  dtype=self.kdtype, device=wkv_b.device), persistent=False)
        self.register_buffer("block_table", torch.arange(max_batch * pages, dtype=torch.int32,
                                                         device=wkv_b.device).view(max_batch, pages),
                             persistent=False)

    def input_projections(self) -> tuple:
        """The projections of the block input x: (wq_a, wkv_a), or (wq, wkv_a) when q_lora_rank == 0."""
        return (self.wq if self.q_lora_rank == 0 else self.wq_a), self.wkv_a

    def _query(self, qa: torch.Tensor) -> torch.Tensor:
        """The query from the first projection's output: wq's is the query; wq_a's goes through q_norm -> wq_b."""
        if self.q_lora_rank == 0:
            return qa
        if getattr(self.wq_b, "fp8", False) and self.wq_b.node.attr("prologue") == "rmsnorm_act_quant":
            # q_norm fused with the 1x128 quantisation that wq_b's FP8 GEMM needs: one kernel, no bf16 round trip
            h2 = qa.reshape(-1, qa.shape[-1])
            tab, t = self.wq_b.table, h2.shape[0]
            q8, s8 = ops.rmsnorm_act_quant(h2, self.q_norm.weight.to(h2.dtype), self.q_norm.eps,
                                           config=_cfg(tab, "quant", t))
            q = ops.fp8_gemm(q8, s8, self.wq_b.weight, self.wq_b.scale, out_dtype=qa.dtype,
                             config=_cfg(tab, "gemm", t))
            return q.view(*qa.shape[:-1], q.shape[-1])
        return self.wq_b(self.q_norm(qa))

    def forward(self, x: torch.Tensor, start_pos: int, rope: torch.Tensor, mask=None) -> torch.Tensor:
        first, wkv_a = self.input_projections()
        return self.attend_projected(first(x), wkv_a(x), start_pos, rope)

    def attend_projected(self, qa: torch.Tensor, kv_a: torch.Tensor, start_pos: int, rope: torch.Tensor):
        """The attention after its input projections, for a caller that computed them itself (dskc.runtime.block
        runs both as one GEMM): qa = wq_a(x) (or wq(x)) [bsz, seqlen, N], kv_a = wkv_a(x) [bsz, seqlen, 576], in x's
        dtype; last dims may be strided views. Returns wo's output [bsz, seqlen, dim] in that dtype."""
        if kv_a.dim() != 3 or qa.shape[:2] != kv_a.shape[:2] or kv_a.shape[-1] != self.c + self.rope_dim:
            raise ValueError(f"{self.node.name}: attend_projected takes qa [bsz, seqlen, N] and kv_a [bsz, seqlen, "
                             f"{self.c + self.rope_dim}], got {tuple(qa.shape)} and {tuple(kv_a.shape)}")
        bsz, seqlen, _ = kv_a.shape
        t = bsz * seqlen
        q = self._query(qa)
        q = q.reshape(t, self.heads, self.nope + self.rope_dim).to(self.kdtype)
        kv_a_c = kv_a.reshape(t, self.c + self.rope_dim).to(self.kdtype).contiguous()
        dev = kv_a.device
        seq_ids = torch.arange(bsz, dtype=torch.int32, device=dev).repeat_interleave(seqlen)
        if isinstance(start_pos, torch.Tensor):
            # one decode token per sequence at device positions (dskc.runtime.graphs): no host value is read, so
            # the step can be captured in a CUDA graph; `rope` is then the whole table, indexed by position
            if seqlen != 1 or start_pos.dtype != torch.int32 or tuple(start_pos.shape) != (bsz,):
                raise ValueError(f"{self.node.name}: device positions need one token per sequence and int32 "
                                 f"[{bsz}] positions, got seqlen {seqlen}, {start_pos.dtype} {tuple(start_pos.shape)}")
            positions, rope_rows, seqlens = start_pos, start_pos, start_pos + 1
        else:
            local = torch.arange(seqlen, dtype=torch.int32, device=dev)
            positions, rope_rows = (local + start_pos).repeat(bsz), local.repeat(bsz)
            seqlens = torch.full((bsz,), start_pos + seqlen, dtype=torch.int32, device=dev)
        slots = ops.paged_slots(self.block_table, seq_ids, positions, self.page)
        q_pe = q[..., self.nope:]
        ops.rope_norm_cache_write(kv_a_c, self.kv_norm_weight, rope.float(), rope_rows, q_pe=q_pe,
                                  eps=self.eps, kv_cache=self.cache, slots=slots,
                                  config=_cfg(self.table, "rope", t))
        q_lat = torch.einsum("thd,hdc->thc", q[..., :self.nope], self.w_uk)
        qq = torch.cat([q_lat, q_pe], dim=-1).view(bsz, seqlen, self.heads, self.c + self.rope_dim)
        out, _ = ops.mla_decode(qq.contiguous(), self.cache, self.block_table[:bsz], seqlens, self.softmax_scale,
                                causal=seqlen > 1,
                                config=_cfg(self.table, "decode" if seqlen == 1 else "prefill", t))
        o = torch.einsum("bshc,hdc->bshd", out, self.w_uv)
        return self.wo(o.flatten(2).to(kv_a.dtype))
