"""Feed-forward layers: the dense SwiGLU MLP, the routing Gate and the Mixture-of-Experts layer."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .args import ModelArgs
from .parallel import TP, Linear


class MLP(nn.Module):
    """w2(silu(w1 x) * w3 x). parallel=True: w1/w3 column-split, w2 row-split (+ all-reduce); False: a routed
    expert, replicated weights (experts are split by index range instead)."""

    def __init__(self, dim: int, inter_dim: int, *, dtype: torch.dtype, fp8: bool, parallel: bool,
                 tp: TP = TP(), device=None):
        super().__init__()
        col, row = ("column", "row") if parallel else ("none", "none")
        lin = dict(dtype=dtype, fp8=fp8, tp=tp, device=device)
        self.w1 = Linear(dim, inter_dim, split=col, **lin)
        self.w2 = Linear(inter_dim, dim, split=row, **lin)
        self.w3 = Linear(dim, inter_dim, split=col, **lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Routes each token to n_activated_experts experts; returns (weights [T, k] in x's dtype, indices [T, k]).

    1. scores = softmax or sigmoid of x @ W^T, computed in float32.
    2. Selection uses scores + bias (bias only when args.has_gate_bias); the bias never enters the weights.
    3. With n_expert_groups > 1, each group is scored by the sum of its top-2 selection scores when a bias
       exists, else by its max; only the n_limited_groups best groups stay eligible (others set to -inf).
    4. indices = top-k of the selection scores; weights = the UNBIASED scores at those indices, normalised to
       sum 1 under sigmoid, then times route_scale.
    Ties: groups and experts are picked with torch.topk (as the reference), which does not specify which of
    exactly equal values wins: on the CPU, topk([1, 2, 1, 2, 1, 2], 3) returned indices [3, 5, 1], neither the
    lowest nor the highest first. Ties need exactly equal float32 scores (measure zero for real inputs, but
    easy to build by hand: all-zero logits); callers that compare routings must avoid them or compare sets of
    equal-scored experts.
    """

    def __init__(self, args: ModelArgs, *, dtype: torch.dtype, device=None):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = args.n_activated_experts, args.n_expert_groups, args.n_limited_groups
        self.score_func, self.route_scale = args.score_func, args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=dtype, device=device),
                                   requires_grad=False)
        if args.has_gate_bias:  # fp32 like the checkpoints' e_score_correction_bias
            self.bias = nn.Parameter(torch.empty(args.n_routed_experts, dtype=torch.float32, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        select = scores if self.bias is None else scores + self.bias
        if self.n_groups > 1:
            grouped = select.view(x.shape[0], self.n_groups, -1)
            if self.bias is None:
                group_scores = grouped.amax(dim=-1)
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            select = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = select.topk(self.topk, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).to(x.dtype), indices


class MoE(nn.Module):
    """Routed experts (this rank's index range; others are None, as in the reference) + shared experts.

    experts.{i} keeps its global index i, so state_dict names match the unsplit model's.
    """

    def __init__(self, args: ModelArgs, *, dtype: torch.dtype, tp: TP = TP(), device=None):
        super().__init__()
        fp8 = args.dtype == "fp8"
        self.dim, self.tp = args.dim, tp
        n_local = tp.split(args.n_routed_experts, "n_routed_experts")
        self.first, self.last = tp.rank * n_local, (tp.rank + 1) * n_local
        self.gate = Gate(args, dtype=dtype, device=device)
        self.experts = nn.ModuleList([
            MLP(args.dim, args.moe_inter_dim, dtype=dtype, fp8=fp8, parallel=False, device=device)
            if self.first <= i < self.last else None for i in range(args.n_routed_experts)])
        self.shared_experts = None
        if args.n_shared_experts > 0:
            self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, dtype=dtype, fp8=fp8,
                                      parallel=True, tp=tp, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)
        weights, indices = self.gate(x)
        y = torch.zeros_like(x)
        for i in range(self.first, self.last):  # experts with no tokens run on an empty batch
            token, slot = torch.where(indices == i)
            y.index_add_(0, token, self.experts[i](x[token]) * weights[token, slot, None])
        y = self.tp.all_reduce(y)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)
