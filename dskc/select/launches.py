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
from dskc.templates.triton import (act_quant, bf16_gemm, fp8_gemm, grouped_gemm, mla_decode, mla_rope, moe_permute,
                                   moe_route)

MLA_PAGE = 64            # page size of the paged latent cache the MLA runtime allocates
MOE_ALIGN = 128          # rows per expert block of the contiguous MoE layout (DeepGEMM's alignment)


@dataclasses.dataclass(frozen=True)
class Context:
    act: str = "bf16"            # activation dtype of the model ("bf16" | "fp16" | "fp32")
    runs_on: str = "gpu"         # "gpu" | "cpu" (the interpreter)
    max_seq: int = 4096          # KV-cache positions per sequence (ModelArgs.max_seq_len)
    shared: tuple = ()           # ((MoE region, shared experts' width), ...)

    @property
    def dot(self) -> str:
        """The dtype dot-kernel operands of activation dtype `act` run in here."""
        return dot_dtype(self.act, self.runs_on)


def dot_dtype(act: str, runs_on: str) -> str:
    """bf16 dot operands run as fp16 under the interpreter (triton-lang/triton#11584); everything else as is."""
    return "fp16" if act == "bf16" and runs_on == "cpu" else act


def _linear(n: Node, t: int, ctx: Context) -> list:
    N, K = n.shape
    if n.op is Op.FP8_LINEAR:
        op = "rmsnorm" if n.attr("prologue") == "rmsnorm_act_quant" else "quant"
        return [("quant", act_quant.Problem(t, K, ctx.act, op)), ("gemm", fp8_gemm.Problem(t, N, K, ctx.act))]
    return [("gemm", bf16_gemm.Problem(t, N, K, ctx.dot))]


def _mlp(n: Node, t: int, ctx: Context) -> list:
    inter, dim = n.shape
    if n.dtype != "fp8":
        return [("up", bf16_gemm.Problem(t, 2 * inter, dim, ctx.dot)), ("down", bf16_gemm.Problem(t, dim, inter, ctx.dot))]
    op = "add_rmsnorm" if n.attr("prologue") == "add_rmsnorm_act_quant" else "quant"
    return [("quant", act_quant.Problem(t, dim, ctx.act, op)), ("up", fp8_gemm.Problem(t, 2 * inter, dim, ctx.act)),
            ("act", act_quant.Problem(t, inter, ctx.act, "silu_mul")),
            ("down", fp8_gemm.Problem(t, dim, inter, ctx.act))]


def moe_layout(t: int, e: int, top_k: int) -> str:
    """fused_moe's "auto" rule: the masked layout while E * T rows fit in the contiguous layout's row space."""
    return "masked" if e * t <= moe_permute.row_space(t * top_k, e, MOE_ALIGN) else "contiguous"


def _moe(n: Node, t: int, ctx: Context) -> list:
    _, dim, inter = n.shape
    e, k = n.attr("n_experts"), n.attr("top_k")
    fp8 = n.dtype == "fp8"
    kd = ctx.act if fp8 else ctx.dot                 # the dtype of x as the MoE kernels see it
    wd = "fp8" if fp8 else kd
    layout = moe_layout(t, e, k)
    masked = layout == "masked"
    rows = e * t if masked else moe_permute.row_space(t * k, e, MOE_ALIGN)
    per_id = 1 if masked else MOE_ALIGN
    up_epi, h = ("swiglu_quant", "fp8") if fp8 else ("swiglu", kd)
    shared = n.attr("shared_inter") or dict(ctx.shared).get(n.name)
    renorm = n.attr("renorm")
    out = [("route", moe_route.Problem(t, e, k, n.attr("n_groups"), n.attr("topk_groups"),
                                        n.attr("score_func") == "sigmoid", bool(n.attr("gate_bias")),
                                        -1 if renorm is None else int(renorm))),
           ("permute", moe_permute.Problem(t, e, k, dim, MOE_ALIGN, int(masked), int(fp8), kd,
                                            int(bool(shared) and not n.attr("shared_gate")))),
           ("gemm1", grouped_gemm.Problem(e, rows, inter, dim, wd, layout, up_epi, per_id, h, stacked_up=1)),
           ("gemm2", grouped_gemm.Problem(e, rows, dim, inter, wd, layout, "weight", per_id, kd))]
    if shared and n.attr("shared_gate"):   # behind a sigmoid gate (Qwen2-MoE): an MLP of its own beside the combine
        mlp = Node(n.name, Op.MLP, (shared, dim), n.dtype)
        out += [(f"shared_{slot}", p) for slot, p in _mlp(mlp, t, ctx)]
    elif shared:
        out += [("shared_gemm1", grouped_gemm.Problem(1, t, shared, dim, wd, "contiguous", up_epi, 1, h)),
                ("shared_gemm2", grouped_gemm.Problem(1, t, dim, shared, wd, "contiguous", "none", 1, kd))]
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
    of t tokens), over a cache of the model's max_seq_len positions in pages of MLA_PAGE."""
    h, kd = n.attr("heads"), ctx.dot
    cap = -(-ctx.max_seq // MLA_PAGE) * MLA_PAGE
    foreign = n.attr("rope_layout") not in (None, "dskc")   # transformers' MLA: RoPE and norm stay in PyTorch
    out = ([] if foreign else [("rope", mla_rope.Problem(t, h, 0, kd, 1))]) + \
        [("decode", mla_decode.Problem(t, 1, h, cap, MLA_PAGE, 0, kd, 0))]
    if t > 1:
        out.append(("prefill", mla_decode.Problem(1, t, h, cap, MLA_PAGE, 0, kd, 1)))
    return out


LAUNCHES = {Op.LINEAR: _linear, Op.FP8_LINEAR: _linear, Op.MLP: _mlp, Op.MOE: _moe, Op.MLA: _mla, Op.BLOCK: _block}
STEMS = {act_quant.Problem: act_quant.STEM, fp8_gemm.Problem: fp8_gemm.STEM, bf16_gemm.Problem: bf16_gemm.STEM,
         grouped_gemm.Problem: grouped_gemm.STEM, moe_route.Problem: moe_route.STEM,
         moe_permute.Problem: moe_permute.STEM, mla_decode.Problem: mla_decode.STEM, mla_rope.Problem: mla_rope.STEM}


def launches(node: Node, tokens: int, ctx: Context) -> list[tuple[str, str, object]]:
    """[(slot, stem, Problem)] that `node`'s runtime module launches for `tokens` rows; [] for regions left to
    eager PyTorch or fused into another node's kernels."""
    make = LAUNCHES.get(node.op)
    if make is None or node.attr("fused_into"):
        return []
    return [(slot, STEMS[type(p)], p) for slot, p in make(node, tokens, ctx)]
