"""The lowering: one readable list of named passes over the IR. Each pass is Graph -> Graph, verified after it,
and can be dumped by name (`dskc explain` prints the graph after every pass).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from dskc.ir.graph import Graph, Node, Op, verify


@dataclasses.dataclass(frozen=True)
class Options:
    quantize_weights: bool = False   # quantise bf16 linear weights to FP8 128x128 blocks ahead of time
    absorb_mla: bool = True          # rewrite naive MLA to the absorbed form (precomputed absorbed weights)
    fuse_block_norms: bool = True    # fuse a block's attn_norm / ffn_norm (+ residual add) into the FP8 act_quant
    compute_dtype: str | None = None  # "bf16" | "fp16": run a float32 model's regions in that dtype (no kernel
                                      # computes in float32); None refuses a float32 model


def absorb_mla(g: Graph, opt: Options) -> Graph:
    """Naive MLA caches per-head K/V; the absorbed form caches the 576-wide latent and folds wkv_b into q / out."""
    if not opt.absorb_mla:
        return g
    for n in g.by_op(Op.MLA):
        if n.attr("attn_impl") == "naive":
            g = g.replace(n, n.with_attrs(attn_impl="absorb", rewritten="naive->absorb"))
        for w in [x for x in g.nodes if x.name == f"{n.name}.wkv_b"]:
            g = g.replace(w, w.with_attrs(absorbed_into=n.name))   # precomputed into q / out projections
    return g


def _whole_blocks(*dims) -> bool:
    return all(isinstance(d, int) and d % 128 == 0 for d in dims)


def quantize_weights(g: Graph, opt: Options) -> Graph:
    """Optionally quantise float weights to FP8 128x128 blocks once, at compile time (DeepSeek's recipe): linears
    whose input width is whole 128-blocks (the output width may end in a partial block), and dense MLPs and MoE
    blocks (routed and shared experts) whose widths are all whole blocks (their SwiGLU epilogue quantises 1x128)."""
    if not opt.quantize_weights:
        return g
    for n in g.by_op(Op.LINEAR, Op.MLP, Op.MOE):
        if n.op is Op.LINEAR:
            ok = _whole_blocks(n.shape[1])
        elif n.op is Op.MLP:
            ok = n.dtype != "fp8" and _whole_blocks(*n.shape)
        else:
            ok = n.dtype != "fp8" and _whole_blocks(n.shape[1], n.shape[2], n.attr("shared_inter") or 128)
        if ok:
            op = Op.FP8_LINEAR if n.op is Op.LINEAR else n.op
            g = g.replace(n, dataclasses.replace(n, op=op, dtype="fp8").with_attrs(quantized="ahead"))
    return g


def fuse_norm_quant(g: Graph, opt: Options) -> Graph:
    """RMSNorm feeding a single FP8 linear: normalise and quantise (1x128 e4m3) in one kernel. Today's site: the
    query path's q_norm -> wq_b inside MLA (a block's attn_norm / ffn_norm: see fuse_block_norms)."""
    names = {n.name: n for n in g.nodes}
    for mla in g.by_op(Op.MLA):
        norm, lin = names.get(f"{mla.name}.q_norm"), names.get(f"{mla.name}.wq_b")
        if norm is not None and lin is not None and norm.op is Op.RMSNORM and lin.op is Op.FP8_LINEAR:
            g = g.replace(norm, norm.with_attrs(fused_into=lin.name, epilogue="act_quant"))
            g = g.replace(lin, lin.with_attrs(prologue="rmsnorm_act_quant"))
    return g


def _attn_inputs(names: dict, attn: Node) -> list:
    """MLA's projections of the normed block input: wq_a (or wq when q_lora_rank == 0) and wkv_a."""
    first = names.get(f"{attn.name}.wq_a") or names.get(f"{attn.name}.wq")
    return [first, names.get(f"{attn.name}.wkv_a")]


