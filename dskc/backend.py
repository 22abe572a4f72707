"""`torch.compile(model, backend="dskc")`: lower the linears dskc recognises in a Dynamo FX graph to generated
kernels and hand the rest of the graph to Inductor (aot_eager where Inductor cannot run).

Works on models not written for dskc (a SwiGLU MLP, an SDPA attention block, a Mixtral-style MoE loop): each
`F.linear` without bias on a bf16/fp16 2-D weight becomes `dskc::linear` (the `bf16_gemm` template); anything
else stays with Inductor and is listed, with its reason, in `dskc_backend.report()`.

A MoE written as a loop with `torch.where(idx == e)` breaks Dynamo's graph (data-dependent shapes), and Dynamo
runs the rest of such a frame eagerly; set `torch._dynamo.config.capture_dynamic_output_shape_ops = True` to
capture it whole, so every expert's linears reach dskc.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import fx

from dskc import ops
from dskc.runtime.modules import dot_dtype, warn_once

log = logging.getLogger("dskc.backend")
_LINEARS = (F.linear, torch._C._nn.linear)
_KNOWN_LEFT = {F.scaled_dot_product_attention: "standard attention (SDPA): no dskc kernel; Inductor's",
               torch.where: "data-dependent routing (torch.where) in a loop over experts: left to Inductor"}


@torch.library.custom_op("dskc::linear", mutates_args=())
def dskc_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T on the bf16_gemm template, in x's dtype."""
    kd = dot_dtype(x.dtype)
    y = ops.bf16_gemm(x.reshape(-1, x.shape[-1]).to(kd).contiguous(), w.to(kd).contiguous())
    return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])


@dskc_linear.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _setup_ctx(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    """Gradients in plain PyTorch (dskc generates forward kernels; training is not its target)."""
    x, w = ctx.saved_tensors
    g2 = grad.reshape(-1, grad.shape[-1])
    return (g2 @ w).view(x.shape), g2.t() @ x.reshape(-1, x.shape[-1])


dskc_linear.register_autograd(_backward, setup_context=_setup_ctx)


@dataclasses.dataclass
class GraphReport:
    lowered: list             # node names turned into dskc kernels
    left: list                # (node, reason) handed to Inductor / aot_eager
    compiler: str             # "inductor" | "aot_eager"


def _value(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _why_not(node: fx.Node) -> str | None:
    args = list(node.args) + [None] * 3
    x, w, bias = (_value(a) for a in args[:3])
    if node.kwargs.get("bias") is not None or args[2] is not None:
        return "linear with bias: bias epilogue not in the bf16_gemm template yet"
    if w is None or x is None:
        return "shapes unknown at capture"
    if w.dim() != 2 or w.dtype not in (torch.bfloat16, torch.float16) or x.dtype != w.dtype:
        return f"{w.dtype} weight {tuple(w.shape)}: dskc linears compute in bf16/fp16"
    if w.shape[1] % 8:
        return f"input width {w.shape[1]} is not a multiple of 8 (16-byte rows)"
    return None


def lower_linears(gm: fx.GraphModule) -> GraphReport:
    """Rewrite recognised linears in place; record every linear left alone and other known non-lowered ops."""
    lowered, left = [], []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _LINEARS:
            why = _why_not(node)
            if why:
                left.append((node.name, why))
                continue
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(torch.ops.dskc.linear.default, (node.args[0], node.args[1]))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            lowered.append(new.name)
        elif node.target in _KNOWN_LEFT:
            left.append((node.name, _KNOWN_LEFT[node.target]))
    gm.graph.lint()
    gm.recompile()
    return GraphReport(lowered, left, "")


class DskcBackend:
    """The callable registered as the `dskc` Dynamo backend. `report()` lists what each captured graph got."""

    def __init__(self, rest: str = "inductor"):
        if rest not in ("inductor", "aot_eager"):
            raise ValueError(f"rest must be 'inductor' or 'aot_eager', got {rest!r}")
        self.rest = rest
        self.graphs: list[GraphReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs):
        rep = lower_linears(gm)
        for name, why in rep.left:
            warn_once(f"backend:{why}", f"dskc backend: {name} left to Inductor: {why}")
        try:
            if self.rest != "inductor":
                raise RuntimeError("aot_eager requested")
            from torch._inductor.compile_fx import compile_fx
            fn = compile_fx(gm, example_inputs)
            rep.compiler = "inductor"
        except Exception as exc:  # Inductor needs a working C++ toolchain on CPU; fall back visibly
            if self.rest == "inductor":
                warn_once("backend:aot_eager", f"dskc backend: Inductor could not compile the rest "
                          f"({exc!r:.200}); using aot_eager")
            from torch._dynamo.backends.common import aot_autograd
            from torch._functorch.aot_autograd import make_boxed_func
            fn = aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)
            rep.compiler = "aot_eager"
        self.graphs.append(rep)
        return fn

    def report(self) -> str:
        lines = []
        for i, g in enumerate(self.graphs):
            lines.append(f"graph {i}: {len(g.lowered)} linears on dskc kernels, rest on {g.compiler}")
            lines += [f"  left: {n}: {why}" for n, why in g.left]
        return "\n".join(lines) or "no graph compiled yet"

    def reset(self) -> None:
        self.graphs.clear()


dskc_backend = DskcBackend()
