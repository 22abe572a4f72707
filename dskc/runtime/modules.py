"""Kernel-backed replacements for the regions the lowering found. Each takes the eager module it replaces and
its IR node, prepares weights once (stacked, absorbed, quantised), and runs forward through dskc.ops kernels.

On a GPU the kernels run natively; on a CPU through Triton's interpreter. The interpreter's tl.dot is wrong on
bfloat16 operands (triton-lang/triton#11584), so under it bf16 operands of dot kernels run as fp16 (logged once).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from dskc import knobs, ops
from dskc.runtime.table import config as _cfg

log = logging.getLogger("dskc.runtime")
_WARNED: set = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg)


def dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that dot-kernel operands of `dtype` run in on this runtime (the rule selection plans with:
    dskc.select.launches.dot_dtype)."""
    if dtype == torch.bfloat16 and knobs.get().triton_interpret:
        warn_once("bf16-interp", "dskc: Triton's interpreter multiplies bf16 dot operands wrongly; running them as "
                  "fp16 on the CPU (GPU runs keep bf16)")
        return torch.float16
    return dtype


def _dense(m) -> torch.Tensor:
    return m.dense_weight() if hasattr(m, "dense_weight") else m.weight


class KernelLinear(nn.Module):
    """y = x W^T through `fp8_gemm_1d2d` (x quantised per token per 128 by `act_quant`) or `bf16_gemm`.

    cutlass: a successful CUTLASS build (dskc.templates.cutlass.build) of sm90_fp8_gemm_1d2d / sm90_bf16_gemm that
    replaces the Triton GEMM (selection picks one only on a measured win, and never for the CPU runtime); it is
    launched through dskc.runtime.cutlass on CUDA tensors (CPU inputs raise ValueError there).
    table: the region's ConfigTable (slots "quant", "gemm"); None: the ops choose.
    """

    def __init__(self, src: nn.Module, node, quantize: bool = False, cutlass=None, table=None):
        super().__init__()
        self.node, self.out_dtype, self.table = node, getattr(src, "compute_dtype", None), table
        w, scale = src.weight, getattr(src, "scale", None)
        if quantize and scale is None:
            from dskc.model import quantize_weight
            w, scale = quantize_weight(w.float())
        self.fp8 = scale is not None
        self.register_buffer("weight", w.detach() if self.fp8 else w.detach().to(dot_dtype(w.dtype)).contiguous(),
                             persistent=False)
        self.register_buffer("scale", None if scale is None else scale.detach().float().contiguous(), persistent=False)
        self.cutlass = None
        if cutlass is not None:
            from dskc.runtime import cutlass as cutlass_rt
            want = "sm90_fp8_gemm_1d2d" if self.fp8 else "sm90_bf16_gemm"
            if getattr(cutlass, "name", None) != want:
                raise ValueError(f"{node.name}: a {'FP8' if self.fp8 else 'bf16'} linear needs a {want} build, "
                                 f"got {getattr(cutlass, 'name', cutlass)!r}")
            if not self.fp8 and self.weight.dtype != torch.bfloat16:
                raise ValueError(f"{node.name}: CUTLASS {want} needs bf16 weights, got {self.weight.dtype}")
            self.cutlass = cutlass_rt.load(cutlass)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, out_dtype = x.shape, self.out_dtype or x.dtype
        x2 = x.reshape(-1, shape[-1])
        t = x2.shape[0]
        if self.cutlass is not None:
            y = self._cutlass(x2).to(out_dtype)
        elif self.fp8:
            q, s = ops.act_quant(x2.contiguous(), config=_cfg(self.table, "quant", t))
            y = ops.fp8_gemm(q, s, self.weight, self.scale, out_dtype=out_dtype, config=_cfg(self.table, "gemm", t))
        else:
            y = ops.bf16_gemm(x2.to(self.weight.dtype).contiguous(), self.weight,
                              config=_cfg(self.table, "gemm", t)).to(out_dtype)
        return y.view(*shape[:-1], y.shape[-1])


    def _cutlass(self, x2: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            q, s = ops.act_quant(x2.contiguous(), config=_cfg(self.table, "quant", x2.shape[0]))
            return self.cutlass(q, s, self.weight, self.scale)
        return self.cutlass(x2.to(torch.bfloat16).contiguous(), self.weight)


class KernelMLP(nn.Module):
    """w2(silu(w1 x) * w3 x): one GEMM over the stacked [w1; w3], SwiGLU (+ FP8 quant) epilogue, then w2."""

    def __init__(self, src: nn.Module, node, table=None):
        super().__init__()
        self.node, self.table = node, table
        self.inter = src.w1.weight.shape[0]
        self.fp8 = getattr(src.w1, "scale", None) is not None
        if self.fp8 and self.inter % 128:
            raise ValueError(f"{node.name}: FP8 MLP width {self.inter} is not a multiple of 128")
        part = (lambda slot: None) if table is None else (lambda slot: table.view({"gemm": slot}))
        self.up = KernelLinear(src.w1, node, table=part("up"))
        self.up.weight = torch.cat([self.up.weight, KernelLinear(src.w3, node).weight]).contiguous()
        if self.fp8:
            self.up.scale = torch.cat([src.w1.scale, src.w3.scale]).float().contiguous()
        self.down = KernelLinear(src.w2, node, table=part("down"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.fp8:
            x2 = x.reshape(-1, shape[-1]).contiguous()
            q, s = ops.act_quant(x2, config=_cfg(self.table, "quant", x2.shape[0]))
            return self.from_quantized(q, s, x.dtype).view(shape)
        h = self.up(x.reshape(-1, shape[-1]))
        return self.down(F.silu(h[:, :self.inter]) * h[:, self.inter:]).view(shape)

    def from_quantized(self, q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The FP8 MLP from its input already quantised 1x128 (q [M, dim] e4m3, s [M, dim/128] fp32), e.g. by a
        fused norm (dskc.runtime.block): [w1|w3] GEMM, SwiGLU + quant, w2 GEMM -> [M, dim] of out_dtype."""
        if not self.fp8:
            raise ValueError(f"{self.node.name}: from_quantized needs an FP8 MLP")
        t, tab = q.shape[0], self.table
        h = ops.fp8_gemm(q, s, self.up.weight, self.up.scale, out_dtype=self.up.out_dtype or out_dtype,
                         config=_cfg(tab, "up", t))
        q2, s2 = ops.silu_mul_act_quant(h, config=_cfg(tab, "act", t))
        return ops.fp8_gemm(q2, s2, self.down.weight, self.down.scale, out_dtype=out_dtype,
                            config=_cfg(tab, "down", t))


class KernelMoE(nn.Module):
    """The MoE block as `dskc.ops.fused_moe`: routing, permutation, grouped GEMMs with SwiGLU and routed-weight
    epilogues, combine, shared experts. Expert weights are stacked once here."""

    def __init__(self, src: nn.Module, node, table=None):
        super().__init__()
        self.node, g, self.table = node, src.gate, table
        experts = list(src.experts)
        if any(e is None for e in experts):
            raise ValueError(f"{node.name}: dskc.compile needs all routed experts on this rank (world size 1)")
        self.fp8 = getattr(experts[0].w1, "scale", None) is not None
        wd = (lambda t: t) if self.fp8 else (lambda t: t.to(dot_dtype(t.dtype)))
        self.register_buffer("w13", wd(torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in experts])),
                             persistent=False)
        self.register_buffer("w2", wd(torch.stack([e.w2.weight for e in experts])), persistent=False)
        if self.fp8:
            self.register_buffer("w13_scale", torch.stack([torch.cat([e.w1.scale, e.w3.scale]) for e in experts]),
                                 persistent=False)
            self.register_buffer("w2_scale", torch.stack([e.w2.scale for e in experts]), persistent=False)
        else:
            self.w13_scale = self.w2_scale = None
        self.register_buffer("gate_weight", g.weight.detach().float(), persistent=False)
        self.gate_bias = None if g.bias is None else g.bias.detach().float()
        self.route = dict(top_k=g.topk, n_groups=g.n_groups, n_limited_groups=g.topk_groups,
                          score_func=g.score_func, route_scale=float(g.route_scale))
        self.shared = None
        if src.shared_experts is not None:
            se = src.shared_experts
            self.shared = {k: wd(getattr(se, k).weight) for k in ("w1", "w2", "w3")}
            if self.fp8:
                self.shared.update({f"{k}_scale": getattr(se, k).scale.float() for k in ("w1", "w2", "w3")})
        self.dim = src.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.dim)
        xk = x2 if self.fp8 else x2.to(self.w13.dtype)
        y = ops.fused_moe(xk.contiguous(), self.gate_weight, self.gate_bias, self.w13, self.w13_scale, self.w2,
                          self.w2_scale, shared=self.shared, config=self._configs(x2.shape[0]), **self.route)
        return y.to(x.dtype).view(shape)

    def _configs(self, t: int) -> dict | None:
        """fused_moe's config for t tokens from the region's table: the layout and every stem's config."""
        if self.table is None:
            return None
        slots = ("route", "permute", "gemm1", "gemm2") + (("shared_gemm1", "shared_gemm2") if self.shared else ())
        return {"layout": self.table.problem("gemm1", t)["layout"],
                **{slot: self.table.config(slot, t) for slot in slots}}