def _fuse_attn_norm(g: Graph, block: Node) -> Graph:
    names = {n.name: n for n in g.nodes}
    norm, attn = names[f"{block.name}.attn_norm"], names[f"{block.name}.attn"]
    projs = _attn_inputs(names, attn)
    if attn.op is not Op.MLA or any(p is None or p.op is not Op.FP8_LINEAR for p in projs):
        return g
    widths = tuple(p.shape[0] for p in projs)
    # [wq_a; wkv_a] stack into one weight when every part but the last ends on a whole 128-row scale block
    gemm_n = (sum(widths),) if all(w % 128 == 0 for w in widths[:-1]) else widths
    g = g.replace(norm, norm.with_attrs(fused_into=block.name, epilogue="act_quant"))
    for p in projs:
        g = g.replace(p, p.with_attrs(fused_into=block.name))
    return g.replace(block, block.with_attrs(attn_norm="rmsnorm_act_quant", attn_gemm_n=gemm_n,
                                             attn_inputs="+".join(p.name.rpartition(".")[2] for p in projs)))


# the ffn's kind -> (the fused norm kernel it takes, where the block's second residual add runs)
FFN_NORM = {Op.MLP: ("add_rmsnorm_act_quant", "down"), Op.MOE: ("add_rmsnorm_act_quant_normed", "combine")}


def _fuse_ffn_norm(g: Graph, block: Node) -> Graph:
    names = {n.name: n for n in g.nodes}
    norm, ffn = names[f"{block.name}.ffn_norm"], names[f"{block.name}.ffn"]
    if ffn.op not in FFN_NORM or ffn.dtype != "fp8":
        return g
    prologue, residual = FFN_NORM[ffn.op]
    g = g.replace(norm, norm.with_attrs(fused_into=ffn.name, epilogue="act_quant", residual="add"))
    g = g.replace(ffn, ffn.with_attrs(prologue=prologue, residual=residual))
    return g.replace(block, block.with_attrs(ffn_norm=prologue))


def fuse_block_norms(g: Graph, opt: Options) -> Graph:
    """A transformer block's pre-norms, fused with the 1x128 e4m3 quantisation their FP8 consumers need.

    attn_norm (when MLA's wq_a / wq and wkv_a are FP8): one rmsnorm_act_quant feeds both projections, run as one
    FP8 GEMM over the stacked [wq_a; wkv_a] (block scales stack along N when wq_a's width is a multiple of 128; else
    two GEMMs on the same (q, s)). The projections are marked fused_into the block, which lists their kernels.
    ffn_norm (when the ffn is FP8): the residual add of the attention output, the norm and the quantisation run as
    one rmsnorm_act_quant(..., residual=x) feeding a dense MLP's [w1|w3] GEMM, with the block's second residual add
    in the epilogue of its w2 GEMM (residual="down"); for a MoE the same kernel also writes the normed x the gate
    reads (normed=...), the experts read its quantisation, and the second residual add runs in the combine
    (residual="combine"). Non-FP8 consumers keep both norms as they are.
    """
    if not opt.fuse_block_norms:
        return g
    for name in [b.name for b in g.by_op(Op.BLOCK)]:
        g = _fuse_attn_norm(g, next(n for n in g.nodes if n.name == name))
        g = _fuse_ffn_norm(g, next(n for n in g.nodes if n.name == name))
    return g


def fuse_moe_epilogues(g: Graph, opt: Options) -> Graph:
    """Grouped GEMM epilogues: SwiGLU (+ FP8 quant) after [gate|up], routed-weight multiply after down."""
    for n in g.by_op(Op.MOE, Op.MLP):
        epi = "swiglu_quant" if n.dtype == "fp8" else "swiglu"
        extra = {"routed_weight": True} if n.op is Op.MOE else {}
        g = g.replace(n, n.with_attrs(up_epilogue=epi, **extra))
    return g


def fuse_rope_cache_write(g: Graph, opt: Options) -> Graph:
    """MLA prologue: RoPE on q_pe / k_pe, RMSNorm of the latent kv, and the paged-cache write in one pass."""
    for n in g.by_op(Op.MLA):
        g = g.replace(n, n.with_attrs(prologue="rope+kv_norm+cache_write"))
        for norm in [x for x in g.nodes if x.name == f"{n.name}.kv_norm"]:
            g = g.replace(norm, norm.with_attrs(fused_into=n.name))
    return g


# (final norm, LM head) of the model families whose forward is head(norm(h)).float(): the head computes the norm of
# the rows it takes (the last position's) itself and writes fp32 logits
LM_HEADS = (("norm", "head"),)


