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
from dskc.logs import warn_once
from dskc.runtime.table import config as _cfg
from dskc.runtime.weights import Dense, MLPWeights, MoEWeights
from dskc.select.launches import shared_as_experts

log = logging.getLogger("dskc.runtime")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that dot-kernel operands of `dtype` run in on this runtime (the rule selection plans with:
    dskc.select.launches.dot_dtype)."""
    if dtype == torch.bfloat16 and knobs.get().triton_interpret:
        warn_once(log, "bf16-interp", "dskc: Triton's interpreter multiplies bf16 dot operands wrongly; running them as "
                  "fp16 on the CPU (GPU runs keep bf16)")
        return torch.float16
    return dtype


def _dense(m) -> torch.Tensor:
    return m.dense_weight() if hasattr(m, "dense_weight") else m.weight


class KernelLinear(nn.Module):
    """y = x W^T through `fp8_gemm_1d2d` (x quantised per token per 128 by `act_quant`) or `bf16_gemm`.

    src: the linear module (or a dskc.runtime.weights.Dense): its `weight`, `scale` (FP8 block scales, or None) and
    `compute_dtype` (the output dtype; default: x's).
    cutlass: a successful CUTLASS build (dskc.templates.cutlass.build) of sm90_fp8_gemm_1d2d / sm90_bf16_gemm that
    replaces the Triton GEMM (selection picks one only on a measured win, and never for the CPU runtime); it is
    launched through dskc.runtime.cutlass on CUDA tensors (CPU inputs raise ValueError there).
    table: the region's ConfigTable (slots "quant" / "norm", "gemm"); None: the ops choose.
    norm: the RMSNorm the linear applies to its input first (fuse_head_norm: the model's final norm, whose module
    then passes its input through: dskc.runtime.modules.FusedNorm); node attr logits="fp32": the GEMM writes fp32.
    """

    def __init__(self, src, node, quantize: bool = False, cutlass=None, table=None, norm=None):
        super().__init__()
        self.node, self.out_dtype, self.table = node, getattr(src, "compute_dtype", None), table
        if node.attr("logits") == "fp32":
            self.out_dtype = torch.float32
        self.norm = None
        if node.attr("norm") is not None:
            if norm is None:
                raise ValueError(f"{node.name}: its RMSNorm {node.attr('norm')} was fused into it but not given")
            if cutlass is not None:
                raise ValueError(f"{node.name}: a CUTLASS GEMM does not take its fused RMSNorm's output yet")
            self.norm, self.norm_source = (norm.weight.detach(), float(norm.eps)), node.attr("norm")
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
        if self.norm is not None:
            y = self._normed(x2, out_dtype, t)
        elif self.cutlass is not None:
            y = self._cutlass(x2).to(out_dtype)
        elif self.fp8:
            # after MLA's absorb_o (prologue mla_absorb_o) the plan has no quant kernel: KernelMLA hands the GEMM
            # quantised rows; called on its own (e.g. on another module's output), act_quant picks its config
            quant = None if self.node.attr("prologue") == "mla_absorb_o" else _cfg(self.table, "quant", t)
            q, s = ops.act_quant(x2.contiguous(), config=quant)
            y = ops.fp8_gemm(q, s, self.weight, self.scale, out_dtype=out_dtype, config=_cfg(self.table, "gemm", t))
        else:
            y = ops.bf16_gemm(x2.to(self.weight.dtype).contiguous(), self.weight,
                              config=_cfg(self.table, "gemm", t)).to(out_dtype)
        return y.view(*shape[:-1], y.shape[-1])

    def _normed(self, x2: torch.Tensor, out_dtype: torch.dtype, t: int) -> torch.Tensor:
        """The GEMM of RMSNorm(x2): the norm kernel writes what the GEMM reads (the 1x128 quantisation for FP8,
        else the normed rows in the weight's dtype)."""
        w, eps = self.norm
        if self.fp8:
            q, s = ops.rmsnorm_act_quant(x2, w.to(x2.dtype), eps, config=_cfg(self.table, "quant", t))
            return ops.fp8_gemm(q, s, self.weight, self.scale, out_dtype=out_dtype, config=_cfg(self.table, "gemm", t))
        y = ops.rmsnorm(x2, w.to(x2.dtype), eps, out_dtype=self.weight.dtype, config=_cfg(self.table, "norm", t))
        return ops.bf16_gemm(y, self.weight, config=_cfg(self.table, "gemm", t),
                             out_dtype=torch.float32 if out_dtype == torch.float32 else None).to(out_dtype)

    def _cutlass(self, x2: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            q, s = ops.act_quant(x2.contiguous(), config=_cfg(self.table, "quant", x2.shape[0]))
            return self.cutlass(q, s, self.weight, self.scale)
        return self.cutlass(x2.to(torch.bfloat16).contiguous(), self.weight)


class FusedNorm(nn.Module):
    """An RMSNorm whose consumer applies it (fuse_head_norm): keeps its weight for the record, passes x through."""

    def __init__(self, src: nn.Module, into: str):
        super().__init__()
        self.weight, self.eps, self.fused_into = src.weight, src.eps, into

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fuse_norms(module: nn.Module) -> int:
    """Replace each RMSNorm a KernelLinear of `module` took over (its `norm_source`) by a FusedNorm; returns how
    many. Done after all regions are built, so a consumer that stayed eager keeps its norm."""
    done = 0
    for lin in [m for m in module.modules() if isinstance(m, KernelLinear) and m.norm is not None]:
        parent, _, leaf = lin.norm_source.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        if not isinstance(getattr(owner, leaf), FusedNorm):
            setattr(owner, leaf, FusedNorm(getattr(owner, leaf), lin.node.name))
            done += 1
    return done


def mlp_forward(x2: torch.Tensor, w: MLPWeights, out_dtype: torch.dtype, table=None) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) on x2 [M, dim]: one GEMM over the stacked [w1; w3], then w2 (FP8: x quantised 1x128,
    the [w1; w3] GEMM with the SwiGLU + quant epilogue: mlp_from_quantized). `table`: the config table seen with
    slots "quant", "up", "down" (None: the ops choose). Returns [M, dim] in out_dtype."""
    t = x2.shape[0]
    if w.fp8:
        q, s = ops.act_quant(x2.contiguous(), config=_cfg(table, "quant", t))
        return mlp_from_quantized(q, s, w, out_dtype, table)
    kd, i = w.up.weight.dtype, w.inter
    h = ops.bf16_gemm(x2.to(kd).contiguous(), w.up.weight, config=_cfg(table, "up", t)).to(out_dtype)
    a = (F.silu(h[:, :i]) * h[:, i:]).to(kd).contiguous()
    return ops.bf16_gemm(a, w.down.weight, config=_cfg(table, "down", t)).to(out_dtype)


def mlp_from_quantized(q, s, w: MLPWeights, out_dtype: torch.dtype, table=None,
                       residual: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 MLP from its input already quantised 1x128 (q [M, dim] e4m3, s [M, dim/128] fp32): the [w1; w3] GEMM
    as the grouped GEMM's dense mode (one expert) with its SwiGLU + 1x128 quantisation epilogue (the hidden layer
    never leaves the GEMM in 16 bits), then w2's GEMM (+ residual [M, dim] in its epilogue) -> [M, dim] of
    out_dtype."""
    t = q.shape[0]
    h = torch.empty(t, w.inter, dtype=torch.float8_e4m3fn, device=q.device)
    sh = torch.empty(t, w.inter // 128, dtype=torch.float32, device=q.device)
    ops.grouped_gemm(q, s, w.up.weight[None], w.up.scale[None], h, dense=True, epilogue="swiglu_quant",
                     out_scale=sh, config=_cfg(table, "up", t))
    return ops.fp8_gemm(h, sh, w.down.weight, w.down.scale, out_dtype=out_dtype, residual=residual,
                        config=_cfg(table, "down", t))


def _register(module: nn.Module, prefix: str, d: Dense) -> None:
    module.register_buffer(f"{prefix}_weight", d.weight, persistent=False)
    module.register_buffer(f"{prefix}_scale", d.scale, persistent=False)


class KernelMLP(nn.Module):
    """w2(silu(w1 x) * w3 x) on a neutral weight bundle (dskc.runtime.weights.MLPWeights, laid out by the region's
    family): one GEMM over the stacked [w1; w3] with the SwiGLU (+ FP8 quant) epilogue, then w2 (FP8: see
    mlp_from_quantized; w2's GEMM can add a block's residual stream in its epilogue: from_quantized(residual=...))."""

    def __init__(self, weights: MLPWeights, node, table=None):
        super().__init__()
        self.node, self.table, self.inter, self.fp8 = node, table, weights.inter, weights.fp8
        _register(self, "up", weights.up)
        _register(self, "down", weights.down)

    def weights(self) -> MLPWeights:
        return MLPWeights(Dense(self.up_weight, self.up_scale), Dense(self.down_weight, self.down_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return mlp_forward(x.reshape(-1, shape[-1]), self.weights(), x.dtype, self.table).view(shape)

    def from_quantized(self, q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype,
                       residual: torch.Tensor | None = None) -> torch.Tensor:
        """The FP8 MLP from its input already quantised 1x128, e.g. by a fused norm (dskc.runtime.block), + the
        block's residual stream in w2's epilogue when given."""
        if not self.fp8:
            raise ValueError(f"{self.node.name}: from_quantized needs an FP8 MLP")
        return mlp_from_quantized(q, s, self.weights(), out_dtype, self.table, residual)


def route_of(node) -> dict:
    """fused_moe's routing keywords from a MoE node's attributes."""
    return dict(top_k=node.attr("top_k"), n_groups=node.attr("n_groups"), n_limited_groups=node.attr("topk_groups"),
                score_func=node.attr("score_func"), route_scale=float(node.attr("route_scale")),
                renorm=node.attr("renorm"))


def _shared_dict(w: MLPWeights) -> dict:
    """fused_moe's `shared` from the stacked bundle (views: w1 / w3 are the halves of [w1; w3])."""
    i = w.inter
    out = {"w1": w.up.weight[:i], "w3": w.up.weight[i:], "w2": w.down.weight}
    if w.fp8:
        out.update(w1_scale=w.up.scale[:i // 128], w3_scale=w.up.scale[i // 128:], w2_scale=w.down.scale)
    return out


SHARED_SLOTS = {"quant": "shared_quant", "up": "shared_up", "down": "shared_down"}


def moe_forward(x2: torch.Tensor, w: MoEWeights, route: dict, config: dict | None = None, shared_table=None,
                n_shared: int = 0) -> torch.Tensor:
    """The MoE block on x2 [T, dim] through `dskc.ops.fused_moe` (gate, routing and layout, grouped GEMMs reading
    the tokens through the layout with SwiGLU and routed-weight epilogues, combine; shared experts as the last
    n_shared experts of w13 / w2, or as a dense MLP added in the combine). A gated shared expert (Qwen2-MoE:
    sigmoid(x g^T) * shared(x)) runs as an MLP beside it. Returns [T, dim] in x2's dtype."""
    xk = x2 if w.fp8 else x2.to(w.w13.dtype)
    inline = w.shared is not None and w.shared_gate is None
    y = ops.fused_moe(xk.contiguous(), w.gate, w.gate_bias, w.w13, w.w13_scale, w.w2, w.w2_scale,
                      shared=_shared_dict(w.shared) if inline else None, n_shared=n_shared, config=config, **route)
    if w.shared_gate is not None:
        g = torch.sigmoid(x2.float() @ w.shared_gate.float().t())
        y = y.float() + g * mlp_forward(x2, w.shared, torch.float32, shared_table)
    return y.to(x2.dtype)


def _shared_experts(w: MoEWeights, n: int) -> tuple:
    """(w13, w13_scale, w2, w2_scale) with the shared MLP of width n * I appended as n experts of the routed width I
    (an MLP's hidden units are independent, so the sum of the parts' outputs is the MLP's; with FP8 the parts end on
    whole 128 blocks of the 128x128 scales)."""
    sh, inter = w.shared, w.w2.shape[2]
    width, blk = sh.inter, inter // 128
    up, down = sh.up, sh.down

    def rows(t, j, per, total):      # [w1 part j; w3 part j] of a stacked [w1; w3] tensor
        return torch.cat([t[j * per:(j + 1) * per], t[total + j * per:total + (j + 1) * per]])

    w13 = torch.cat([w.w13, torch.stack([rows(up.weight, j, inter, width) for j in range(n)])]).contiguous()
    w2 = torch.cat([w.w2, torch.stack([down.weight[:, j * inter:(j + 1) * inter] for j in range(n)])]).contiguous()
    if not w.fp8:
        return w13, None, w2, None
    s13 = torch.stack([rows(up.scale, j, blk, width // 128) for j in range(n)])
    s2 = torch.stack([down.scale[:, j * blk:(j + 1) * blk] for j in range(n)])
    return (w13, torch.cat([w.w13_scale, s13]).contiguous(), w2, torch.cat([w.w2_scale, s2]).contiguous())


class KernelMoE(nn.Module):
    """The MoE block as `dskc.ops.fused_moe` on a neutral weight bundle (dskc.runtime.weights.MoEWeights: experts
    stacked once by the region's family layout); routing from the node (top_k, groups, score function, scale,
    renormalisation). The router runs as moe_gate in the dtype the plan gives it (dskc.select.launches.gate_dtype).
    Ungated shared experts join the routed ones as always-selected experts when their width is a whole number of
    routed experts' (dskc.select.launches.shared_as_experts), else run as a dense MLP added in the combine; a
    gated one (Qwen2-MoE) runs as an MLP beside the block.

    forward(x) takes the normed x (the eager block's ffn_norm ran); fused(y, q, s, residual) takes what one fused
    norm kernel gives (dskc.runtime.block): y the normed x for the gate, (q, s) its 1x128 quantisation for the
    experts, and the residual stream, added in the combine."""

    def __init__(self, weights: MoEWeights, node, table=None):
        super().__init__()
        self.node, self.table, self.fp8 = node, table, weights.fp8
        sh, gated = weights.shared, weights.shared_gate is not None
        self.n_shared = 0 if sh is None or gated else shared_as_experts(sh.inter, weights.w2.shape[2])
        experts = _shared_experts(weights, self.n_shared) if self.n_shared else \
            (weights.w13, weights.w13_scale, weights.w2, weights.w2_scale)
        for name, t in zip(("w13", "w13_scale", "w2", "w2_scale"), experts):
            self.register_buffer(name, t, persistent=False)
        for name in ("gate_bias", "shared_gate"):
            self.register_buffer(name, getattr(weights, name), persistent=False)
        gdt = torch.float32 if table is None else _DTYPES[table.problem("gate", 1)["w_dtype"]]
        self.register_buffer("gate_weight", weights.gate.to(gdt).contiguous(), persistent=False)
        self.route = route_of(node)
        self.shared_mlp = None if sh is None or self.n_shared else KernelMLP(
            sh, node, None if table is None else table.view(SHARED_SLOTS))
        self.dim = weights.w13.shape[2]

    def weights(self) -> MoEWeights:
        """The bundle fused_moe runs (with n_shared: the shared experts are the last n_shared of w13 / w2)."""
        return MoEWeights(self.gate_weight, self.gate_bias, self.w13, self.w13_scale, self.w2, self.w2_scale,
                          None if self.shared_mlp is None else self.shared_mlp.weights(), self.shared_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.dim)
        shared_table = None if self.shared_mlp is None else self.shared_mlp.table
        return moe_forward(x2, self.weights(), self.route, self._configs(x2.shape[0], quant=self.fp8), shared_table,
                           self.n_shared).view(shape)

    def fused(self, y: torch.Tensor, q: torch.Tensor, s: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + MoE(y) [T, dim] in residual's dtype, from one fused norm's outputs (see the class doc)."""
        if not self.fp8 or self.shared_gate is not None:
            raise ValueError(f"{self.node.name}: the fused MoE path needs FP8 experts and no gated shared expert")
        shared = None if self.shared_mlp is None else _shared_dict(self.shared_mlp.weights())
        return ops.fused_moe(y, self.gate_weight, self.gate_bias, self.w13, self.w13_scale, self.w2, self.w2_scale,
                             shared=shared, n_shared=self.n_shared, x_quant=(q, s), residual=residual,
                             config=self._configs(y.shape[0], quant=False), **self.route)

    def _configs(self, t: int, quant: bool) -> dict | None:
        """fused_moe's config for t tokens from the region's table: the layout and every stem's config (the gated
        shared expert's MLP reads its own slots through shared_mlp's table)."""
        if self.table is None:
            return None
        kind = self.table.problem("gemm1", t)["layout"]
        inline = self.shared_mlp is not None and self.shared_gate is None
        slots = ["gate", "route", "gemm1", "gemm2", "combine"] + (["permute"] if kind == "contiguous" else [])
        slots += ["quant"] if quant else []
        slots += ["shared_gemm1", "shared_gemm2"] if inline else []
        return {"layout": kind, **{slot: self.table.config(slot, t) for slot in slots}}
