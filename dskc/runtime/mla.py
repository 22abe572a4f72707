"""MLA attention on generated kernels: absorbed form over a paged latent cache.

Per step (once, for every layer): `mla_step` gives each new token's rope row and cache slot, the sequence lengths
and mla_decode's split schedule (an MLAStep). The region that owns it (the share_step_state pass: the first MLA
region) computes it; the others reuse it through a StepCache the compiler shares between them
(share_step_state(module)). A decode step replayed from a CUDA graph passes the state in place of start_pos
(dskc.runtime.graphs); a forward with an int start_pos finds it in the cache under (start_pos, bsz, seqlen).
Prologue (one kernel): RMSNorm of the latent kv, RoPE of q_pe and k_pe, write into the paged cache.
Core: `mla_decode` (split-KV flash decoding, causal over the new tokens, so prefill runs through it too).
wkv_b is absorbed ahead of time: its K half folds into the query, its V half into the output.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from dskc import ops
from dskc.logs import warn_once
from dskc.ops.mla import MLAStep
from dskc.runtime.modules import KernelLinear, dot_dtype
from dskc.runtime.table import config as _cfg
from dskc.select.launches import MLA_PAGE
from dskc.templates.triton import mla_decode as _dec

log = logging.getLogger("dskc.runtime")  # where warn_once reports (as before)

PAGE = MLA_PAGE   # the page size selection plans with (a table's decode problem names it)


class StepCache:
    """The latest per-step state of int start positions, shared by the MLA modules of one model."""

    def __init__(self):
        self.key, self.state = None, None

    def get(self, key):
        return self.state if key == self.key else None

    def put(self, key, state: MLAStep) -> MLAStep:
        self.key, self.state = key, state
        return state


def check_positions(positions: torch.Tensor, rope_rows: int, validate=None) -> None:
    """Device positions must index the rope table (one sync; skipped when validate is False or while a CUDA graph
    is being captured)."""
    if ops.mla._should_validate(validate, positions.device) and positions.numel() and bool(
            ((positions < 0) | (positions >= rope_rows)).any()):
        raise ValueError(f"positions outside the rope table's 0..{rope_rows - 1}: {positions.tolist()}")


def share_step_state(module: nn.Module) -> int:
    """Point every KernelMLA of `module` at one StepCache, so the step's state is computed once (by the region
    that owns it, see the share_step_state pass) and reused by the others. Returns how many modules share it."""
    mlas = [m for m in module.modules() if isinstance(m, KernelMLA)]
    cache = StepCache()
    for m in mlas:
        m.steps = cache
    return len(mlas)


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
        self.kernels = bool(node.attr("absorb"))         # fuse_mla_absorb: W_UK / W_UV as mla_absorb kernels
        self.absorb_quant = self.kernels and bool(node.attr("absorb_quant"))
        w_uk = wkv_b[:, :self.nope].to(self.kdtype)
        # the query kernel multiplies W_UK^T [512, nope] per head (weights as the left operand)
        self.register_buffer("w_uk", (w_uk.transpose(1, 2) if self.kernels else w_uk).contiguous(), persistent=False)
        self.register_buffer("w_uv", wkv_b[:, self.nope:].to(self.kdtype).contiguous(), persistent=False)
        self.register_buffer("kv_norm_weight", src.kv_norm.weight.detach().to(self.kdtype), persistent=False)
        pages = -(-max_seq // self.page)
        self.register_buffer("cache", torch.zeros(max_batch * pages, self.page, 1, self.c + self.rope_dim,
                                                  dtype=self.kdtype, device=wkv_b.device), persistent=False)
        self.register_buffer("block_table", torch.arange(max_batch * pages, dtype=torch.int32,
                                                         device=wkv_b.device).view(max_batch, pages),
                             persistent=False)
        self.owns_step = node.attr("step_state", "owner") == "owner"
        self.steps = StepCache()     # replaced by one shared between the model's MLA modules (share_step_state)

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

    def _split(self, slot: str, t: int, batch: int, rows: int) -> bool:
        """Whether this step's schedule splits (with a combine): the plan's decision, else mla_decode's rule."""
        if self.table is not None:
            return bool(self.table.problem(slot, t)["split"])
        sms = torch.cuda.get_device_properties(self.cache.device).multi_processor_count \
            if self.cache.device.type == "cuda" else 132
        return _dec.split_pays(batch, rows, self.block_table.shape[1] * self.page, sms)

    def step_state(self, start_pos, bsz: int, seqlen: int, validate=None) -> MLAStep:
        """The per-step state of bsz sequences x seqlen new tokens at `start_pos` (an int, rope rows relative to it,
        as Transformer.forward slices the rope table; or int32 [bsz] device positions, rows of the whole table):
        one mla_step launch with this region's "step" / "prefill_step" config."""
        t = bsz * seqlen
        slot = "decode" if seqlen == 1 else "prefill"
        step_slot = "step" if seqlen == 1 else "prefill_step"
        if not self.owns_step and self.table is not None:
            warn_once(log, f"step-{self.node.name}", f"dskc: {self.node.name} computes its own MLA step state (the "
                      "region owning it is not on kernels): one mla_step launch per layer")
        table = self.table if self.owns_step else None
        device = isinstance(start_pos, torch.Tensor)
        return ops.mla_step(self.block_table, self.page, bsz, seqlen, seqlen * self.heads,
                            starts=start_pos if device else None, start=0 if device else int(start_pos),
                            rope_base=0 if device else int(start_pos),
                            split=self._split(slot, t, bsz, seqlen * self.heads),
                            decode_config=_cfg(self.table, slot, t), config=_cfg(table, step_slot, t),
                            validate=validate)

    def _state(self, start_pos, bsz: int, seqlen: int, rope_rows: int) -> MLAStep:
        if isinstance(start_pos, MLAStep):
            if (start_pos.batch, start_pos.s_q) != (bsz, seqlen):
                raise ValueError(f"{self.node.name}: the step state is for {start_pos.batch} x {start_pos.s_q} "
                                 f"tokens, the input has {bsz} x {seqlen}")
            return start_pos
        if isinstance(start_pos, torch.Tensor):
            # one decode token per sequence at device positions (dskc.runtime.graphs): no host value is read, so
            # the step can be captured in a CUDA graph; `rope` is then the whole table, indexed by position
            if seqlen != 1 or start_pos.dtype != torch.int32 or tuple(start_pos.shape) != (bsz,):
                raise ValueError(f"{self.node.name}: device positions need one token per sequence and int32 "
                                 f"[{bsz}] positions, got seqlen {seqlen}, {start_pos.dtype} {tuple(start_pos.shape)}")
            check_positions(start_pos, rope_rows)
            return self.step_state(start_pos, bsz, seqlen)
        key = (int(start_pos), bsz, seqlen)
        if self.owns_step:       # the first MLA region of the forward: computes the step's state for all
            return self.steps.put(key, self.step_state(int(start_pos), bsz, seqlen))
        shared = self.steps.get(key)
        return shared if shared is not None else self.step_state(int(start_pos), bsz, seqlen)

    def forward(self, x: torch.Tensor, start_pos, rope: torch.Tensor, mask=None) -> torch.Tensor:
        first, wkv_a = self.input_projections()
        return self.attend_projected(first(x), wkv_a(x), start_pos, rope)

    def attend_projected(self, qa: torch.Tensor, kv_a: torch.Tensor, start_pos, rope: torch.Tensor):
        """The attention after its input projections, for a caller that computed them itself (dskc.runtime.block
        runs both as one GEMM): qa = wq_a(x) (or wq(x)) [bsz, seqlen, N], kv_a = wkv_a(x) [bsz, seqlen, 576], in x's
        dtype; last dims may be strided views. start_pos: an int, int32 [bsz] device positions or the step's
        MLAStep (see the module docstring). Returns wo's output [bsz, seqlen, dim] in that dtype."""
        if kv_a.dim() != 3 or qa.shape[:2] != kv_a.shape[:2] or kv_a.shape[-1] != self.c + self.rope_dim:
            raise ValueError(f"{self.node.name}: attend_projected takes qa [bsz, seqlen, N] and kv_a [bsz, seqlen, "
                             f"{self.c + self.rope_dim}], got {tuple(qa.shape)} and {tuple(kv_a.shape)}")
        bsz, seqlen, _ = kv_a.shape
        t = bsz * seqlen
        st = self._state(start_pos, bsz, seqlen, rope.shape[0])
        q = self._query(qa).view(t, self.heads, self.nope + self.rope_dim)
        if self.kernels:
            qq = ops.mla_absorb_q(q, self.w_uk, rope, st.rope_rows, self.kdtype, config=_cfg(self.table, "absorb_q", t))
            q_pe = None
        else:
            q = q.to(self.kdtype)
            q_pe = q[..., self.nope:]
        ops.rope_norm_cache_write(kv_a.reshape(t, self.c + self.rope_dim), self.kv_norm_weight, rope, st.rope_rows,
                                  q_pe=q_pe, eps=self.eps, kv_cache=self.cache, slots=st.slots,
                                  config=_cfg(self.table, "rope", t), validate=False)
        if not self.kernels:
            qq = torch.cat([torch.einsum("thd,hdc->thc", q[..., :self.nope], self.w_uk), q_pe], dim=-1)
        out, _ = ops.mla_decode(qq.view(bsz, seqlen, self.heads, self.c + self.rope_dim), self.cache,
                                self.block_table[:bsz], st.seqlens, self.softmax_scale, causal=seqlen > 1,
                                metadata=st.metadata, config=_cfg(self.table, "decode" if seqlen == 1 else "prefill", t),
                                validate=False)
        return self._output(out.view(t, self.heads, self.c), kv_a.dtype).view(bsz, seqlen, -1)

    def _output(self, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """wo(out @ W_UV^T) [T, dim] in `dtype`: W_UV and wo's 1x128 quantisation in one kernel (an FP8 wo's GEMM
        then reads the quantised rows), or out @ W_UV^T for a 16-bit wo (or a wo swapped for another module after
        compile, e.g. a hook reading the attention's output: it gets the 16-bit rows)."""
        t = out.shape[0]
        if self.absorb_quant and isinstance(self.wo, KernelLinear):
            q8, s8 = ops.mla_absorb_o(out, self.w_uv, dtype, True, config=_cfg(self.table, "absorb_o", t))
            return ops.fp8_gemm(q8, s8, self.wo.weight, self.wo.scale, out_dtype=self.wo.out_dtype or dtype,
                                config=_cfg(self.wo.table, "gemm", t))
        if self.kernels:
            return self.wo(ops.mla_absorb_o(out, self.w_uv, dtype, False, config=_cfg(self.table, "absorb_o", t)))
        return self.wo(torch.einsum("thc,hdc->thd", out, self.w_uv).flatten(1).to(dtype))
