"""Rows of the family table for Hugging Face transformers' modules (5.x layouts, and the 4.x ones still in
checkpoints' remote code): DeepSeek-V2 / V3, Qwen2-MoE / Qwen3-MoE and Mixtral MoE blocks, SwiGLU MLPs, and
DeepSeek-V2 / V3 multi-head latent attention. dskc never imports transformers: rows match on what a module holds.

Routers (what each row reads; see the rows' functions for the exact attribute names):
  DeepSeek-V3   sigmoid scores, e_score_correction_bias for selection, group-limited top-k (groups scored by their
                top-2 sum), weights renormalised when norm_topk_prob, times routed_scaling_factor
  DeepSeek-V2   softmax, topk_method greedy or group_limited_greedy (groups scored by their max), times
                routed_scaling_factor, never renormalised (transformers 5 ignores norm_topk_prob there)
  Qwen2/3-MoE   softmax top-k, renormalised when norm_topk_prob; Qwen2's shared expert scaled by
                sigmoid(shared_expert_gate(x))
  Mixtral       softmax top-k, always renormalised
Experts: transformers 5's stacked tensors (gate_up_proj [E, 2I, H] + down_proj [E, H, I], or transposed), or
transformers 4's ModuleList of per-expert MLPs (gate_proj / up_proj / down_proj, or w1 / w3 / w2).
"""
from __future__ import annotations

import torch.nn as nn

from dskc.capture.family import ExpertsSpec, Family, Match, MLASpec, MLPSpec, MoESpec, Unservable, get, has
from dskc.capture.family_dskc import dtype_name, read_mlp
from dskc.ir.graph import Op

MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))   # (gate, up, down) children of an MLP
SILU = ("SiLU", "SiLUActivation")                                         # nn.SiLU, transformers' ACT2FN["silu"]


def _act(m) -> str | None:
    """Why the module's activation is not SiLU (None when it is)."""
    act = getattr(m, "act_fn", None) or getattr(m, "act", None)
    if act is None or type(act).__name__ in SILU:
        return None
    return f"activation {type(act).__name__}: dskc's SwiGLU epilogue is SiLU"


def read_swiglu(m: nn.Module) -> MLPSpec:
    names = next(n for n in MLP_NAMES if all(isinstance(getattr(m, c, None), nn.Module) for c in n))
    why = _act(m)
    if why:
        raise Unservable(why)
    return read_mlp(m, names)


