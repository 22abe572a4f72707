"""Tensor and expert parallelism as DeepSeek-V3's reference does it, plus the Linear and Embedding it needs.

Column-parallel Linears (wq, wq_b, wkv_b, MLP w1/w3, head) split their outputs across ranks; row-parallel ones
(wo, MLP w2) split their inputs and all-reduce the result; the embedding splits the vocabulary and all-reduces;
routed experts are split by index range (rank r owns [r*E/ws, (r+1)*E/ws)) and their sum is all-reduced; the
head's logits are all-gathered. World size and rank come from torch.distributed when it is initialised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .args import FP8_BLOCK, ModelArgs
from .fp8 import FP8_DTYPE, act_quant_dequant, scale_shape, weight_dequant

COLUMN_SPLIT = ("wq", "wq_b", "wkv_b", "w1", "w3", "embed", "head")  # dim 0 of weight/scale is split
ROW_SPLIT = ("wo", "w2")                                              # dim 1 of weight/scale is split


@dataclass(frozen=True)
class TP:
    """This process's place in the tensor-parallel group (world_size 1 = no communication)."""
    world_size: int = 1
    rank: int = 0

    @staticmethod
    def from_dist() -> "TP":
        if dist.is_available() and dist.is_initialized():
            return TP(dist.get_world_size(), dist.get_rank())
        return TP()

    def split(self, n: int, what: str) -> int:
        if n % self.world_size:
            raise ValueError(f"{what} ({n}) must be divisible by the world size ({self.world_size})")
        return n // self.world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dimension (rank order)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


class Linear(nn.Module):
    """y = x @ W^T (no bias). W is `dtype`, or e4m3 with an fp32 `scale` [ceil(out/128), ceil(in/128)] when fp8.

    split: "none" (replicated), "column" (out_features split across ranks) or "row" (in_features split,
    output all-reduced). out_features / in_features are the full, unsplit sizes.
    quantize_activations (FP8 weights only; set by Transformer's gemm_impl="fp8"): round x through 1x128 e4m3
    first, as the reference's fp8 GEMM path (act_quant + fp8_gemm) does; the default bf16 path does not.
    """
    quantize_activations = False

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype, fp8: bool = False,
                 split: str = "none", tp: TP = TP(), device=None):
        super().__init__()
        if split not in ("none", "column", "row"):
            raise ValueError(f"split must be 'none', 'column' or 'row', got {split!r}")
        if split == "column":
            out_features = tp.split(out_features, "column-parallel out_features")
        if split == "row":
            in_features = tp.split(in_features, "row-parallel in_features")
        self.in_features, self.out_features, self.split, self.tp = in_features, out_features, split, tp
        self.compute_dtype = dtype
        wdtype = FP8_DTYPE if fp8 else dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=wdtype, device=device),
                                   requires_grad=False)
        if fp8:
            self.scale = nn.Parameter(torch.empty(scale_shape(out_features, in_features), dtype=torch.float32,
                                                  device=device), requires_grad=False)
        else:
            self.register_parameter("scale", None)

    def dense_weight(self) -> torch.Tensor:
        """The weight in the compute dtype (FP8 weights dequantized exactly, as the reference's bf16 GEMM path)."""
        if self.scale is None:
            return self.weight
        return weight_dequant(self.weight, self.scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_activations and self.scale is not None:
            x = act_quant_dequant(x)
        y = F.linear(x, self.dense_weight())
        return self.tp.all_reduce(y) if self.split == "row" else y


class ParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across ranks (rows outside this rank's range give 0)."""

    def __init__(self, vocab_size: int, dim: int, *, dtype: torch.dtype, tp: TP = TP(), device=None):
        super().__init__()
        self.tp = tp
        self.part = tp.split(vocab_size, "vocab_size")
        self.start = tp.rank * self.part
        self.weight = nn.Parameter(torch.empty(self.part, dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.start
        outside = (local < 0) | (local >= self.part)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(y)


def check_parallel(args: ModelArgs, tp: TP) -> None:
    """Raise ValueError when `args` cannot be split over tp.world_size ranks (divisibility, FP8 blocks)."""
    ws = tp.world_size
    if not 0 <= tp.rank < ws:
        raise ValueError(f"rank {tp.rank} outside world size {ws}")
    if ws == 1:
        return
    shared = args.n_shared_experts * args.moe_inter_dim
    sizes = {"n_heads": args.n_heads, "vocab_size": args.vocab_size, "inter_dim": args.inter_dim,
             "n_routed_experts": args.n_routed_experts, "n_shared_experts * moe_inter_dim": shared}
    for name, n in sizes.items():
        tp.split(n, name)
    if args.dtype == "fp8":
        per_rank = {"wq_b/wq out": args.n_heads * args.qk_head_dim // ws,
                    "wkv_b out": args.n_heads * (args.qk_nope_head_dim + args.v_head_dim) // ws,
                    "wo in": args.n_heads * args.v_head_dim // ws, "dense w1/w3 out, w2 in": args.inter_dim // ws,
                    "shared w1/w3 out, w2 in": shared // ws}
        bad = {k: v for k, v in per_rank.items() if v % FP8_BLOCK}
        if bad:
            raise ValueError(f"fp8 weights split over {ws} ranks need per-rank widths that are multiples of "
                             f"{FP8_BLOCK} (whole scale blocks); these are not: {bad}")


def split_dim(name: str) -> int | None:
    """The dimension of state_dict tensor `name` that tensor parallelism splits (0, 1), or None (replicated).
    Routed experts are split by index instead (see expert_index)."""
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    return 0 if module in COLUMN_SPLIT else 1 if module in ROW_SPLIT else None


def expert_index(name: str) -> int | None:
    """The routed-expert index in a state_dict name (`layers.3.ffn.experts.17.w1.weight` -> 17), else None."""
    parts = name.split(".")
    return int(parts[parts.index("experts") + 1]) if "experts" in parts else None


def shard_state_dict(state: dict[str, torch.Tensor], args: ModelArgs, tp: TP) -> dict[str, torch.Tensor]:
    """Cut a world-size-1 state_dict (our names) down to rank tp.rank's part, as DeepSeek's convert.py does."""
    check_parallel(args, tp)
    if tp.world_size == 1:
        return dict(state)
    n_local = args.n_routed_experts // tp.world_size
    first, last = tp.rank * n_local, (tp.rank + 1) * n_local
    out = {}
    for name, t in state.items():
        expert = expert_index(name)
        if expert is not None:  # routed expert: keep only this rank's index range
            if first <= expert < last:
                out[name] = t
            continue
        dim = split_dim(name)
        if dim is None:
            out[name] = t
        else:
            size = tp.split(t.shape[dim], f"{name} dim {dim}")
            out[name] = t.narrow(dim, tp.rank * size, size).contiguous()
    return out
