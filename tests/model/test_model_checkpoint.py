"""Checkpoints: round trips in the DeepSeek and Hugging Face layouts, name mapping, errors naming the keys."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dskc.model import Transformer, get_config, init_random, load_checkpoint, save_checkpoint
from dskc.model.checkpoint import from_hf_name, to_hf_name

HF_NAMES = {  # ours -> Hugging Face, as in DeepSeek-V3's HF checkpoint and convert.py
    "embed.weight": "model.embed_tokens.weight",
    "layers.0.attn.wq_a.weight": "model.layers.0.self_attn.q_a_proj.weight",
    "layers.0.attn.wq_a.scale": "model.layers.0.self_attn.q_a_proj.weight_scale_inv",
    "layers.0.attn.q_norm.weight": "model.layers.0.self_attn.q_a_layernorm.weight",
    "layers.0.attn.wq_b.weight": "model.layers.0.self_attn.q_b_proj.weight",
    "layers.0.attn.wq.weight": "model.layers.0.self_attn.q_proj.weight",
    "layers.0.attn.wkv_a.weight": "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
    "layers.0.attn.kv_norm.weight": "model.layers.0.self_attn.kv_a_layernorm.weight",
    "layers.0.attn.wkv_b.weight": "model.layers.0.self_attn.kv_b_proj.weight",
    "layers.0.attn.wo.weight": "model.layers.0.self_attn.o_proj.weight",
    "layers.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "layers.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    "layers.0.ffn.w1.weight": "model.layers.0.mlp.gate_proj.weight",
    "layers.0.ffn.w2.weight": "model.layers.0.mlp.down_proj.weight",
    "layers.0.ffn.w3.weight": "model.layers.0.mlp.up_proj.weight",
    "layers.1.ffn.gate.weight": "model.layers.1.mlp.gate.weight",
    "layers.1.ffn.gate.bias": "model.layers.1.mlp.gate.e_score_correction_bias",
    "layers.1.ffn.experts.3.w1.weight": "model.layers.1.mlp.experts.3.gate_proj.weight",
    "layers.1.ffn.experts.3.w2.scale": "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv",
    "layers.1.ffn.shared_experts.w1.weight": "model.layers.1.mlp.shared_experts.gate_proj.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}


@pytest.mark.parametrize("ours", sorted(HF_NAMES))
def test_hf_name_mapping(ours):
    assert to_hf_name(ours) == HF_NAMES[ours]
    assert from_hf_name(HF_NAMES[ours]) == ours


def _logits(model, seed=0):
    tokens = torch.randint(0, 1024, (2, 11), generator=torch.Generator().manual_seed(seed))
    return model(tokens)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)), k


@pytest.mark.parametrize("layout", ["deepseek", "hf"])
def test_round_trip(tmp_path, make_tiny, layout):
    src, dst = make_tiny(seed=1), make_tiny(seed=2)
    files = save_checkpoint(src, tmp_path, layout=layout, max_shard_bytes=1 << 20)
    if layout == "hf":
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
        assert set(HF_NAMES.values()) - {"model.layers.0.self_attn.q_proj.weight"} <= set(index["weight_map"])
    else:
        assert [f.name for f in files] == ["model0-mp1.safetensors"]
    load_checkpoint(dst, tmp_path)
    _assert_same_weights(src, dst)
    torch.testing.assert_close(_logits(dst), _logits(src), atol=0, rtol=0)


def test_hf_bf16_checkpoint_casts_into_float32_model(tmp_path, make_tiny):
    src = Transformer(get_config("tiny"), dtype=torch.bfloat16)
    init_random(src, 3)
    save_checkpoint(src, tmp_path, layout="hf")
    dst = make_tiny(seed=4)
    load_checkpoint(dst, tmp_path)
    torch.testing.assert_close(dst.embed.weight, src.embed.weight.float(), atol=0, rtol=0)


def test_hf_mtp_layer_is_skipped_but_unknown_names_fail(tmp_path, make_tiny):
    src = make_tiny(seed=1)
    save_checkpoint(src, tmp_path, layout="hf")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    save_file({"model.layers.3.eh_proj.weight": torch.randn(4, 4)}, str(tmp_path / "mtp.safetensors"))
    index["weight_map"]["model.layers.3.eh_proj.weight"] = "mtp.safetensors"  # layer n_layers: the MTP module
    index_path.write_text(json.dumps(index))
    dst = make_tiny(seed=2)
    load_checkpoint(dst, tmp_path)
    _assert_same_weights(src, dst)
    save_file({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.randn(32)}, str(tmp_path / "x.safetensors"))
    index["weight_map"]["model.layers.0.self_attn.rotary_emb.inv_freq"] = "x.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="rotary_emb.inv_freq"):
        load_checkpoint(dst, tmp_path)


def _edit_deepseek(tmp_path, edit):
    path = tmp_path / "model0-mp1.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("layers.1.ffn.experts.5.w3.scale"), r"missing keys \['layers.1.ffn.experts.5.w3.scale'\]"),
    (lambda s: s.update({"layers.0.attn.extra.weight": torch.zeros(2)}), "layers.0.attn.extra.weight"),
    (lambda s: s.update({"norm.weight": torch.zeros(255)}), r"norm.weight.*\(255,\), \(256,\)"),
    (lambda s: s.update({"layers.0.attn.wo.weight": torch.zeros(256, 256)}), "fp8 vs non-fp8"),
])
def test_bad_checkpoints_raise(tmp_path, make_tiny, edit, match):
    save_checkpoint(make_tiny(seed=1), tmp_path)
    _edit_deepseek(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(make_tiny(seed=2), tmp_path)


def test_missing_checkpoint_raises(tmp_path, make_tiny):
    with pytest.raises(ValueError, match="no checkpoint"):
        load_checkpoint(make_tiny(), tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(make_tiny(), tmp_path / "nope")
    with pytest.raises(ValueError, match="layout"):
        save_checkpoint(make_tiny(), tmp_path, layout="gguf")
