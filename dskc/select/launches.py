"""What each lowered region launches at a token count: (slot, stem, Problem) rows, as data, one builder per op.

This is the one place that turns an IR node and a token count into the problems its kernel module will pose: the
plan's per-bucket config tables, `dskc compile --out`'s shipped kernels, the tuner's model problems
(autotune/problems.py) and `dskc explain` all read it, and the runtime modules (dskc.runtime) launch exactly
these slots. A new kernel or fused stem joins by adding its slots here and reading them in its runtime module.

Context: the activation dtype of the model, where the kernels run ("gpu", or "cpu" = Triton's interpreter, whose
tl.dot is wrong on bf16 operands so the runtime feeds dot kernels fp16 there: `dot_dtype`), the KV-cache capacity
and page size of the MLA modules, and the shared experts' widths.
"""
from __future__ import annotations

import dataclasses

from dskc.ir.graph import Node, Op
from dskc.templates.triton import (act_quant, bf16_gemm, fp8_gemm, grouped_gemm, mla_absorb, mla_decode, mla_rope,
                                   mla_step, moe_gate, moe_permute, moe_route)

MLA_PAGE = 64            # page size of the paged latent cache the MLA runtime allocates
MOE_ALIGN = 128          # rows per expert block of the contiguous MoE layout (DeepGEMM's alignment)


@dataclasses.dataclass(frozen=True)
class Context:
    act: str = "bf16"            # activation dtype of the model ("bf16" | "fp16" | "fp32")
    runs_on: str = "gpu"         # "gpu" | "cpu" (the interpreter)
    max_seq: int = 4096          # KV-cache positions per sequence (ModelArgs.max_seq_len)
    shared: tuple = ()           # ((MoE region, shared experts' width), ...)
    sms: int = 132               # SMs of the target's reference part (decides MLA's split-KV schedule)
    model_act: str = ""          # the model's own dtype when it differs from act (a float32 model computed in bf16)

    @property
    def dot(self) -> str:
        """The dtype dot-kernel operands of activation dtype `act` run in here."""
        return dot_dtype(self.act, self.runs_on)


def dot_dtype(act: str, runs_on: str) -> str:
    """bf16 dot operands run as fp16 under the interpreter (triton-lang/triton#11584); everything else as is."""
    return "fp16" if act == "bf16" and runs_on == "cpu" else act


def _linear(n: Node, t: int, ctx: Context) -> list:
    """An FP8 linear: act_quant (or its norm's rmsnorm + quant) and the GEMM; a 16-bit one: the GEMM, after its
    norm (fuse_head_norm) stored in the GEMM's operand dtype. logits="fp32": the GEMM writes fp32."""
    N, K = n.shape
    logits = n.attr("logits") == "fp32"
    if n.op is Op.FP8_LINEAR:
        gemm = [("gemm", fp8_gemm.Problem(t, N, K, "fp32" if logits else ctx.act))]
        if n.attr("prologue") == "mla_absorb_o":        # its input arrives quantised from MLA's absorb_o kernel
            return gemm
        op = "rmsnorm" if n.attr("prologue") == "rmsnorm_act_quant" else "quant"
        return [("quant", act_quant.Problem(t, K, ctx.act, op))] + gemm
    gemm = [("gemm", bf16_gemm.Problem(t, N, K, ctx.dot, "fp32" if logits and ctx.dot != "fp32" else ""))]
    if n.attr("prologue") == "rmsnorm":
        return [("norm", act_quant.Problem(t, K, ctx.act, "norm", 0, "" if ctx.dot == ctx.act else ctx.dot))] + gemm
    return gemm


def _mlp(n: Node, t: int, ctx: Context) -> list:
    inter, dim = n.shape
    if n.dtype != "fp8":
        return [("up", bf16_gemm.Problem(t, 2 * inter, dim, ctx.dot)), ("down", bf16_gemm.Problem(t, dim, inter, ctx.dot))]
    op = "add_rmsnorm" if n.attr("prologue") == "add_rmsnorm_act_quant" else "quant"
    return [("quant", act_quant.Problem(t, dim, ctx.act, op)),
            ("up", grouped_gemm.Problem(1, t, inter, dim, "fp8", "contiguous", "swiglu_quant", 0, "fp8",
                                        stacked_up=1)),
            ("down", fp8_gemm.Problem(t, dim, inter, ctx.act, int(n.attr("residual") == "down")))]


