"""Tiny random transformers models (configs in code, no network) of the families dskc's table serves: 2 layers,
hidden 128, a dense SwiGLU MLP in layer 0 and a MoE in layer 1 (Mixtral: MoE in both), DeepSeek's MLA with the
kernels' 512 + 64 latent. Routers get a larger initial scale than transformers' 0.02 (and DeepSeek-V3 a random
e_score_correction_bias) so routing is decisive: with near-uniform scores a rounding difference flips experts."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256)
MLA = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, num_key_value_heads=2,
           first_k_dense_replace=1, n_shared_experts=1, num_experts_per_tok=2, intermediate_size=256,
           moe_intermediate_size=128)


def _config(name: str, **over):
    t = transformers
    if name == "deepseek_v3":
        return t.DeepseekV3Config(**{**COMMON, **MLA, **dict(n_routed_experts=8, n_group=2, topk_group=1,
                                  q_lora_rank=128, routed_scaling_factor=2.5, norm_topk_prob=True), **over})
    if name == "deepseek_v2":
        return t.DeepseekV2Config(**{**COMMON, **MLA, **dict(n_routed_experts=8, n_group=2, topk_group=1,
                                  q_lora_rank=None, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
                                     **over})
    moe = dict(intermediate_size=256, moe_intermediate_size=128, num_key_value_heads=1, num_experts=8,
               num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0])
    if name == "qwen3_moe":
        return t.Qwen3MoeConfig(**{**COMMON, **moe, "head_dim": 64, "norm_topk_prob": True, **over})
    if name == "qwen2_moe":
        return t.Qwen2MoeConfig(**{**COMMON, **moe, "shared_expert_intermediate_size": 128, "norm_topk_prob": False,
                                   **over})
    if name == "mixtral":
        return t.MixtralConfig(**{**COMMON, "intermediate_size": 128, "num_key_value_heads": 1,
                                  "num_local_experts": 4, "num_experts_per_tok": 2, **over})
    raise KeyError(name)


CLASSES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
           "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
NAMES = tuple(CLASSES)
FAMILY = {"deepseek_v3": "transformers.deepseek_v3", "deepseek_v2": "transformers.deepseek_v2",
          "qwen3_moe": "transformers.qwen3_moe", "qwen2_moe": "transformers.qwen2_moe", "mixtral": "transformers.mixtral"}


def build(name: str, seed: int = 0, device="cpu", **over):
    """The tiny model in float32, eval mode, seeded (routers rescaled, V3's selection bias random)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, CLASSES[name])(_config(name, **over)).eval()
    if device == "meta":
        return model
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            if mod_name.endswith("mlp.gate"):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.5)
                if hasattr(mod, "e_score_correction_bias"):
                    mod.e_score_correction_bias.copy_(torch.randn(mod.weight.shape[0], generator=g) * 0.1)
    return model


def expected_regions(model) -> dict:
    """{module path: kind} of the MoE, MLP and MLA modules a tiny model holds."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        out[f"model.layers.{i}.mlp"] = "moe" if hasattr(mlp, "experts") else "mlp"
        if hasattr(layer.self_attn, "kv_b_proj"):
            out[f"model.layers.{i}.self_attn"] = "mla"
    return out
