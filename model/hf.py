"""Hugging Face DeepSeek checkpoints: config.json (model_type deepseek_v2 / deepseek_v3) -> ModelArgs, field by
field, and from_pretrained (meta-device build, then a tensor-by-tensor load).

Every field of config.json is accounted for: mapped to a ModelArgs field, checked against the one value dskc
implements, or listed as not changing inference (with the reason). A field dskc cannot express, or does not know,
raises ValueError naming the field and its value; nothing is dropped silently. Semantics are transformers' (5.x)
modelling of these model types, which agrees with DeepSeek's published remote code on the published configs:
- routing: deepseek_v2 scores with softmax and picks greedy or group_limited_greedy (group = its max score), the
  weights never normalised; deepseek_v3 scores with sigmoid, noaux_tc (e_score_correction_bias for selection,
  group = sum of its top-2), weights normalised (norm_topk_prob). Both multiply by routed_scaling_factor.
- YaRN (rope_scaling / rope_parameters of type yarn): frequencies from factor, original_max_position_embeddings,
  beta_fast, beta_slow; cos/sin times attention_factor (given, or get_mscale(factor, mscale) /
  get_mscale(factor, mscale_all_dim) when both are set, else get_mscale(factor)); the softmax scale times
  get_mscale(factor, mscale_all_dim)^2 when mscale_all_dim is set. The config decides; max_seq_len only sizes the
  cache.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .args import ModelArgs

log = logging.getLogger("dskc.model")
MODEL_TYPES = ("deepseek_v2", "deepseek_v3")

# config field -> ModelArgs field, copied (ModelArgs checks types and values)
DIRECT = {"vocab_size": "vocab_size", "hidden_size": "dim", "intermediate_size": "inter_dim",
          "moe_intermediate_size": "moe_inter_dim", "num_hidden_layers": "n_layers",
          "num_attention_heads": "n_heads", "first_k_dense_replace": "n_dense_layers",
          "n_routed_experts": "n_routed_experts", "num_experts_per_tok": "n_activated_experts",
          "routed_scaling_factor": "route_scale", "kv_lora_rank": "kv_lora_rank",
          "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
          "v_head_dim": "v_head_dim"}
# config field -> ModelArgs field; null means 0 (q_lora_rank null: V2-Lite's single wq projection)
NULL_IS_ZERO = {"q_lora_rank": "q_lora_rank", "n_shared_experts": "n_shared_experts"}
# config field -> (ModelArgs field, default when absent)
WITH_DEFAULT = {"rms_norm_eps": ("norm_eps", 1e-6)}
# config field -> (values dskc implements, value when absent)
FIXED = {"hidden_act": (("silu",), "silu"), "attention_bias": ((False,), False), "mlp_bias": ((False,), False),
         "tie_word_embeddings": ((False,), False), "moe_layer_freq": ((1,), 1), "rope_interleave": ((True,), True)}
# per model type: topk_method / scoring_func / norm_topk_prob values its modelling implements, default first
ROUTING = {
    "deepseek_v2": {"topk_method": ("greedy", "group_limited_greedy"), "scoring_func": ("softmax",),
                    "norm_topk_prob": (False,)},
    "deepseek_v3": {"topk_method": ("noaux_tc",), "scoring_func": ("sigmoid",), "norm_topk_prob": (True,)},
}
# read by the functions below
HANDLED = {"model_type", "topk_method", "scoring_func", "norm_topk_prob", "n_group", "topk_group",
           "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "quantization_config",
           "num_key_value_heads", "head_dim", "qk_head_dim"}
# config field -> why it does not change inference
IGNORED = {
    "architectures": "metadata", "auto_map": "remote-code pointers", "transformers_version": "metadata",
    "_name_or_path": "metadata", "torch_dtype": "the tensors carry their dtype", "dtype": "the tensors carry "
    "their dtype", "use_cache": "dskc always caches", "initializer_range": "training initialisation",
    "aux_loss_alpha": "training loss", "seq_aux": "training loss", "output_router_logits": "training loss",
    "router_aux_loss_coef": "training loss", "ep_size": "expert-parallel layout of the remote code",
    "attention_dropout": "training only", "bos_token_id": "tokenizer id", "eos_token_id": "tokenizer id (dskc "
    "run stops there)", "pad_token_id": "tokenizer id", "pretraining_tp": "pre-training's tensor-parallel degree; "
    "DeepSeek's modelling does not read it", "num_nextn_predict_layers": "the multi-token-prediction layers, "
    "stored as layers num_hidden_layers..: skipped on load with a log line", "num_mtp_layers": "the same "
    "(transformers' alias)",
}
FP8_QUANT = {"quant_method": ("fp8",), "fmt": ("e4m3", None), "activation_scheme": ("dynamic", None),
             "weight_block_size": ([128, 128],), "scale_fmt": (None, "ue8m0"), "modules_to_not_convert": (None, []),
             "dequantize": (False, None)}
YARN_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}


def _fail(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.json field {field!r} = {value!r}: {why}")


def _need(cfg: Mapping, field: str) -> Any:
    if cfg.get(field) is None:
        raise ValueError(f"config.json has no {field!r} (needed to build the model)")
    return cfg[field]


def _check_known(cfg: Mapping) -> None:
    known = set(DIRECT) | set(NULL_IS_ZERO) | set(WITH_DEFAULT) | set(FIXED) | HANDLED | set(IGNORED)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"config.json has fields dskc does not know: "
                         f"{ {k: cfg[k] for k in unknown} }; it cannot tell whether they change the model")
    for field, (allowed, default) in FIXED.items():
        if cfg.get(field, default) not in allowed:
            raise _fail(field, cfg[field], f"dskc implements {allowed[0]!r} only")
    heads = cfg.get("num_attention_heads")
    if cfg.get("num_key_value_heads") not in (None, heads):
        raise _fail("num_key_value_heads", cfg["num_key_value_heads"], f"MLA shares the latent across heads; "
                    f"transformers needs it equal to num_attention_heads ({heads})")
    rope, nope = cfg.get("qk_rope_head_dim"), cfg.get("qk_nope_head_dim")
    for field, want in (("head_dim", rope), ("qk_head_dim", None if rope is None or nope is None else rope + nope)):
        if cfg.get(field) is not None and cfg[field] != want:
            raise _fail(field, cfg[field], f"transformers derives it as {want}; another value is not expressible")


def _routing(cfg: Mapping, model_type: str) -> dict:
    allowed = ROUTING[model_type]
    got = {k: cfg.get(k) if cfg.get(k) is not None else v[0] for k, v in allowed.items()}
    for field, value in got.items():
        if value not in allowed[field]:
            raise _fail(field, value, f"{model_type} models (transformers and DeepSeek's code) implement "
                        f"{list(allowed[field])}")
    method = got["topk_method"]
    out = {"score_func": got["scoring_func"], "gate_bias": method == "noaux_tc"}
    if method == "greedy":   # no groups: n_group / topk_group are not read
        out.update(n_expert_groups=1, n_limited_groups=1)
    else:
        out.update(n_expert_groups=_need(cfg, "n_group"), n_limited_groups=_need(cfg, "topk_group"))
    return out


def _rope_params(cfg: Mapping) -> dict:
    """The rope dict (transformers 5's rope_parameters, or the published files' rope_scaling + rope_theta)."""
    params = cfg.get("rope_parameters")
    legacy = cfg.get("rope_scaling")
    if params is not None and legacy is not None and legacy != params:
        raise _fail("rope_scaling", legacy, "differs from rope_parameters; give one")
    params = dict(params if params is not None else legacy or {})
    kinds = {params.get(k) for k in ("rope_type", "type") if params.get(k) is not None}
    if len(kinds) > 1:
        raise _fail("rope_scaling", params, "rope_type and type disagree")
    params["rope_type"] = kinds.pop() if kinds else "default"
    theta = [v for v in (cfg.get("rope_theta"), params.get("rope_theta")) if v is not None]
    if not theta:
        raise ValueError("config.json has no 'rope_theta' (top level or in rope_parameters)")
    if len(set(theta)) > 1:
        raise _fail("rope_theta", theta[0], f"differs from rope_parameters' {theta[1]}")
    params["rope_theta"] = theta[0]
    return params


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg: Mapping) -> dict:
    p = _rope_params(cfg)
    out: dict[str, Any] = {"rope_theta": p["rope_theta"]}
    if p["rope_type"] == "default":
        extra = sorted(set(p) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise _fail("rope_scaling", {k: p[k] for k in extra}, "set for a rope without scaling (type default)")
        return {**out, "yarn": False}
    if p["rope_type"] != "yarn":
        raise _fail("rope_scaling.rope_type", p["rope_type"], "dskc implements 'yarn' (or no scaling)")
    unknown = sorted(set(p) - YARN_KEYS)
    if unknown:
        raise _fail("rope_scaling", {k: p[k] for k in unknown}, "unknown YaRN parameters")
    if p.get("truncate", True) is not True:
        raise _fail("rope_scaling.truncate", p["truncate"], "dskc's YaRN ramp truncates (floor/ceil) only")
    original = p.get("original_max_position_embeddings") or _need(cfg, "max_position_embeddings")
    factor = p.get("factor")
    if factor is None:   # transformers: the ratio of the post- and pre-YaRN context lengths
        factor = _need(cfg, "max_position_embeddings") / original
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    attn = p.get("attention_factor")
    if attn is None:
        attn = (_get_mscale(factor, mscale) / _get_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                else _get_mscale(factor))
    return {**out, "yarn": True, "rope_factor": factor, "original_seq_len": original,
            "beta_fast": p.get("beta_fast") or 32, "beta_slow": p.get("beta_slow") or 1,
            "mscale": mscale_all_dim or 0.0, "rope_attn_factor": float(attn)}


def _quantization(cfg: Mapping, quantize: str | None) -> dict:
    if quantize not in (None, "fp8"):
        raise ValueError(f"quantize must be None or 'fp8', got {quantize!r}")
    q = cfg.get("quantization_config")
    if q is None:
        return {"dtype": "fp8" if quantize == "fp8" else "bf16", "scale_fmt": None}
    unknown = sorted(set(q) - set(FP8_QUANT))
    if unknown:
        raise _fail("quantization_config", {k: q[k] for k in unknown}, "unknown FP8 quantisation parameters")
    for key, allowed in FP8_QUANT.items():
        if q.get(key) not in allowed:
            raise _fail(f"quantization_config.{key}", q.get(key), f"dskc reads {list(allowed)}")
    return {"dtype": "fp8", "scale_fmt": q.get("scale_fmt")}


def args_from_hf_config(cfg: Mapping[str, Any], *, max_seq_len: int = 4096, max_batch_size: int = 8,
                        quantize: str | None = None) -> ModelArgs:
    """ModelArgs for a Hugging Face DeepSeek config.json (a dict). max_seq_len / max_batch_size size the KV cache
    (nothing else); quantize="fp8" makes the Linear weights FP8 (quantised on load) when the checkpoint is not."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise _fail("model_type", model_type, f"dskc reads {list(MODEL_TYPES)}")
    _check_known(cfg)
    fields: dict[str, Any] = {ours: _need(cfg, theirs) for theirs, ours in DIRECT.items()}
    fields.update({ours: cfg.get(theirs) or 0 for theirs, ours in NULL_IS_ZERO.items()})
    fields.update({ours: cfg.get(theirs, default) for theirs, (ours, default) in WITH_DEFAULT.items()})
    fields.update(_routing(cfg, model_type))
    fields.update(_yarn(cfg))
    fields.update(_quantization(cfg, quantize))
    limit = cfg.get("max_position_embeddings")
    if limit is not None and max_seq_len > limit:
        log.warning("dskc.model: max_seq_len %d is past the config's max_position_embeddings %d", max_seq_len, limit)
    try:
        return ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config.json maps to ModelArgs dskc cannot build: {exc}") from None


