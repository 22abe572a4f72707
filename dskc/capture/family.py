"""The machinery of the family table (dskc.capture.families): a row says, as data, how to recognise a module
(class names, child modules, tensors and their ranks, attributes present or absent), how to read its semantics
(a function returning a Spec, or raising Unservable with the reason) and which children the region folds in. The
spec names where every weight lies (children, stacked or per-expert experts, transposed or not), and that is all
dskc.capture.layouts needs to lay the weights out for the kernels, once, at compile time. One walk
(dskc.capture.regions) and the backend (dskc.backend) read the same rows.

Dotted names reach into children ("gate.top_k"); "a|b" takes the first that exists (attribute names that moved
between transformers versions: "gate.num_group|gate.n_group").
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch.nn as nn

from dskc.ir.graph import Op

_MISSING = object()


class Unservable(ValueError):
    """A module of a known family with a setting dskc's kernels do not serve (the reason is the message)."""


def get(m, dotted: str, default=_MISSING):
    """m.<dotted>, the first of "a|b" alternatives that exists; `default` (or AttributeError) when none does."""
    for alt in dotted.split("|"):
        obj = m
        for part in alt.split("."):
            obj = getattr(obj, part, _MISSING)
            if obj is _MISSING:
                break
        if obj is not _MISSING and obj is not None:
            return obj
    if default is _MISSING:
        raise AttributeError(f"{type(m).__name__} has none of {dotted}")
    return default


def has(m, dotted: str) -> bool:
    return get(m, dotted, None) is not None


@dataclasses.dataclass(frozen=True)
class Match:
    """What a module must hold for a row to apply (all listed conditions)."""
    types: tuple = ()        # exact class names (empty: any class)
    children: tuple = ()     # dotted child modules that must exist
    params: tuple = ()       # (dotted tensor, ndim): parameters / buffers that must exist with that rank
    attrs: tuple = ()        # dotted attributes that must exist (config facts the semantics read)
    absent: tuple = ()       # dotted names that must not exist (or be None): tell look-alike families apart
    leaf: bool = False       # no child modules
    lists: tuple = ()        # dotted children that must be an nn.ModuleList

    def test(self, m: nn.Module) -> bool:
        if self.types and type(m).__name__ not in self.types:
            return False
        if self.leaf and next(iter(m.children()), None) is not None:
            return False
        if not all(isinstance(get(m, c, None), nn.Module) for c in self.children):
            return False
        if not all(isinstance(get(m, c, None), nn.ModuleList) for c in self.lists):
            return False
        for name, ndim in self.params:
            t = get(m, name, None)
            if getattr(t, "dim", None) is None or t.dim() != ndim:
                return False
        return all(has(m, a) for a in self.attrs) and not any(has(m, a) for a in self.absent)


@dataclasses.dataclass(frozen=True)
class Family:
    """One row of the table."""
    name: str                                    # "transformers.deepseek_v3.moe", "dskc.mla", ...
    kind: Op                                     # the IR op of its regions
    match: Match
    read: Callable                               # module -> Spec; raises Unservable(reason)
    covers: tuple = ()                           # children folded into the region (never regions of their own)


def classify(m: nn.Module, table) -> tuple[Family, object] | None:
    """(row, spec) of the first row matching `m`, spec an Unservable when the row cannot serve it; None if no row
    matches."""
    for fam in table:
        if fam.match.test(m):
            try:
                return fam, fam.read(m)
            except Unservable as exc:
                return fam, exc
    return None


# ------------------------------------------------------------------ specs: a region's semantics, family-neutral

@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """w2(act(w1 x) * w3 x); names: the (gate, up, down) children."""
    dim: int
    inter: int
    names: tuple
    dtype: str


@dataclasses.dataclass(frozen=True)
class ExpertsSpec:
    """Routed experts: "fused" (3-D gate_up / down tensors of `path`; transposed: [E, H, 2I] / [E, I, H]) or "list"
    (a ModuleList of MLPs whose (gate, up, down) children are `names`)."""
    layout: str
    path: str
    names: tuple
    transposed: bool = False


@dataclasses.dataclass(frozen=True)
class MoESpec:
    dim: int
    inter: int
    n_experts: int
    top_k: int
    n_groups: int
    topk_groups: int
    score_func: str                 # "softmax" | "sigmoid"
    route_scale: float
    renorm: bool                    # top-k weights divided by their sum
    gate: str                       # the router's [E, H] weight ("gate.weight")
    gate_bias: str | None           # its selection bias ("gate.e_score_correction_bias"), or None
    experts: ExpertsSpec
    shared: str | None = None       # child path of the shared experts' MLP
    shared_names: tuple = ()
    shared_inter: int = 0
    shared_gate: str | None = None  # child path of the shared experts' sigmoid gate (Qwen2-MoE) [1, H]
    dtype: str = "bf16"


@dataclasses.dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention. names: the projections (q or q_a / q_norm / q_b, kv_a, kv_norm, kv_b, o);
    rope: how its query / key rotation is laid out ("dskc": the module runs itself, "interleave", "half",
    "complex"); scale: softmax scale."""
    heads: int
    q_lora_rank: int
    kv_lora_rank: int
    rope_dim: int
    nope: int
    v_dim: int
    names: dict
    rope: str
    scale: float
    attn_impl: str = "naive"
    dtype: str = "bf16"


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    out_features: int
    in_features: int
    dtype: str                      # "fp8" | "bf16" | "fp16" | "fp32"


@dataclasses.dataclass(frozen=True)
class PlainSpec:
    """A region the IR keeps as a node with only a shape (RMSNorm, a transformer block)."""
    shape: tuple
    dtype: str = "bf16"