def fuse_head_norm(g: Graph, opt: Options) -> Graph:
    """The final RMSNorm inside the LM head's launch pair: the norm kernel writes the normed rows in the GEMM's
    operand dtype (or, for an FP8 head, their 1x128 quantisation) and the head's GEMM writes the fp32 logits the
    model returns (no separate norm pass over every position, no cast of the logits)."""
    names = {n.name: n for n in g.nodes}
    for norm_name, head_name in LM_HEADS:
        norm, head = names.get(norm_name), names.get(head_name)
        if norm is None or head is None or norm.op is not Op.RMSNORM or norm.attr("fused_into") \
                or head.op not in (Op.LINEAR, Op.FP8_LINEAR) or head.attr("prologue"):
            continue
        g = g.replace(norm, norm.with_attrs(fused_into=head.name, epilogue="head"))
        prologue = "rmsnorm_act_quant" if head.op is Op.FP8_LINEAR else "rmsnorm"
        g = g.replace(head, head.with_attrs(prologue=prologue, norm=norm.name, logits="fp32"))
    return g


def _absorb_kernels_serve(mla: Node) -> bool:
    """mla_absorb's shapes: a no-rope query width of whole 16s, and values of 64 (pairs of heads) or whole 128s."""
    v, heads, nope = mla.attr("v_dim"), mla.attr("heads"), mla.attr("nope")
    return nope % 16 == 0 and nope <= 256 and ((v == 64 and heads % 2 == 0) or v % 128 == 0)


def _own_mlas(g: Graph) -> list:
    """dskc's own MLA regions (dskc.runtime.mla.KernelMLA); transformers' (dskc.runtime.foreign) keep RoPE, norm and
    the absorption in PyTorch and compute their split schedule per call."""
    return [n for n in g.by_op(Op.MLA) if n.attr("rope_layout") in (None, "dskc")]


def fuse_mla_absorb(g: Graph, opt: Options) -> Graph:
    """Absorbed MLA's wkv_b products as kernels writing where the next kernel reads: W_UK into the 576-wide query
    with the query's RoPE (no concatenation, no copy), W_UV with wo's 1x128 FP8 quantisation (wo's GEMM takes the
    quantised rows; its own act_quant no longer runs)."""
    names = {n.name: n for n in g.nodes}
    for n in _own_mlas(g):
        if n.attr("attn_impl") != "absorb" or not _absorb_kernels_serve(n):
            continue
        wo = names.get(f"{n.name}.wo")
        quant = wo is not None and wo.op is Op.FP8_LINEAR
        g = g.replace(n, n.with_attrs(absorb="q+o kernels", absorb_quant=quant))
        if quant:
            g = g.replace(wo, wo.with_attrs(prologue="mla_absorb_o"))
    return g


def share_step_state(g: Graph, opt: Options) -> Graph:
    """Per-step MLA state (each new token's rope row and cache slot, the sequence lengths and mla_decode's split
    schedule) is the same in every layer: the first MLA region computes it once per step (one mla_step launch) and
    the others reuse it (dskc.runtime.mla.share_step_state links their modules)."""
    mlas = _own_mlas(g)
    for i, n in enumerate(mlas):
        g = g.replace(n, n.with_attrs(step_state="owner" if i == 0 else "shared", step_owner=mlas[0].name))
    return g


PASSES: tuple[tuple[str, Callable[[Graph, Options], Graph]], ...] = (
    ("absorb_mla", absorb_mla),
    ("quantize_weights", quantize_weights),
    ("fuse_norm_quant", fuse_norm_quant),
    ("fuse_block_norms", fuse_block_norms),
    ("fuse_moe_epilogues", fuse_moe_epilogues),
    ("fuse_rope_cache_write", fuse_rope_cache_write),
    ("fuse_mla_absorb", fuse_mla_absorb),
    ("fuse_head_norm", fuse_head_norm),
    ("share_step_state", share_step_state),
)


def lower(g: Graph, opt: Options = Options(), dump: Callable[[str, Graph], None] | None = None) -> Graph:
    """Run every pass in order, verifying between passes; `dump(name, graph)` sees each intermediate graph."""
    if dump:
        dump("capture", g)
    for name, fn in PASSES:
        g = verify(fn(g, opt))
        if dump:
            dump(name, g)
    return g