def read_config(path: str | os.PathLike) -> dict:
    """The config.json of a checkpoint folder (or the file itself) as a dict."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no config.json (a Hugging Face checkpoint folder holds one)")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file} is not a JSON object")
    return cfg


def is_hf_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16, max_seq_len: int = 4096,
                    max_batch_size: int = 8, quantize: str | None = None, attn_impl: str = "absorb",
                    device=None, gemm_impl: str = "bf16"):
    """A dskc.model.Transformer from a Hugging Face DeepSeek folder (config.json + safetensors: sharded with an
    index, a single model.safetensors, or DeepSeek's convert.py files), weights bf16/fp16/fp32 or FP8 with
    weight_scale_inv.

    dtype: compute dtype (activations, caches, float weights). max_seq_len / max_batch_size: the KV cache.
    quantize: None (weights as stored) or "fp8" (a float checkpoint's Linear weights become e4m3 with 128x128
    block scales on load, exactly model/fp8.py's quantize_weight). The model is built on the meta device, then
    each tensor is read once into place (checks on every name/shape/dtype first; multi-token-prediction layers
    are skipped with a log line). device: where the weights go (default CPU).
    """
    from .loader import load_checkpoint
    from .model import Transformer

    cfg = read_config(path)
    args = args_from_hf_config(cfg, max_seq_len=max_seq_len, max_batch_size=max_batch_size, quantize=quantize)
    model = Transformer(args, attn_impl, dtype=dtype, device="meta", gemm_impl=gemm_impl)
    float_weights = cfg.get("quantization_config") is None
    return load_checkpoint(model, path, quantize=quantize == "fp8" and float_weights, device=device)
