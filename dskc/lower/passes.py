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


def quantize_weights(g: Graph, opt: Options) -> Graph:
    """Optionally turn bf16 linears whose input width is whole 128-blocks into FP8 linears (weights quantised once;
    the output width may end in a partial block)."""
    if not opt.quantize_weights:
        return g
    for n in g.by_op(Op.LINEAR):
        if isinstance(n.shape[1], int) and n.shape[1] % 128 == 0:
            g = g.replace(n, dataclasses.replace(n, op=Op.FP8_LINEAR, dtype="fp8").with_attrs(quantized="ahead"))
    return g


def fuse_norm_quant(g: Graph, opt: Options) -> Graph:
    """RMSNorm feeding a single FP8 linear: normalise and quantise (1x128 e4m3) in one kernel. Today's site: the
    query path's q_norm -> wq_b inside MLA (attn_norm / ffn_norm feed several consumers and stay separate)."""
    names = {n.name: n for n in g.nodes}
    for mla in g.by_op(Op.MLA):
        norm, lin = names.get(f"{mla.name}.q_norm"), names.get(f"{mla.name}.wq_b")
        if norm is not None and lin is not None and norm.op is Op.RMSNORM and lin.op is Op.FP8_LINEAR:
            g = g.replace(norm, norm.with_attrs(fused_into=lin.name, epilogue="act_quant"))
            g = g.replace(lin, lin.with_attrs(prologue="rmsnorm_act_quant"))
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


PASSES: tuple[tuple[str, Callable[[Graph, Options], Graph]], ...] = (
    ("absorb_mla", absorb_mla),
    ("quantize_weights", quantize_weights),
    ("fuse_norm_quant", fuse_norm_quant),
    ("fuse_moe_epilogues", fuse_moe_epilogues),
    ("fuse_rope_cache_write", fuse_rope_cache_write),
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
