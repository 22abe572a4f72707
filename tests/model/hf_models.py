"""Tiny random transformers DeepSeek-V2/V3 models for the Hugging Face loader tests (offline: built from configs in
code, nothing downloaded), saved in the layouts DeepSeek and save_pretrained use, and the reference run.

FP8 checkpoints are written the way DeepSeek publishes V3: every Linear weight of the decoder layers as e4m3 with a
float32 `weight_scale_inv` per 128x128 block (embedding, head, router, norms stay float) and a quantization_config;
the transformers model then holds exactly the dequantised weights, so both sides compute with the same numbers.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dskc.model import quantize_weight, weight_dequant

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1}
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=16, v_head_dim=16, first_k_dense_replace=1, max_position_embeddings=512,
              rms_norm_eps=1e-6)
CASES = {  # name -> (model_type, config overrides)
    # V3: noaux_tc (sigmoid, e_score_correction_bias, top-2-sum groups), YaRN with mscale != mscale_all_dim
    "v3": ("deepseek_v3", dict(q_lora_rank=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                               n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                               rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 0.8})),
    # V2: softmax, group_limited_greedy (group max), YaRN with DeepSeek-V2's mscale == mscale_all_dim = 0.707
    "v2": ("deepseek_v2", dict(q_lora_rank=32, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
                               n_group=4, topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=16.0,
                               rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
    # V2-Lite-like: q_lora_rank null (one wq), greedy routing over all experts
    "v2-lite": ("deepseek_v2", dict(q_lora_rank=None, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                                    n_group=1, topk_group=1, topk_method="greedy", routed_scaling_factor=1.0,
                                    rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
    # V3 without rope scaling: plain RoPE, no mscale
    "v3-norope-scaling": ("deepseek_v3", dict(q_lora_rank=32, n_routed_experts=8, n_shared_experts=1,
                                              num_experts_per_tok=2, n_group=2, topk_group=1,
                                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # V3 with every FP8 Linear input width a multiple of 128 (for the FP8 checkpoint and quantize="fp8")
    "v3-fp8": ("deepseek_v3", dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=128,
                                   kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
                                   n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                                   topk_group=2, rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # the `tiny` named config's shapes (FP8, kv_lora_rank 512 + rope 64: the MLA kernels' head), 2 layers
    "tiny-like": ("deepseek_v3", dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                                      num_hidden_layers=2, q_lora_rank=128, kv_lora_rank=512, qk_nope_head_dim=64,
                                      qk_rope_head_dim=64, v_head_dim=64, n_routed_experts=16, n_shared_experts=2,
                                      num_experts_per_tok=4, n_group=4, topk_group=2, max_position_embeddings=5120,
                                      rope_parameters={**YARN, "factor": 40.0, "mscale": 1.0,
                                                       "mscale_all_dim": 1.0})),
}
FP8_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
               "up_proj", "down_proj")


def build(case: str, seed: int = 0):
    """A float32 transformers model of the case, eval mode, eager attention, seeded random weights (norms near 1,
    a non-zero e_score_correction_bias, linears ~ N(0, 1/in))."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    model_type, extra = CASES[case]
    cls_cfg, cls = ((DeepseekV3Config, DeepseekV3ForCausalLM) if model_type == "deepseek_v3"
                    else (DeepseekV2Config, DeepseekV2ForCausalLM))
    cfg = cls_cfg(**{**COMMON, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif "embed" in name:
                p.copy_(noise)
            else:   # 2-D [out, in] or fused experts [E, out, in]
                p.copy_(noise / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def _tensors(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _set_weight(params: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """Write a stored (per-expert) tensor into the transformers model's tensors (`_tensors(model)`), whose experts
    are fused: experts.gate_up_proj [E, 2I, H] = cat(gate_proj, up_proj) per expert, experts.down_proj [E, H, I]."""
    parts = name.split(".")
    with torch.no_grad():
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts")
            e, proj = int(parts[i + 1]), parts[i + 2]
            base = ".".join(parts[:i + 1])
            if proj == "down_proj":
                params[base + ".down_proj"][e].copy_(value)
            else:
                fused = params[base + ".gate_up_proj"][e]
                half = fused.shape[0] // 2
                (fused[:half] if proj == "gate_proj" else fused[half:]).copy_(value)
        else:
            params[name].copy_(value)


def save(model, directory: Path, *, sharded: bool, fp8: bool = False, dtype: torch.dtype | None = None) -> Path:
    """save_pretrained (shards of ~64 KB + index, or one model.safetensors), optionally in `dtype`; fp8=True turns
    the decoder Linear weights into e4m3 + weight_scale_inv (dskc's quantize_weight), writes the
    quantization_config as DeepSeek's V3 config.json has it, and puts the dequantised weights into `model`."""
    if dtype is None:
        model.save_pretrained(directory, max_shard_size="64KB" if sharded else "10GB")
    else:   # a copy in `dtype` (the rotary frequencies of `model` stay float32), then `model` takes the rounded values
        copy.deepcopy(model).to(dtype).save_pretrained(directory, max_shard_size="64KB" if sharded else "10GB")
        params = _tensors(model)
        for path in sorted(directory.glob("*.safetensors")):
            for name, w in load_file(str(path)).items():
                _set_weight(params, name, w.float())
    if fp8:
        _to_fp8_files(directory, model)
    return directory


def is_fp8_linear(name: str) -> bool:
    """A decoder-layer Linear weight: FP8 in DeepSeek's V3 checkpoints (not the embedding, head, router, norms)."""
    parts = name.split(".")
    return name.startswith("model.layers.") and name.endswith(".weight") and parts[-2] in FP8_LINEARS


def fp8_round_trip(model, directory: Path) -> None:
    """Put dequant(quantize_weight(w)) into `model` for each FP8 Linear weight w stored (float) in `directory`:
    what a dskc model loaded with quantize="fp8" computes with."""
    params = _tensors(model)
    for path in sorted(directory.glob("*.safetensors")):
        for name, w in load_file(str(path)).items():
            if is_fp8_linear(name):
                _set_weight(params, name, weight_dequant(*quantize_weight(w), torch.float32))


def _to_fp8_files(directory: Path, model) -> None:
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    params = _tensors(model)
    for path in sorted(directory.glob("*.safetensors")):
        state = load_file(str(path))
        for name in list(state):
            if is_fp8_linear(name):
                q, s = quantize_weight(state[name])
                state[name], state[name + "_scale_inv"] = q, s
                _set_weight(params, name, weight_dequant(q, s, torch.float32))
                if index is not None:
                    index["weight_map"][name + "_scale_inv"] = path.name
        save_file(state, str(path), metadata={"format": "pt"})
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2))
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    cfg_path.write_text(json.dumps(cfg, indent=2))


def save_tokenizer(directory: Path, words: list[str], vocab_size: int) -> None:
    """A word-level tokenizer.json (the `tokenizers` package, built offline): id 0 is [UNK], then `words`, then
    filler words w<id> up to vocab_size, so every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["[UNK]", *words]
    names += [f"w{i}" for i in range(len(names), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


@torch.no_grad()
def reference_run(model, prompt: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefill `prompt` [B, S], then `steps` greedy decode steps with transformers' cache; returns the last-position
    logits of each call (float32 [B, vocab]) and the tokens fed at each decode step."""
    # transformers 5.2x renamed past_key_values to cache (the old name warns until 5.40)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=prompt, use_cache=True)
    logits, fed = [out.logits[:, -1].float()], []
    cache = out.past_key_values
    for _ in range(steps):
        tok = logits[-1].argmax(-1, keepdim=True)
        fed.append(tok)
        out = model(input_ids=tok, use_cache=True, **{kw: cache})
        cache = out.past_key_values
        logits.append(out.logits[:, -1].float())
    return logits, fed
