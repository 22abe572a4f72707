"""ModelArgs: the DeepSeek-V3 inference hyper-parameters, named configs and their validation.

Field names and defaults are those of DeepSeek-V3's inference `ModelArgs` (deepseek-ai/DeepSeek-V3,
inference/model.py), plus `gate_bias`, `yarn`, `rope_attn_factor` and `norm_eps`. Named configs live as JSON files
in model/configs/ (DeepSeek's own config JSON format: a subset of the fields, the rest take the defaults; each
states `yarn` explicitly). Hugging Face config.json files map through model/hf.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

FP8_BLOCK = 128  # FP8 weights carry one fp32 scale per 128x128 block
CONFIG_DIR = Path(__file__).with_name("configs")

_POSITIVE = ("max_batch_size", "max_seq_len", "vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers",
             "n_heads", "n_routed_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups",
             "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "original_seq_len")
_NON_NEGATIVE = ("n_dense_layers", "n_shared_experts", "q_lora_rank")
_FLOATS = ("route_scale", "rope_theta", "rope_factor", "mscale", "beta_fast", "beta_slow", "rope_attn_factor",
           "norm_eps")


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a DeepSeek-V2/V3-style MoE + MLA transformer (frozen; validated on creation).

    gate_bias: None follows the reference (a gate bias only when dim == 7168); True/False force it, so small
    configs can exercise the bias (top-2-sum group score) routing path.
    dtype: "bf16" (bfloat16 Linear weights) or "fp8" (e4m3 weights with fp32 128x128 block scales).
    scale_fmt: None or "ue8m0" (power-of-two scales, DeepSeek-V3.1); only affects quantize_weight here.
    yarn: whether YaRN applies (frequencies by rope_factor / original_seq_len / beta_fast / beta_slow, softmax scale
    times mscale-term^2). The config decides, never the cache size: max_seq_len only sizes the KV cache and the
    rope table. (DeepSeek's reference switches YaRN on when max_seq_len > original_seq_len; its configs at their
    default max_seq_len have it on, hence the default, and the named configs state it.)
    rope_attn_factor: multiplies the YaRN cos/sin table, so the rope part of q.k by its square (transformers'
    `attention_factor`, from rope_scaling's mscale / mscale_all_dim); 1.0 in DeepSeek's reference.
    norm_eps: every RMSNorm's epsilon (rms_norm_eps in Hugging Face configs).
    """
    max_batch_size: int = 8
    max_seq_len: int = 4096 * 4
    dtype: str = "bf16"
    scale_fmt: str | None = None
    vocab_size: int = 102400
    dim: int = 2048
    inter_dim: int = 10944
    moe_inter_dim: int = 1408
    n_layers: int = 27
    n_dense_layers: int = 1
    n_heads: int = 16
    # moe
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    n_activated_experts: int = 6
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: str = "softmax"
    route_scale: float = 1.0
    # mla
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # yarn
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # dskc extensions (Hugging Face configs express these)
    gate_bias: bool | None = None
    yarn: bool = True
    rope_attn_factor: float = 1.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_types(self)
        _check_values(self)
        if self.dtype == "fp8":
            _check_fp8(self)

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_gate_bias(self) -> bool:
        """Whether MoE gates carry the selection bias (reference rule: only when dim == 7168)."""
        return self.dim == 7168 if self.gate_bias is None else self.gate_bias

    @property
    def yarn_active(self) -> bool:
        """Whether YaRN applies: the `yarn` field alone (max_seq_len plays no part)."""
        return self.yarn

    @property
    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5, times m^2 under YaRN, m = 0.1 * mscale * ln(rope_factor) + 1 (1 when
        rope_factor <= 1, as transformers' yarn_get_mscale; mscale 0 gives 1 too)."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn and self.rope_factor > 1:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    def linear_input_widths(self) -> dict[str, int]:
        """Input width of every Linear that holds FP8 weights when dtype == "fp8" (the head never does)."""
        widths = {"wq_a/wkv_a/w1/w3 (dim)": self.dim, "wkv_b (kv_lora_rank)": self.kv_lora_rank,
                  "wo (n_heads * v_head_dim)": self.n_heads * self.v_head_dim,
                  "dense w2 (inter_dim)": self.inter_dim, "expert w2 (moe_inter_dim)": self.moe_inter_dim,
                  "shared w2 (n_shared_experts * moe_inter_dim)": self.n_shared_experts * self.moe_inter_dim}
        if self.q_lora_rank > 0:
            widths["wq_b (q_lora_rank)"] = self.q_lora_rank
        return widths

    # ---- JSON ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "dict") -> "ModelArgs":
        """Build from a mapping of field names; unknown keys raise ValueError naming them and the source."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{source}: expected a JSON object of ModelArgs fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ModelArgs keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        """Load DeepSeek's config JSON format (e.g. inference/configs/config_671B.json) or ours."""
        path = Path(path)
        with path.open() as f:
            return cls.from_dict(json.load(f), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _check_types(a: ModelArgs) -> None:
    for name in _POSITIVE + _NON_NEGATIVE:
        v = getattr(a, name)
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"ModelArgs.{name} must be an int, got {v!r}")
    for name in _FLOATS:
        v = getattr(a, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise TypeError(f"ModelArgs.{name} must be a finite number, got {v!r}")
    if a.gate_bias is not None and not isinstance(a.gate_bias, bool):
        raise TypeError(f"ModelArgs.gate_bias must be None, True or False, got {a.gate_bias!r}")
    if not isinstance(a.yarn, bool):
        raise TypeError(f"ModelArgs.yarn must be True or False, got {a.yarn!r}")


def _check_values(a: ModelArgs) -> None:
    for name in _POSITIVE:
        if getattr(a, name) <= 0:
            raise ValueError(f"ModelArgs.{name} must be > 0, got {getattr(a, name)}")
    for name in _NON_NEGATIVE:
        if getattr(a, name) < 0:
            raise ValueError(f"ModelArgs.{name} must be >= 0, got {getattr(a, name)}")
    if a.dtype not in ("bf16", "fp8"):
        raise ValueError(f"ModelArgs.dtype must be 'bf16' or 'fp8', got {a.dtype!r}")
    if a.scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"ModelArgs.scale_fmt must be None or 'ue8m0', got {a.scale_fmt!r}")
    if a.score_func not in ("softmax", "sigmoid"):
        raise ValueError(f"ModelArgs.score_func must be 'softmax' or 'sigmoid', got {a.score_func!r}")
    if a.n_dense_layers > a.n_layers:
        raise ValueError(f"n_dense_layers ({a.n_dense_layers}) > n_layers ({a.n_layers})")
    if a.qk_rope_head_dim % 2:
        raise ValueError(f"qk_rope_head_dim must be even (rotary pairs), got {a.qk_rope_head_dim}")
    if a.rope_factor <= 0 or a.rope_theta <= 1:
        raise ValueError(f"need rope_factor > 0 and rope_theta > 1, got {a.rope_factor}, {a.rope_theta}")
    for name in ("beta_fast", "beta_slow", "mscale"):
        if getattr(a, name) < 0:
            raise ValueError(f"ModelArgs.{name} must be >= 0, got {getattr(a, name)}")
    if a.rope_attn_factor <= 0 or a.norm_eps <= 0:
        raise ValueError(f"need rope_attn_factor > 0 and norm_eps > 0, got {a.rope_attn_factor}, {a.norm_eps}")
    _check_routing(a)


def _check_routing(a: ModelArgs) -> None:
    if a.n_activated_experts > a.n_routed_experts:
        raise ValueError(f"n_activated_experts ({a.n_activated_experts}) > n_routed_experts "
                         f"({a.n_routed_experts})")
    if a.n_routed_experts % a.n_expert_groups:
        raise ValueError(f"n_routed_experts ({a.n_routed_experts}) must be divisible by n_expert_groups "
                         f"({a.n_expert_groups})")
    if a.n_limited_groups > a.n_expert_groups:
        raise ValueError(f"n_limited_groups ({a.n_limited_groups}) > n_expert_groups ({a.n_expert_groups})")
    per_group = a.n_routed_experts // a.n_expert_groups
    if a.n_limited_groups * per_group < a.n_activated_experts:
        raise ValueError(f"n_limited_groups * (n_routed_experts / n_expert_groups) = {a.n_limited_groups} * "
                         f"{per_group} < n_activated_experts ({a.n_activated_experts}): too few experts to choose")
    if a.has_gate_bias and a.n_expert_groups > 1 and per_group < 2:
        raise ValueError("the biased group score sums the top-2 experts of a group: need >= 2 experts per group, "
                         f"got {per_group}")


def _check_fp8(a: ModelArgs) -> None:
    bad = {k: v for k, v in a.linear_input_widths().items() if v % FP8_BLOCK}
    if bad:
        raise ValueError(f"dtype 'fp8' needs every Linear input width to be a multiple of {FP8_BLOCK}; "
                         f"these are not: {bad}")


def _load_named_configs() -> Mapping[str, ModelArgs]:
    configs = {p.stem: ModelArgs.from_json(p) for p in sorted(CONFIG_DIR.glob("*.json"))}
    return types.MappingProxyType(configs)


CONFIGS: Mapping[str, ModelArgs] = _load_named_configs()  # read-only: name -> ModelArgs


def get_config(name: str, **overrides: Any) -> ModelArgs:
    """The named config (tiny, deepseek-v2-lite, deepseek-v2, deepseek-v3) with optional field overrides."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {sorted(CONFIGS)}")
    args = CONFIGS[name]
    if overrides:
        known = {f.name for f in dataclasses.fields(ModelArgs)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ModelArgs fields in overrides: {unknown}")
        args = dataclasses.replace(args, **overrides)
    return args
