"""A transformer block with its pre-norms fused into the FP8 activation quantisation (the fuse_block_norms pass).

The eager block is x = x + attn(attn_norm(x)); return x + ffn(ffn_norm(x)). Here, once its parts are on kernels:
- attn_norm: one `rmsnorm_act_quant(x)` gives the 1x128 e4m3 (q, s) of the normed x (never materialised in bf16),
  and one FP8 GEMM over the stacked [wq_a; wkv_a] (or [wq; wkv_a]) weights gives both projections (two GEMMs on the
  same (q, s) when the block scales do not stack); KernelMLA.attend_projected does the rest of the attention.
- ffn_norm (FP8 ffn): `rmsnorm_act_quant(attn_out, residual=x)` adds the residual, normalises and quantises in one
  pass, returning the new residual stream h too. A dense MLP (KernelMLP.from_quantized) runs its [w1|w3] GEMM with
  the SwiGLU + quant epilogue and its w2 GEMM, which adds h in its epilogue. A MoE (KernelMoE.fused) also gets the
  normed x from the same pass (for its gate) and adds h in its combine. Either way the ffn returns the block's
  output: no separate add.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dskc import ops
from dskc.runtime.mla import KernelMLA
from dskc.runtime.modules import KernelLinear, KernelMLP, KernelMoE
from dskc.runtime.table import config as _cfg


def _stack_projections(name: str, projs) -> tuple[torch.Tensor, torch.Tensor]:
    """[W_0; W_1; ...] and their stacked 128x128 block scales (every part but the last must end on a whole block).

    Each projection's weight and scale become views into the stacked tensors, so the weights are held once (the
    KernelLinears still run on their own when KernelMLA.forward is called directly)."""
    if any(p.weight.shape[0] % 128 for p in projs[:-1]):
        raise ValueError(f"{name}: cannot stack {[tuple(p.weight.shape) for p in projs]}: an inner part's width "
                         "is not a multiple of 128 (its last scale block would straddle two weights)")
    w = torch.cat([p.weight for p in projs]).contiguous()
    s = torch.cat([p.scale for p in projs]).float().contiguous()
    row = blk = 0
    for p in projs:
        n, nb = p.weight.shape[0], p.scale.shape[0]
        p.weight, p.scale = w[row:row + n], s[blk:blk + nb]
        row, blk = row + n, blk + nb
    return w, s


class KernelBlock(nn.Module):
    """The block `src` (its attn / ffn already kernel modules) with the fusions its IR node carries.

    node attrs (from fuse_block_norms): attn_norm="rmsnorm_act_quant", attn_gemm_n=(N,) (one stacked GEMM) or the
    projections' widths (one GEMM each); ffn_norm="add_rmsnorm_act_quant" when the residual add + ffn_norm fuse.
    Same call signature as the eager block: forward(x [bsz, seqlen, dim], start_pos, rope, mask).
    table: the block's ConfigTable (slots "quant", "gemm0", "gemm1", ...); the fused ffn_norm's kernel is in the
    MLP's table ("quant"). None: the ops choose.
    """

    def __init__(self, src: nn.Module, node, table=None):
        super().__init__()
        self.node, self.table = node, table
        self.attn, self.ffn, self.attn_norm, self.ffn_norm = src.attn, src.ffn, src.attn_norm, src.ffn_norm
        self.fuse_attn = node.attr("attn_norm") == "rmsnorm_act_quant"
        self.fuse_ffn = node.attr("ffn_norm") in ("add_rmsnorm_act_quant", "add_rmsnorm_act_quant_normed")
        if not (self.fuse_attn or self.fuse_ffn):
            raise ValueError(f"{node.name}: the block has no fused norm (run fuse_block_norms first)")
        if self.fuse_attn:
            self._init_attn(node)
        if self.fuse_ffn and not (isinstance(self.ffn, (KernelMLP, KernelMoE)) and self.ffn.fp8):
            raise ValueError(f"{node.name}: ffn_norm is fused but the ffn is {type(self.ffn).__name__}, not an FP8 "
                             "KernelMLP / KernelMoE (did it stay eager?)")

    def _init_attn(self, node) -> None:
        if not isinstance(self.attn, KernelMLA):
            raise ValueError(f"{node.name}: attn_norm is fused but the attention is {type(self.attn).__name__}, "
                             "not KernelMLA (did it stay eager?)")
        projs = self.attn.input_projections()
        bad = [type(p).__name__ for p in projs if not (isinstance(p, KernelLinear) and p.fp8)]
        if bad:
            raise ValueError(f"{node.name}: attn_norm is fused but MLA's input projections are not all FP8 "
                             f"KernelLinears ({bad})")
        self.widths = [p.weight.shape[0] for p in projs]
        gemm_n = tuple(node.attr("attn_gemm_n"))
        if gemm_n == (sum(self.widths),) and len(projs) > 1:
            w, s = _stack_projections(node.name, projs)
            self.register_buffer("w_in", w, persistent=False)
            self.register_buffer("s_in", s, persistent=False)
        elif gemm_n == tuple(self.widths):
            self.w_in = self.s_in = None
        else:
            raise ValueError(f"{node.name}: attn_gemm_n {gemm_n} does not match the projections' widths "
                             f"{self.widths}")

    def _attn_inputs(self, x2: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """[wq_a(n), wkv_a(n)] (views) of n = attn_norm(x2), through one rmsnorm_act_quant."""
        t = x2.shape[0]
        q, s = ops.rmsnorm_act_quant(x2, self.attn_norm.weight.to(dtype), self.attn_norm.eps,
                                     config=_cfg(self.table, "quant", t))
        if self.w_in is not None:
            y = ops.fp8_gemm(q, s, self.w_in, self.s_in, out_dtype=dtype, config=_cfg(self.table, "gemm0", t))
            return list(y.split(self.widths, dim=-1))
        return [ops.fp8_gemm(q, s, p.weight, p.scale, out_dtype=dtype, config=_cfg(self.table, f"gemm{i}", t))
                for i, p in enumerate(self.attn.input_projections())]

    def forward(self, x: torch.Tensor, start_pos: int, rope: torch.Tensor, mask: torch.Tensor | None):
        bsz, seqlen, dim = x.shape
        x2 = x.reshape(-1, dim)
        if self.fuse_attn:
            qa, kv_a = (t.view(bsz, seqlen, -1) for t in self._attn_inputs(x2, x.dtype))
            a = self.attn.attend_projected(qa, kv_a, start_pos, rope)
        else:
            a = self.attn(self.attn_norm(x), start_pos, rope, mask)
        if not self.fuse_ffn:
            h = x + a
            return h + self.ffn(self.ffn_norm(h))
        moe = isinstance(self.ffn, KernelMoE)
        outs = ops.rmsnorm_act_quant(a.reshape(-1, dim), self.ffn_norm.weight.to(x.dtype), self.ffn_norm.eps,
                                     residual=x2, config=_cfg(self.ffn.table, "quant", x2.shape[0]),
                                     normed=x.dtype if moe else None)
        if moe:                # the gate reads the normed x, the experts its quantisation, the combine adds h
            q, s, h, y = outs
            return self.ffn.fused(y, q, s, h).view(x.shape)
        q, s, h = outs         # the MLP's w2 GEMM adds h
        return self.ffn.from_quantized(q, s, x.dtype, residual=h).view(x.shape)
