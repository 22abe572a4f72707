"""dskc's IR: a small, typed, immutable graph of regions, verified between passes, printable for `dskc explain`.

A node is a region of the model that dskc lowers as one unit (an FP8 linear, the MoE block, MLA attention) or a
span it leaves to the fallback. A BLOCK node stands for a transformer block whose parts (attn_norm, attn, ffn_norm,
ffn) are nodes of their own: it is where work across those parts fuses (the norms into their consumers' GEMMs).
Shapes are symbolic where the batch or sequence length is dynamic ("T" = tokens).
"""
from __future__ import annotations

import dataclasses
import enum


class Op(enum.Enum):
    LINEAR = "linear"            # y = x W^T, bf16 weights
    FP8_LINEAR = "fp8_linear"    # y = x W^T, e4m3 weights with 128x128 block scales
    RMSNORM = "rmsnorm"
    MOE = "moe"                  # gate -> routing -> experts -> combine (+ shared experts)
    MLP = "mlp"                  # dense SwiGLU MLP
    MLA = "mla"                  # multi-head latent attention (naive or absorbed)
    ATTENTION = "attention"      # standard attention (SDPA)
    BLOCK = "block"              # pre-norm residual block: x + attn(attn_norm(x)), then x + ffn(ffn_norm(x))
    FALLBACK = "fallback"        # left to Inductor / eager, with a reason


@dataclasses.dataclass(frozen=True)
class Node:
    name: str                    # the module path in the model, e.g. "layers.1.ffn"
    op: Op
    shape: tuple                 # the region's main weight / problem shape, symbolic dims as strings
    dtype: str                   # "fp8" | "bf16" | "fp32" ...
    attrs: tuple = ()            # sorted (key, value) pairs: static facts passes add or read

    def attr(self, key, default=None):
        return dict(self.attrs).get(key, default)

    def with_attrs(self, **changes) -> "Node":
        merged = dict(self.attrs)
        merged.update(changes)
        return dataclasses.replace(self, attrs=tuple(sorted(merged.items())))


@dataclasses.dataclass(frozen=True)
class Graph:
    nodes: tuple                 # Node, in execution order

    def replace(self, old: Node, new: Node) -> "Graph":
        return Graph(tuple(new if n is old else n for n in self.nodes))

    def by_op(self, *ops: Op):
        return [n for n in self.nodes if n.op in ops]

    def __str__(self) -> str:
        lines = []
        for n in self.nodes:
            attrs = ", ".join(f"{k}={v}" for k, v in n.attrs)
            lines.append(f"{n.name:<28} {n.op.value:<11} {n.dtype:<5} {str(n.shape):<22} {attrs}")
        return "\n".join(lines)


BLOCK_PARTS = ("attn_norm", "attn", "ffn_norm", "ffn")   # a BLOCK node's parts, as child names


class VerifyError(ValueError):
    pass


def verify(graph: Graph) -> Graph:
    """Check the invariants every pass must keep; returns the graph so passes can chain."""
    seen = set()
    for n in graph.nodes:
        if not isinstance(n, Node) or not isinstance(n.op, Op):
            raise VerifyError(f"not an IR node: {n!r}")
        if n.name in seen:
            raise VerifyError(f"duplicate region name {n.name!r}")
        seen.add(n.name)
        keys = [k for k, _ in n.attrs]
        if keys != sorted(keys):
            raise VerifyError(f"{n.name}: attrs must be sorted pairs")
        if n.op is Op.FP8_LINEAR and any(isinstance(d, int) and d % 128 for d in n.shape[1:]):
            raise VerifyError(f"{n.name}: FP8 linear input width {n.shape[1]} is not a multiple of 128")
        if n.op is Op.FALLBACK and not n.attr("reason"):
            raise VerifyError(f"{n.name}: a fallback must carry its reason")
    for n in graph.nodes:
        for key in ("fused_into", "absorbed_into"):
            if n.attr(key) is not None and n.attr(key) not in seen:
                raise VerifyError(f"{n.name}: {key}={n.attr(key)!r} names no node of the graph")
        if n.op is Op.BLOCK:
            missing = [p for p in BLOCK_PARTS if f"{n.name}.{p}" not in seen]
            if missing:
                raise VerifyError(f"{n.name}: a block needs its parts as nodes, missing {missing}")
    return graph
