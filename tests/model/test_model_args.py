"""ModelArgs: named configs, JSON loading, validation errors."""
import dataclasses
import json

import pytest

from dskc.model import CONFIGS, ModelArgs, get_config


def test_named_configs_match_the_reference_table():
    assert set(CONFIGS) == {"tiny", "tiny-text", "deepseek-v2-lite", "deepseek-v2", "deepseek-v3"}
    v3 = CONFIGS["deepseek-v3"]
    assert (v3.vocab_size, v3.dim, v3.inter_dim, v3.moe_inter_dim) == (129280, 7168, 18432, 2048)
    assert (v3.n_layers, v3.n_dense_layers, v3.n_heads, v3.n_routed_experts) == (61, 3, 128, 256)
    assert (v3.n_shared_experts, v3.n_activated_experts, v3.n_expert_groups, v3.n_limited_groups) == (1, 8, 8, 4)
    assert (v3.score_func, v3.route_scale, v3.q_lora_rank, v3.dtype) == ("sigmoid", 2.5, 1536, "fp8")
    v2 = CONFIGS["deepseek-v2"]
    assert (v2.dim, v2.n_heads, v2.n_routed_experts, v2.n_expert_groups, v2.n_limited_groups) == (5120, 128, 160, 8, 3)
    assert (v2.score_func, v2.route_scale, v2.dtype) == ("softmax", 16.0, "bf16")
    lite = CONFIGS["deepseek-v2-lite"]
    assert (lite.dim, lite.q_lora_rank, lite.n_routed_experts, lite.mscale) == (2048, 0, 64, 0.707)
    assert (lite.max_batch_size, lite.max_seq_len, lite.original_seq_len, lite.rope_factor) == (8, 16384, 4096, 40)


@pytest.mark.parametrize("name", ["tiny", "tiny-text"])
def test_tiny_exercises_every_path(name):
    t = CONFIGS[name]
    assert t.q_lora_rank > 0 and t.n_expert_groups > 1 and t.n_limited_groups < t.n_expert_groups
    assert t.score_func == "sigmoid" and t.has_gate_bias and t.route_scale != 1 and t.yarn_active
    assert 1 <= t.n_dense_layers < t.n_layers and t.dtype == "fp8"
    assert (t.kv_lora_rank, t.qk_rope_head_dim) == (512, 64)  # MLA kernels' head dim 576


def test_from_json_deepseek_format_and_roundtrip(tmp_path):
    path = tmp_path / "config_671B.json"
    path.write_text(json.dumps({"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048,
                                "n_layers": 61, "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256,
                                "n_shared_experts": 1, "n_activated_experts": 8, "n_expert_groups": 8,
                                "n_limited_groups": 4, "route_scale": 2.5, "score_func": "sigmoid",
                                "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                                "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8"}))
    assert ModelArgs.from_json(path) == CONFIGS["deepseek-v3"]
    get_config("tiny").to_json(tmp_path / "tiny.json")
    assert ModelArgs.from_json(tmp_path / "tiny.json") == get_config("tiny")


def test_unknown_json_key_names_it(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"dim": 2048, "n_experts": 8}))
    with pytest.raises(ValueError, match="n_experts"):
        ModelArgs.from_json(path)


def test_get_config():
    assert get_config("tiny", max_seq_len=512).max_seq_len == 512
    with pytest.raises(ValueError, match="known"):
        get_config("deepseek-v4")
    with pytest.raises(ValueError, match="bogus"):
        get_config("tiny", bogus=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_config("tiny").dim = 5


@pytest.mark.parametrize("overrides, match", [
    (dict(dim=200), "multiple of 128"),
    (dict(moe_inter_dim=96), r"expert w2 \(moe_inter_dim\)"),
    (dict(q_lora_rank=100), r"wq_b \(q_lora_rank\)"),
    (dict(n_routed_experts=18), "divisible by n_expert_groups"),
    (dict(n_limited_groups=1, n_activated_experts=5), "n_limited_groups"),
    (dict(n_activated_experts=17), "n_activated_experts"),
    (dict(score_func="relu"), "score_func"),
    (dict(dtype="fp16"), "dtype"),
    (dict(n_dense_layers=4), "n_dense_layers"),
    (dict(qk_rope_head_dim=63), "even"),
    (dict(dim=0), "dim"),
])
def test_invalid_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_config("tiny", **overrides)


def test_bad_types_raise():
    with pytest.raises(TypeError, match="dim"):
        get_config("tiny", dim=256.0)
    with pytest.raises(TypeError, match="gate_bias"):
        get_config("tiny", gate_bias=1)


def test_bf16_has_no_fp8_width_rule():
    assert get_config("tiny", dtype="bf16", dim=200, inter_dim=300).dim == 200