def moe_layout(t: int, e: int, top_k: int) -> str:
    """fused_moe's "auto" rule: the masked layout while E * T rows fit in the contiguous layout's row space."""
    return "masked" if e * t <= moe_permute.row_space(t * top_k, e, MOE_ALIGN) else "contiguous"


def gate_dtype(ctx: Context) -> str:
    """The dtype moe_gate reads the router's weights in: the activation dtype on a GPU (a 16-bit model's router as
    stored: exact products, tensor cores, fp32 accumulation), fp32 under the interpreter and for a float32 model
    computed in 16 bits (its router is never rounded). KernelMoE lays the router out as the plan says."""
    return "fp32" if ctx.runs_on == "cpu" or "fp32" in (ctx.act, ctx.model_act) else ctx.act


def shared_as_experts(width: int, inter: int) -> int:
    """How many routed-width experts the shared experts' MLP of `width` splits into (0: it does not split evenly;
    it then runs as its own dense MLP). The runtime (KernelMoE) stacks them after the routed experts."""
    return width // inter if width % inter == 0 else 0


def _moe(n: Node, t: int, ctx: Context) -> list:
    """The MoE block (dskc.ops.fused_moe): gate, routing (+ the masked layout in the same program at decode sizes,
    else moe_permute's align kernels), the experts' GEMMs reading the tokens through the layout, the combine (+ the
    block's residual when fuse_block_norms fused ffn_norm: then the norm kernel is listed here and the experts take
    its quantised x)."""
    _, dim, inter = n.shape
    e, k = n.attr("n_experts"), n.attr("top_k")
    fp8 = n.dtype == "fp8"
    kd = ctx.act if fp8 else ctx.dot                 # the dtype of x as the MoE kernels see it
    wd = "fp8" if fp8 else kd
    width = n.attr("shared_inter") or dict(ctx.shared).get(n.name)
    gated = bool(width and n.attr("shared_gate"))
    n_shared = shared_as_experts(width, inter) if width and not gated else 0
    dense_shared = width if width and not gated and not n_shared else 0
    e_all, k_all = e + n_shared, k + n_shared
    layout = moe_layout(t, e_all, k_all)
    masked = layout == "masked"
    rows = e_all * t if masked else moe_permute.row_space(t * k_all, e_all, MOE_ALIGN)
    per_id = 1 if masked else MOE_ALIGN
    up_epi, h = ("swiglu_quant", "fp8") if fp8 else ("swiglu", kd)
    fused = n.attr("prologue") == "add_rmsnorm_act_quant_normed"
    renorm = n.attr("renorm")
    out = []
    if fp8:
        out.append(("quant", act_quant.Problem(t, dim, ctx.act, "add_rmsnorm_normed" if fused else "quant")))
    out += [("gate", moe_gate.Problem(t, e, dim, kd, gate_dtype(ctx))),
            ("route", moe_route.Problem(t, e, k, n.attr("n_groups"), n.attr("topk_groups"),
                                         n.attr("score_func") == "sigmoid", bool(n.attr("gate_bias")),
                                         -1 if renorm is None else int(renorm), n_shared, int(masked)))]
    if not masked:
        out.append(("permute", moe_permute.Problem(t, e_all, k_all, 0, MOE_ALIGN, 0, 0, "none", 0, op="align")))
    out += [("gemm1", grouped_gemm.Problem(e_all, rows, inter, dim, wd, layout, up_epi, per_id, h, stacked_up=1,
                                           gather="a")),
            ("gemm2", grouped_gemm.Problem(e_all, rows, dim, inter, wd, layout, "weight", per_id, kd,
                                           gather="weight"))]
    if gated:       # behind a sigmoid gate (Qwen2-MoE): an MLP of its own beside the MoE
        mlp = Node(n.name, Op.MLP, (width, dim), n.dtype)
        out += [(f"shared_{slot}", p) for slot, p in _mlp(mlp, t, ctx)]
    if dense_shared:
        out += [("shared_gemm1", grouped_gemm.Problem(1, t, dense_shared, dim, wd, "contiguous", up_epi, 0, h)),
                ("shared_gemm2", grouped_gemm.Problem(1, t, dim, dense_shared, wd, "contiguous", "none", 0, kd))]
    out.append(("combine", moe_permute.Problem(t, e_all, k_all, dim, MOE_ALIGN, int(masked), 0, kd,
                                               int(bool(dense_shared)), int(fused), op="combine")))
    return out


