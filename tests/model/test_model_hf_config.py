"""Hugging Face config.json -> ModelArgs: the published DeepSeek-V2, V2-Lite, V3, R1 (and V3.1) configs map field
by field (copies in tests/model/data/hf_configs/); what dskc cannot express is an error naming field and value."""
import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest

from dskc.model import CONFIGS, args_from_hf_config
from dskc.model.hf import DIRECT, IGNORED, read_config

DATA = Path(__file__).with_name("data") / "hf_configs"
SIZES = dict(max_seq_len=4096, max_batch_size=8)


def _published(name):
    return json.loads((DATA / f"{name}.json").read_text())


def _named(name, **changes):
    return dataclasses.replace(CONFIGS[name], **SIZES, **changes)


def _m(factor, mscale):
    return 0.1 * mscale * math.log(factor) + 1


# published config -> the ModelArgs it must give: the named config of the same model where dskc has one, with the
# fields the Hugging Face file states differently (or a named config leaves to a reference rule) spelt out
EXPECTED = {
    "deepseek-v3": lambda: _named("deepseek-v3", gate_bias=True),
    "deepseek-r1": lambda: _named("deepseek-v3", gate_bias=True),
    # the HF V2 file has mscale = mscale_all_dim = 0.707, DeepSeek's config_236B.json (the named config) none
    "deepseek-v2": lambda: _named("deepseek-v2", gate_bias=False, mscale=0.707),
    "deepseek-v2-lite": lambda: _named("deepseek-v2-lite", gate_bias=False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_config_maps(name):
    cfg = _published(name)
    args = args_from_hf_config(cfg, **SIZES)
    assert args == EXPECTED[name]()
    # the fields read one to one, by name
    for theirs, ours in DIRECT.items():
        assert getattr(args, ours) == cfg[theirs], theirs
    assert args.q_lora_rank == (cfg["q_lora_rank"] or 0) and args.n_shared_experts == cfg["n_shared_experts"]
    assert args.norm_eps == cfg["rms_norm_eps"] and args.rope_theta == cfg["rope_theta"]
    rs = cfg["rope_scaling"]
    assert args.yarn and args.rope_factor == rs["factor"]
    assert args.original_seq_len == rs["original_max_position_embeddings"]
    assert (args.beta_fast, args.beta_slow, args.mscale) == (rs["beta_fast"], rs["beta_slow"], rs["mscale_all_dim"])
    factor = _m(rs["factor"], rs["mscale"]) / _m(rs["factor"], rs["mscale_all_dim"])
    assert args.rope_attn_factor == pytest.approx(factor)
    assert args.softmax_scale == pytest.approx(192 ** -0.5 * _m(40, rs["mscale_all_dim"]) ** 2)
    groups = cfg["topk_method"] != "greedy"
    assert (args.n_expert_groups, args.n_limited_groups) == ((cfg["n_group"], cfg["topk_group"]) if groups else (1, 1))
    assert args.score_func == cfg["scoring_func"] and args.has_gate_bias == (cfg["topk_method"] == "noaux_tc")
    assert args.dtype == ("fp8" if "quantization_config" in cfg else "bf16")


def test_v3_1_scale_fmt_ue8m0():
    cfg = _published("deepseek-v3")
    cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    assert args_from_hf_config(cfg, **SIZES) == _named("deepseek-v3", gate_bias=True, scale_fmt="ue8m0")


def test_ignored_fields_change_nothing():
    cfg = _published("deepseek-v3")
    base = args_from_hf_config(cfg, **SIZES)
    for field in set(IGNORED) & set(cfg):
        changed = dict(cfg, **{field: "something else"})
        assert args_from_hf_config(changed, **SIZES) == base, field


def test_max_seq_len_and_quantize_only_size_and_quantise():
    cfg = _published("deepseek-v2-lite")
    short = args_from_hf_config(cfg, max_seq_len=1024, max_batch_size=2)
    assert short.yarn and short.softmax_scale == args_from_hf_config(cfg, **SIZES).softmax_scale
    with pytest.raises(ValueError, match=r"multiple of 128.*'dense w2 \(inter_dim\)': 10944"):
        args_from_hf_config(cfg, quantize="fp8", **SIZES)   # V2-Lite's 10944-wide MLP has no 128x128 blocks
    assert args_from_hf_config(_published("deepseek-v2"), quantize="fp8", **SIZES) == _named(
        "deepseek-v2", gate_bias=False, mscale=0.707, dtype="fp8")
    with pytest.raises(ValueError, match="quantize must be None or 'fp8'"):
        args_from_hf_config(cfg, quantize="int4", **SIZES)


def test_transformers_5_layout_rope_parameters():
    """transformers 5 writes rope_parameters (with rope_theta inside) and head_dim / qk_head_dim."""
    cfg = _published("deepseek-v3")
    rope = dict(cfg.pop("rope_scaling"), rope_type="yarn", rope_theta=cfg.pop("rope_theta"))
    del rope["type"]
    cfg.update(rope_parameters=rope, head_dim=64, qk_head_dim=192, dtype="bfloat16", pad_token_id=None,
               rope_interleave=True, output_router_logits=False)
    assert args_from_hf_config(cfg, **SIZES) == _named("deepseek-v3", gate_bias=True)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    plain = args_from_hf_config(cfg, **SIZES)
    assert not plain.yarn and plain.softmax_scale == 192 ** -0.5


def _with(name, **changes):
    cfg = copy.deepcopy(_published(name))
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            cfg[outer][inner] = value
        elif value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    return cfg


@pytest.mark.parametrize("name, changes, match", [
    ("deepseek-v3", dict(topk_method="sinkhorn"), r"'topk_method' = 'sinkhorn'.*\['noaux_tc'\]"),
    ("deepseek-v2", dict(topk_method="noaux_tc"), r"'topk_method' = 'noaux_tc'.*deepseek_v2"),
    ("deepseek-v3", dict(scoring_func="sqrtsoftplus"), r"'scoring_func' = 'sqrtsoftplus'"),
    ("deepseek-v2", dict(scoring_func="sigmoid"), r"'scoring_func' = 'sigmoid'"),
    ("deepseek-v2", dict(norm_topk_prob=True), r"'norm_topk_prob' = True"),
    ("deepseek-v3", dict(moe_layer_freq=2), r"'moe_layer_freq' = 2"),
    ("deepseek-v3", dict(hidden_act="gelu"), r"'hidden_act' = 'gelu'"),
    ("deepseek-v3", dict(tie_word_embeddings=True), r"'tie_word_embeddings' = True"),
    ("deepseek-v3", dict(rope_interleave=False), r"'rope_interleave' = False"),
    ("deepseek-v3", dict(num_key_value_heads=8), r"'num_key_value_heads' = 8"),
    ("deepseek-v3", {"rope_scaling.type": "linear"}, r"'rope_scaling.rope_type' = 'linear'"),
    ("deepseek-v3", {"rope_scaling.truncate": False}, r"'rope_scaling.truncate' = False"),
    ("deepseek-v3", {"rope_scaling.low_freq_factor": 1.0}, r"'rope_scaling'.*low_freq_factor"),
    ("deepseek-v3", {"quantization_config.weight_block_size": [64, 64]},
     r"'quantization_config.weight_block_size' = \[64, 64\]"),
    ("deepseek-v3", {"quantization_config.quant_method": "gptq"}, r"'quantization_config.quant_method' = 'gptq'"),
    ("deepseek-v3", dict(model_type="llama"), r"'model_type' = 'llama'"),
    ("deepseek-v3", dict(sliding_window=4096), r"fields dskc does not know: \{'sliding_window': 4096\}"),
    ("deepseek-v3", dict(hidden_size=None), r"no 'hidden_size'"),
    ("deepseek-v3", dict(n_group=7), r"n_routed_experts \(256\) must be divisible by n_expert_groups \(7\)"),
])
def test_unexpressible_fields_are_named(name, changes, match):
    with pytest.raises(ValueError, match=match):
        args_from_hf_config(_with(name, **changes), **SIZES)


def test_read_config_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_published("deepseek-r1")))
    assert read_config(tmp_path)["model_type"] == "deepseek_v3"
