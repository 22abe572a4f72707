"""Find the regions dskc lowers in a model's module tree, by structure (a pattern table), not by class.

model/ never calls dskc: a region is recognised from what a module holds (an MLA block has wkv_a, wkv_b, wo and
kv_norm; an MoE block has a gate and a list of experts; a linear is a leaf with a 2-D weight and, for FP8, a block
scale; a transformer block holds attn_norm, attn (MLA), ffn_norm and ffn (MLP or MoE)). Anything else stays as it
is and runs as eager PyTorch (or Inductor under torch.compile).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dskc.ir.graph import BLOCK_PARTS, Graph, Node, Op, verify

FP8_DTYPES = (torch.float8_e4m3fn,)


def _has(m: nn.Module, *names: str) -> bool:
    return all(getattr(m, n, None) is not None for n in names)


def is_mla(m: nn.Module) -> bool:
    return _has(m, "wkv_a", "wkv_b", "wo", "kv_norm") and hasattr(m, "attn_impl")


def is_moe(m: nn.Module) -> bool:
    return _has(m, "gate", "experts") and isinstance(m.experts, nn.ModuleList)


def is_mlp(m: nn.Module) -> bool:
    return all(is_linear(getattr(m, n, None)) for n in ("w1", "w2", "w3"))


def is_linear(m) -> bool:
    w = getattr(m, "weight", None)
    return (isinstance(m, nn.Module) and isinstance(w, torch.Tensor) and w.dim() == 2 and not list(m.children())
            and not isinstance(m, nn.Embedding) and type(m).__name__ not in ("ParallelEmbedding", "Gate"))


def is_rmsnorm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and hasattr(m, "eps") and not list(m.children())


def is_block(m: nn.Module) -> bool:
    """A pre-norm residual block (model.Block): x + attn(attn_norm(x)), then x + ffn(ffn_norm(x))."""
    return (_has(m, *BLOCK_PARTS) and is_rmsnorm(m.attn_norm) and is_rmsnorm(m.ffn_norm) and is_mla(m.attn)
            and (is_mlp(m.ffn) or is_moe(m.ffn)))


def _linear_node(name: str, m: nn.Module) -> Node:
    fp8 = m.weight.dtype in FP8_DTYPES
    if fp8 and getattr(m, "scale", None) is None:
        return Node(name, Op.FALLBACK, tuple(m.weight.shape), "fp8", (("reason", "fp8 weight without a scale"),))
    dtype = "fp8" if fp8 else str(m.weight.dtype).replace("torch.", "").replace("bfloat16", "bf16")
    return Node(name, Op.FP8_LINEAR if fp8 else Op.LINEAR, tuple(m.weight.shape), dtype)


def _moe_node(name: str, m: nn.Module) -> Node:
    experts = [e for e in m.experts if e is not None]
    w1 = experts[0].w1.weight
    fp8 = w1.dtype in FP8_DTYPES
    gate = m.gate
    attrs = dict(n_experts=len(m.experts), top_k=gate.topk, n_groups=gate.n_groups, topk_groups=gate.topk_groups,
                 score_func=gate.score_func, route_scale=float(gate.route_scale), gate_bias=gate.bias is not None,
                 shared=m.shared_experts is not None)
    return Node(name, Op.MOE, ("T", w1.shape[1], w1.shape[0]), "fp8" if fp8 else "bf16",
                tuple(sorted(attrs.items())))


def _mla_node(name: str, m: nn.Module) -> Node:
    attrs = dict(attn_impl=m.attn_impl, heads=m.n_local_heads, kv_lora_rank=m.kv_lora_rank, rope=m.rope,
                 nope=m.nope, v_dim=m.v_dim)
    return Node(name, Op.MLA, ("B", "S", m.n_local_heads, m.kv_lora_rank + m.rope), "bf16",
                tuple(sorted(attrs.items())))


def find_regions(model: nn.Module) -> Graph:
    """Walk the module tree in definition order and return the IR graph of recognised regions."""
    nodes, covered = [], []
    for name, m in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in covered):
            continue
        if is_block(m):
            nodes.append(Node(name, Op.BLOCK, ("T", m.attn_norm.weight.shape[0]), "bf16"))  # its parts follow
        elif is_mla(m):
            nodes.append(_mla_node(name, m))      # its projections are visited below as linears
        elif is_moe(m):
            nodes.append(_moe_node(name, m))
            covered.append(f"{name}.experts")     # routed experts become one grouped GEMM
            covered.append(f"{name}.gate")
            covered.append(f"{name}.shared_experts")  # added in the combine
        elif is_mlp(m):
            nodes.append(Node(name, Op.MLP, tuple(m.w1.weight.shape), _linear_node(name, m.w1).dtype))
            covered.extend(f"{name}.{w}" for w in ("w1", "w2", "w3"))  # [w1|w3] GEMM + SwiGLU epilogue, then w2
        elif is_linear(m):
            nodes.append(_linear_node(name, m))
        elif is_rmsnorm(m):
            nodes.append(Node(name, Op.RMSNORM, tuple(m.weight.shape), "bf16"))
    if not any(n.op in (Op.LINEAR, Op.FP8_LINEAR, Op.MOE, Op.MLA, Op.MLP) for n in nodes):
        raise ValueError(f"dskc found no region it can lower in {type(model).__name__} (no linear, MLP, MoE or "
                         "MLA block); run it without dskc, or with torch.compile's default backend")
    return verify(Graph(tuple(nodes)))
