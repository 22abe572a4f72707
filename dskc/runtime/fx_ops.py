"""The custom ops the torch.compile backend puts in place of a region's FX nodes (torch.library, each with a fake
implementation so Dynamo's graph stays whole and symbolic in the token count; Inductor calls them as extern
kernels). They take the region's activations and its weights as laid out at compile time (graph constants) and
run the same functions as dskc.compile's kernel modules (dskc.runtime.modules / foreign), configs chosen by the ops.

  dskc::linear      x @ w^T on bf16_gemm (bf16 / fp16; a PyTorch backward, so training graphs keep it)
  dskc::fp8_linear  act_quant (1x128) + fp8_gemm_1d2d on e4m3 weights with 128x128 block scales
  dskc::mlp         SwiGLU MLP: [gate; up] GEMM, SwiGLU (+ quant), down
  dskc::moe         routing + permute + grouped GEMMs + combine (+ shared experts): fused_moe
  dskc::mla_attend  absorbed MLA attention core over the latent cache as transformers holds it: mla_decode
"""
from __future__ import annotations

import torch

from dskc import ops
from dskc.runtime.foreign import mla_attend as _mla_attend
from dskc.runtime.modules import dot_dtype, mlp_forward, moe_forward
from dskc.runtime.weights import Dense, MLPWeights, MoEWeights


@torch.library.custom_op("dskc::linear", mutates_args=())
def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T on the bf16_gemm template, in x's dtype."""
    kd = dot_dtype(w.dtype if w.dtype != torch.float32 else torch.bfloat16)
    y = ops.bf16_gemm(x.reshape(-1, x.shape[-1]).to(kd).contiguous(), w.to(kd).contiguous())
    return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])


@linear.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _setup_ctx(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    """Gradients in plain PyTorch (dskc generates forward kernels; training is not its target)."""
    x, w = ctx.saved_tensors
    g2 = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
    return (g2 @ w).view(x.shape).to(x.dtype), g2.t() @ x.reshape(-1, x.shape[-1]).to(w.dtype)


linear.register_autograd(_backward, setup_context=_setup_ctx)


@torch.library.custom_op("dskc::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequant(w [N, K] e4m3, s [ceil(N/128), K/128])^T, x quantised 1x128 on the fly, in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    q, sx = ops.act_quant(x2)
    return ops.fp8_gemm(q, sx, w, s, out_dtype=x.dtype).view(*x.shape[:-1], w.shape[0])


@fp8_linear.register_fake
def _(x, w, s):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _mlp(up_w, up_s, down_w, down_s) -> MLPWeights:
    return MLPWeights(Dense(up_w, up_s), Dense(down_w, down_s))


@torch.library.custom_op("dskc::mlp", mutates_args=())
def mlp(x: torch.Tensor, up_w: torch.Tensor, up_s: torch.Tensor | None, down_w: torch.Tensor,
        down_s: torch.Tensor | None) -> torch.Tensor:
    """SwiGLU MLP on x [..., H]: up = [gate; up] [2I, H], down [H, I] (scales for e4m3 weights)."""
    return mlp_forward(x.reshape(-1, x.shape[-1]), _mlp(up_w, up_s, down_w, down_s), x.dtype).view(x.shape)


@mlp.register_fake
def _(x, up_w, up_s, down_w, down_s):
    return torch.empty_like(x)


@torch.library.custom_op("dskc::moe", mutates_args=())
def moe(x: torch.Tensor, gate: torch.Tensor, gate_bias: torch.Tensor | None, w13: torch.Tensor,
        w13_s: torch.Tensor | None, w2: torch.Tensor, w2_s: torch.Tensor | None, shared_up: torch.Tensor | None,
        shared_up_s: torch.Tensor | None, shared_down: torch.Tensor | None, shared_down_s: torch.Tensor | None,
        shared_gate: torch.Tensor | None, top_k: int, n_groups: int, topk_groups: int, score_func: str,
        route_scale: float, renorm: bool) -> torch.Tensor:
    """The MoE block on x [..., H] (dskc.runtime.modules.moe_forward; weights as MoEWeights lays them out)."""
    shared = None if shared_up is None else _mlp(shared_up, shared_up_s, shared_down, shared_down_s)
    w = MoEWeights(gate, gate_bias, w13, w13_s, w2, w2_s, shared, shared_gate)
    route = dict(top_k=top_k, n_groups=n_groups, n_limited_groups=topk_groups, score_func=score_func,
                 route_scale=route_scale, renorm=renorm)
    return moe_forward(x.reshape(-1, x.shape[-1]), w, route).view(x.shape)


@moe.register_fake
def _(x, *args, **kwargs):
    return torch.empty_like(x)


@torch.library.custom_op("dskc::mla_attend", mutates_args=())
def mla_attend(q: torch.Tensor, kv: torch.Tensor, kr: torch.Tensor, mask: torch.Tensor | None, w_uk: torch.Tensor,
               w_uv: torch.Tensor, scale: float) -> torch.Tensor:
    """Absorbed MLA core (dskc.runtime.foreign.mla_attend): q [B, H, S, nope + R] -> [B, S, H * v]."""
    return _mla_attend(q, kv, kr, mask, w_uk, w_uv, scale)


@mla_attend.register_fake
def _(q, kv, kr, mask, w_uk, w_uv, scale):
    b, h, s, _ = q.shape
    return q.new_empty(b, s, h * w_uv.shape[1])
