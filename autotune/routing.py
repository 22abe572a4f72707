"""Realistic MoE routing for tuning (not uniform random): top-k expert ids from the model's own gate on sample
inputs, or recorded top-k ids from a real run. Runs on the CPU; GPU runners take the ids from here.

The routing source is part of the study key (extras ("routing", signature)), so configs tuned on one routing are
never mixed with another's. `expert_rows` turns ids into the per-expert row counts a grouped GEMM sees.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def gate_topk(args, hidden: torch.Tensor, gate_state: dict | None = None, seed: int = 0) -> torch.Tensor:
    """Top-k expert ids [T, k] (int64) from dskc.model's Gate for `args` on `hidden` [T, dim].

    gate_state: the gate's weights ({"weight": [E, dim], "bias": [E]} as in a checkpoint); None draws them at random
    (seeded), which keeps the gate's group limits and bias path but not a trained model's skew: pass real weights
    when they exist.
    """
    from dskc.model.moe import Gate

    if hidden.ndim != 2 or hidden.shape[1] != args.dim:
        raise ValueError(f"hidden must be [T, {args.dim}], got {tuple(hidden.shape)}")
    gate = Gate(args, dtype=torch.float32)
    if gate_state is None:
        g = torch.Generator().manual_seed(seed)
        gate_state = {"weight": torch.randn(args.n_routed_experts, args.dim, generator=g) * args.dim ** -0.5}
        if gate.bias is not None:
            gate_state["bias"] = torch.randn(args.n_routed_experts, generator=g) * 0.1
    gate.load_state_dict({k: v.float() for k, v in gate_state.items()})
    with torch.no_grad():
        _, ids = gate(hidden.float())
    return ids


def recorded_topk(path: str | Path) -> torch.Tensor:
    """Top-k ids recorded from a real run: a .pt file holding a [T, k] integer tensor, or a .safetensors file
    with a "topk_ids" tensor. ValueError on anything else."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        ids = load_file(str(path)).get("topk_ids")
    else:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype.is_floating_point:
        raise ValueError(f"{path}: expected an integer [T, k] top-k id tensor")
    return ids.long()


def expert_rows(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Rows each expert receives ([E] int64): what a grouped GEMM's per-expert M will be."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_experts):
        raise ValueError(f"expert ids outside [0, {n_experts})")
    return torch.bincount(ids.flatten(), minlength=n_experts)


def signature(ids: torch.Tensor, n_experts: int, source: str) -> str:
    """Key part for a routing: source, shape, load imbalance (max/mean rows) and a digest of the ids."""
    rows = expert_rows(ids, n_experts).double()
    imbalance = float(rows.max() / rows.mean()) if rows.sum() > 0 else 0.0
    digest = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:10]
    return f"{source}:T{ids.shape[0]}k{ids.shape[1]}:imb{imbalance:.2f}:{digest}"