def _block(n: Node, t: int, ctx: Context) -> list:
    """What a block runs itself once fuse_block_norms fused its attn_norm: the norm + act_quant and the GEMM(s) of
    MLA's input projections (fused_into the block, so not listed there). A fused ffn_norm's kernel is the MLP's
    prologue, listed with the MLP (as q_norm's is with wq_b)."""
    if not n.attr("attn_norm"):
        return []
    dim = n.shape[1]
    return [("quant", act_quant.Problem(t, dim, ctx.act, "rmsnorm"))] + \
        [(f"gemm{i}", fp8_gemm.Problem(t, w, dim, ctx.act)) for i, w in enumerate(n.attr("attn_gemm_n"))]


def _mla(n: Node, t: int, ctx: Context) -> list:
    """The prologue (RoPE + norm + cache write) and the attention: a decode step (one query per sequence, t
    sequences) or a prefill (the runtime runs a prompt as causal s_q > 1 over the cache; planned as one sequence
    of t tokens), over a cache of the model's max_seq_len positions in pages of MLA_PAGE. The region that owns the
    step's shared state (share_step_state) also computes it, once per step: "step" for a decode step, "prefill_step"
    for a prefill; each split-KV schedule with a combine only where mla_decode.split_pays."""
    h, kd = n.attr("heads"), ctx.dot
    cap = -(-ctx.max_seq // MLA_PAGE) * MLA_PAGE
    if n.attr("rope_layout") not in (None, "dskc"):
        return _foreign_mla(n, t, ctx, cap)
    split_d = int(mla_decode.split_pays(t, h, cap, ctx.sms))
    kernels = bool(n.attr("absorb"))        # fuse_mla_absorb: the query's RoPE moves to absorb_q
    out = [("rope", mla_rope.Problem(t, 0 if kernels else h, 0, kd, 1, "" if ctx.act == kd else ctx.act))]
    if kernels:
        nope, v = n.attr("nope"), n.attr("v_dim")
        out += [("absorb_q", mla_absorb.Problem(t, h, nope, v, kd, ctx.act, "q")),
                ("absorb_o", mla_absorb.Problem(t, h, nope, v, kd, ctx.act, "o", int(n.attr("absorb_quant"))))]
    out.append(("decode", mla_decode.Problem(t, 1, h, cap, MLA_PAGE, 0, kd, 0, split_d)))
    owner = n.attr("step_state") == "owner"
    if owner:
        out.append(("step", mla_step.Problem(t, 1, MLA_PAGE, split_d)))
    if t > 1:
        split_p = int(mla_decode.split_pays(1, t * h, cap, ctx.sms))
        out.append(("prefill", mla_decode.Problem(1, t, h, cap, MLA_PAGE, 0, kd, 1, split_p)))
        if owner:
            out.append(("prefill_step", mla_step.Problem(1, t, MLA_PAGE, split_p)))
    return out


def _foreign_mla(n: Node, t: int, ctx: Context, cap: int) -> list:
    """transformers' MLA (dskc.runtime.foreign): RoPE, norm and the absorption stay in PyTorch; each call computes
    its own split schedule (with the combine)."""
    h, kd = n.attr("heads"), ctx.dot
    out = [("decode", mla_decode.Problem(t, 1, h, cap, MLA_PAGE, 0, kd, 0))]
    if t > 1:
        out.append(("prefill", mla_decode.Problem(1, t, h, cap, MLA_PAGE, 0, kd, 1)))
    return out


LAUNCHES = {Op.LINEAR: _linear, Op.FP8_LINEAR: _linear, Op.MLP: _mlp, Op.MOE: _moe, Op.MLA: _mla, Op.BLOCK: _block}
STEMS = {act_quant.Problem: act_quant.STEM, fp8_gemm.Problem: fp8_gemm.STEM, bf16_gemm.Problem: bf16_gemm.STEM,
         grouped_gemm.Problem: grouped_gemm.STEM, moe_route.Problem: moe_route.STEM,
         moe_permute.Problem: moe_permute.STEM, mla_decode.Problem: mla_decode.STEM, mla_rope.Problem: mla_rope.STEM,
         mla_step.Problem: mla_step.STEM, mla_absorb.Problem: mla_absorb.STEM, moe_gate.Problem: moe_gate.STEM}


def launches(node: Node, tokens: int, ctx: Context) -> list[tuple[str, str, object]]:
    """[(slot, stem, Problem)] that `node`'s runtime module launches for `tokens` rows; [] for regions left to
    eager PyTorch or fused into another node's kernels."""
    make = LAUNCHES.get(node.op)
    if make is None or node.attr("fused_into"):
        return []
    return [(slot, STEMS[type(p)], p) for slot, p in make(node, tokens, ctx)]