def _fused_experts(ex) -> tuple[ExpertsSpec, int, int, int, str]:
    """transformers 5's stacked experts: (spec, E, I, H, dtype); its decorator's flags say how they lie."""
    for flag, bad in (("has_bias", "expert biases"), ("has_post_expert_norm", "a norm after each expert")):
        if getattr(ex, flag, False):
            raise Unservable(f"{bad}: not in the grouped GEMM's epilogues")
    if not getattr(ex, "has_gate", True):
        raise Unservable("experts without a gate projection (not SwiGLU)")
    if not getattr(ex, "is_concatenated", True):
        raise Unservable("gate and up rows interleaved in gate_up_proj: dskc stacks [gate; up]")
    why = _act(ex)
    if why:
        raise Unservable(why)
    t = bool(getattr(ex, "is_transposed", False))
    gu, dn = ex.gate_up_proj, ex.down_proj
    if dtype_name(gu) not in ("bf16", "fp16", "fp32") or dn.dtype != gu.dtype:
        raise Unservable(f"{gu.dtype} / {dn.dtype} stacked experts: dskc lays out float experts (FP8 ones quantised by "
                         "its own recipe when asked)")
    e, (two_i, h) = gu.shape[0], (gu.shape[2], gu.shape[1]) if t else gu.shape[1:]
    if two_i % 2 or tuple(dn.shape) != ((e, two_i // 2, h) if t else (e, h, two_i // 2)):
        raise Unservable(f"gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} do not form SwiGLU experts")
    return ExpertsSpec("fused", "experts", ("gate_up_proj", "down_proj"), t), e, two_i // 2, h, dtype_name(gu)


def _list_experts(ex) -> tuple[ExpertsSpec, int, int, int, str]:
    mods = list(ex)
    if not mods or any(type(x) is not type(mods[0]) for x in mods):
        raise Unservable("experts of different classes")
    spec = read_swiglu(mods[0])
    return ExpertsSpec("list", "experts", spec.names), len(mods), spec.inter, spec.dim, spec.dtype


def read_experts(m) -> tuple[ExpertsSpec, int, int, int, str]:
    ex = m.experts
    if isinstance(ex, nn.ModuleList):
        return _list_experts(ex)
    if getattr(getattr(ex, "gate_up_proj", None), "dim", lambda: 0)() == 3 and has(ex, "down_proj"):
        return _fused_experts(ex)
    raise Unservable(f"experts module {type(ex).__name__}: neither stacked gate_up_proj / down_proj tensors nor a "
                     "ModuleList of MLPs")


def _shared(m, child: str) -> tuple[str | None, tuple, int]:
    se = getattr(m, child, None)
    if se is None:
        return None, (), 0
    spec = read_swiglu(se)
    return child, spec.names, spec.inter


def _moe(m, *, top_k, score_func, route_scale, renorm, n_groups=1, topk_groups=1, bias=None, gate="gate.weight",
         shared="shared_experts", shared_gate=None) -> MoESpec:
    ex, e, inter, dim, dtype = read_experts(m)
    s_path, s_names, s_inter = _shared(m, shared)
    if n_groups > 1 and (e % n_groups or topk_groups * (e // n_groups) < top_k):
        raise Unservable(f"group-limited routing over {e} experts in {n_groups} groups keeping {topk_groups} "
                         f"cannot pick top {top_k}")
    return MoESpec(dim, inter, e, int(top_k), int(n_groups), int(topk_groups), score_func, float(route_scale),
                   bool(renorm), gate, bias, ex, s_path, s_names, s_inter, shared_gate, dtype)


def read_deepseek_v3(m) -> MoESpec:
    g = m.gate
    return _moe(m, top_k=get(g, "top_k"), score_func="sigmoid", route_scale=get(g, "routed_scaling_factor"),
                renorm=get(g, "norm_topk_prob"), n_groups=get(g, "num_group|n_group"),
                topk_groups=get(g, "topk_group"), bias="gate.e_score_correction_bias")


def read_deepseek_v2(m) -> MoESpec:
    g = m.gate
    method = get(g, "topk_method")
    if method not in ("greedy", "group_limited_greedy"):
        raise Unservable(f"router topk_method {method!r}: dskc routes greedy and group_limited_greedy")
    grouped = method == "group_limited_greedy"
    return _moe(m, top_k=get(g, "top_k"), score_func="softmax", route_scale=get(g, "routed_scaling_factor"),
                renorm=False, n_groups=get(g, "num_group|n_group") if grouped else 1,
                topk_groups=get(g, "topk_group") if grouped else 1)


def read_qwen_moe(m) -> MoESpec:
    """Qwen2-MoE (shared expert behind a sigmoid gate) and Qwen3-MoE: softmax top-k, norm_topk_prob."""
    g = m.gate
    return _moe(m, top_k=get(g, "top_k"), score_func="softmax", route_scale=1.0, renorm=get(g, "norm_topk_prob"),
                shared="shared_expert", shared_gate="shared_expert_gate" if has(m, "shared_expert_gate") else None)


def read_mixtral(m) -> MoESpec:
    return _moe(m, top_k=get(m, "gate.top_k|top_k"), score_func="softmax", route_scale=1.0, renorm=True)


def read_qwen_moe_4(m) -> MoESpec:
    """transformers 4's Qwen2/3-MoE blocks: the gate is a plain nn.Linear, top_k / norm_topk_prob on the block."""
    return _moe(m, top_k=m.top_k, score_func="softmax", route_scale=1.0, renorm=m.norm_topk_prob,
                shared="shared_expert", shared_gate="shared_expert_gate" if has(m, "shared_expert_gate") else None)


def read_unknown_router(m) -> MoESpec:
    raise Unservable(f"router {type(m.gate).__name__} of {type(m).__name__}: no row of dskc's family table "
                     "describes its routing")


def read_mla(m, rope: str) -> MLASpec:
    c, r = get(m, "kv_lora_rank"), get(m, "qk_rope_head_dim")
    if (c, r) != (512, 64):
        raise Unservable(f"the MLA kernels serve kv_lora_rank 512 + rope 64 (576), got {c} + {r}")
    q_lora = getattr(m, "q_lora_rank", None)
    names = dict(q="q_proj") if q_lora is None else dict(q_a="q_a_proj", q_norm="q_a_layernorm", q_b="q_b_proj")
    names.update(kv_a="kv_a_proj_with_mqa", kv_norm="kv_a_layernorm", kv_b="kv_b_proj", o="o_proj")
    for key in ("q", "q_a", "q_b", "kv_a", "kv_b", "o"):
        if key in names and getattr(get(m, names[key]), "bias", None) is not None:
            raise Unservable(f"{names[key]} has a bias (attention_bias): the GEMM templates have none")
    heads = get(m, "num_heads")
    if not 1 <= heads <= 128:
        raise Unservable(f"{heads} heads: mla_decode serves 1..128")
    return MLASpec(heads, q_lora or 0, c, r, get(m, "qk_nope_head_dim"), get(m, "v_head_dim"), names, rope,
                   float(get(m, "scaling")), "naive", dtype_name(get(m, names["kv_b"]).weight))


def read_mla_v3(m) -> MLASpec:
    return read_mla(m, "interleave" if m.config.rope_interleave else "half")


def read_mla_v2(m) -> MLASpec:
    return read_mla(m, "complex")


_MOE = dict(children=("gate", "experts"))
_MLA = Match(children=("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"),
             attrs=("num_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "scaling"))
_MOE_COVERS = ("gate", "experts", "shared_experts", "shared_expert", "shared_expert_gate")
ROWS = (
    Family("transformers.deepseek_v3.moe", Op.MOE, Match(
        **_MOE, params=(("gate.weight", 2), ("gate.e_score_correction_bias", 1)),
        attrs=("gate.top_k", "gate.num_group|gate.n_group", "gate.topk_group", "gate.norm_topk_prob",
               "gate.routed_scaling_factor")), read_deepseek_v3, covers=_MOE_COVERS),
    Family("transformers.deepseek_v2.moe", Op.MOE, Match(
        **_MOE, params=(("gate.weight", 2),),
        attrs=("gate.top_k", "gate.topk_method", "gate.routed_scaling_factor")), read_deepseek_v2,
        covers=_MOE_COVERS),
    Family("transformers.qwen2_moe.moe", Op.MOE, Match(
        children=_MOE["children"] + ("shared_expert",), params=(("gate.weight", 2),),
        attrs=("gate.top_k", "gate.norm_topk_prob")), read_qwen_moe, covers=_MOE_COVERS),
    Family("transformers.qwen3_moe.moe", Op.MOE, Match(
        **_MOE, params=(("gate.weight", 2),), attrs=("gate.top_k", "gate.norm_topk_prob"),
        absent=("shared_expert", "shared_experts")), read_qwen_moe, covers=_MOE_COVERS),
    Family("transformers.mixtral.moe", Op.MOE, Match(
        **_MOE, params=(("gate.weight", 2),), attrs=("gate.top_k",),
        absent=("gate.norm_topk_prob", "gate.topk_method", "gate.e_score_correction_bias", "shared_expert",
                "shared_experts")), read_mixtral, covers=_MOE_COVERS),
    Family("transformers4.qwen_moe.moe", Op.MOE, Match(
        **_MOE, params=(("gate.weight", 2),), attrs=("top_k", "norm_topk_prob"), lists=("experts",)),
        read_qwen_moe_4, covers=_MOE_COVERS),
    Family("transformers4.mixtral.moe", Op.MOE, Match(
        **_MOE, params=(("gate.weight", 2),), attrs=("top_k",), lists=("experts",),
        absent=("norm_topk_prob", "shared_expert", "shared_experts", "gate.top_k")), read_mixtral,
        covers=_MOE_COVERS),
    Family("moe.unknown_router", Op.MOE, Match(**_MOE), read_unknown_router, covers=_MOE_COVERS),
    Family("transformers.swiglu_mlp", Op.MLP, Match(children=("gate_proj", "up_proj", "down_proj"), attrs=("act_fn",)),
           read_swiglu, covers=("gate_proj", "up_proj", "down_proj", "act_fn")),
    Family("transformers4.swiglu_mlp(w1/w3/w2)", Op.MLP, Match(children=("w1", "w2", "w3"), attrs=("act_fn",)),
           read_swiglu, covers=("w1", "w2", "w3", "act_fn")),
    Family("transformers.deepseek_v3.mla", Op.MLA, Match(
        children=_MLA.children, attrs=_MLA.attrs + ("config.rope_interleave",)), read_mla_v3, covers=("kv_b_proj",)),
    Family("transformers.deepseek_v2.mla", Op.MLA, Match(
        children=_MLA.children, attrs=_MLA.attrs, absent=("config.rope_interleave",)), read_mla_v2,
        covers=("kv_b_proj",)),
)
