"""Neutral weight bundles: what the kernel modules (and the backend's custom ops) take, whatever model family the
weights came from. Each family's layout function (dskc.capture.families) reads its module's parameters once, at
compile time, and returns one of these, already in the kernels' layout: [gate; up] stacked, experts stacked,
FP8 e4m3 with 128x128 block scales (native, or quantised here with DeepSeek's recipe) or the kernels' dot dtype.
"""
from __future__ import annotations

import dataclasses

import torch

FP8 = torch.float8_e4m3fn


@dataclasses.dataclass
class Dense:
    """One GEMM weight [N, K]: e4m3 with fp32 block scales [ceil(N/128), K/128], or a float dtype (scale None)."""
    weight: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def fp8(self) -> bool:
        return self.scale is not None


@dataclasses.dataclass
class MLPWeights:
    """w2(silu(w1 x) * w3 x): up = [w1; w3] stacked [2I, H] (+ scales [2I/128, H/128]), down = w2 [H, I]."""
    up: Dense
    down: Dense

    @property
    def inter(self) -> int:
        return self.up.weight.shape[0] // 2

    @property
    def fp8(self) -> bool:
        return self.up.fp8


@dataclasses.dataclass
class MoEWeights:
    """Router weight [E, H] fp32 (+ selection bias [E] fp32), routed experts w13 [E, 2I, H] = per expert [w1; w3]
    and w2 [E, H, I] (e4m3 with scales [E, 2I/128, H/128] / [E, H/128, I/128], or the dot dtype, scales None),
    the shared experts as an MLP, and the shared experts' sigmoid gate [1, H] (Qwen2-MoE) or None."""
    gate: torch.Tensor
    gate_bias: torch.Tensor | None
    w13: torch.Tensor
    w13_scale: torch.Tensor | None
    w2: torch.Tensor
    w2_scale: torch.Tensor | None
    shared: MLPWeights | None = None
    shared_gate: torch.Tensor | None = None

    @property
    def fp8(self) -> bool:
        return self.w13_scale is not None


@dataclasses.dataclass
class MLAWeights:
    """wkv_b absorbed: w_uk [H, nope, C] folds into the query, w_uv [H, v, C] into the output (C = kv_lora_rank)."""
    w_uk: torch.Tensor
    w_uv: torch.Tensor


def dense(w: torch.Tensor, scale: torch.Tensor | None, *, quantize: bool, kdtype: torch.dtype) -> Dense:
    """A [N, K] weight for the kernels: native e4m3 (+ scale) kept, float quantised with DeepSeek's 128x128 recipe
    when `quantize`, else cast to `kdtype` (the dot dtype of the compute dtype)."""
    w = w.detach()
    if w.dtype == FP8:
        if scale is None:
            raise ValueError(f"an e4m3 weight {tuple(w.shape)} without its block scale")
        return Dense(w.contiguous(), scale.detach().float().contiguous())
    if quantize:
        from dskc.model import quantize_weight
        q, s = quantize_weight(w.float())
        return Dense(q, s)
    return Dense(w.to(kdtype).contiguous())


def stacked(ws: list, scales: list, *, quantize: bool, kdtype: torch.dtype) -> tuple:
    """Per-expert [N, K] weights -> ([E, N, K], [E, N/128, K/128] or None), each expert as `dense` makes it."""
    parts = [dense(w, s, quantize=quantize, kdtype=kdtype) for w, s in zip(ws, scales)]
    w = torch.stack([p.weight for p in parts]).contiguous()
    s = torch.stack([p.scale for p in parts]).contiguous() if parts[0].fp8 else None
    return w, s


def mlp(gate: Dense, up: Dense, down: Dense) -> MLPWeights:
    """[gate; up] stacked into one GEMM weight (their block scales stack too: gate's rows end on a whole block)."""
    if gate.fp8 and gate.weight.shape[0] % 128:
        raise ValueError(f"FP8 MLP width {gate.weight.shape[0]} is not a multiple of 128")
    w = torch.cat([gate.weight, up.weight]).contiguous()
    s = torch.cat([gate.scale, up.scale]).contiguous() if gate.fp8 else None
    return MLPWeights(Dense(w, s), down)
