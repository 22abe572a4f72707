"""Hugging Face DeepSeek checkpoints into dskc: tiny random transformers DeepseekV2/V3ForCausalLM models saved with
save_pretrained (sharded and single-file, float32 and FP8 with weight_scale_inv), loaded by
dskc.model.from_pretrained, compared with transformers' own forward (prefill + 4 cached decode steps).

Nothing is downloaded: the models are built from configs in code (tests/model/hf_models.py).
"""
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_models as hf
from dskc import knobs
from dskc.model import Transformer, args_from_hf_config, from_pretrained, init_random, quantize_weight, save_checkpoint
from dskc.model.checkpoint import to_hf_name
from dskc.model.fp8 import FP8_DTYPE

PROMPT = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
STEPS = 4
PEAK_PROBE = Path(__file__).with_name("_hf_peak_probe.py")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(case, sharded, fp8) -> (folder, reference logits per call, tokens fed per decode step); cached."""
    cache = {}

    def get(case, sharded=True, fp8=False):
        key = (case, sharded, fp8)
        if key not in cache:
            model = hf.build(case)
            folder = hf.save(model, tmp_path_factory.mktemp(case), sharded=sharded, fp8=fp8)
            cache[key] = (folder, *hf.reference_run(model, PROMPT, STEPS))
        return cache[key]
    return get


def _dskc_run(model, fed):
    out = [model(PROMPT, 0)]
    for i, tok in enumerate(fed):
        out.append(model(tok, PROMPT.shape[1] + i))
    return out


def _assert_matches(got, ref):
    errs = [_rel(g, r) for g, r in zip(got, ref)]
    assert max(errs) < 1e-4, errs
    for g, r in zip(got, ref):   # greedy tokens identical at every step
        assert torch.equal(g.argmax(-1), r.argmax(-1))


# (case, sharded, fp8): every case sharded; single-file and FP8 (weight_scale_inv) on the V3 layouts
LAYOUTS = [("v3", True, False), ("v3", False, False), ("v2", True, False), ("v2-lite", False, False),
           ("v3-norope-scaling", True, False), ("v3-fp8", True, True), ("v3-fp8", False, True)]


@pytest.mark.parametrize("case, sharded, fp8", LAYOUTS)
@pytest.mark.parametrize("max_seq_len", [32, 600])   # below and above original_max_position_embeddings (128)
def test_logits_match_transformers(saved, case, sharded, fp8, max_seq_len):
    folder, ref, fed = saved(case, sharded, fp8)
    layout = sorted(p.name for p in folder.glob("*.safetensors"))
    assert (len(layout) > 1) == sharded and (layout == ["model.safetensors"]) == (not sharded)
    model = from_pretrained(folder, dtype=torch.float32, max_seq_len=max_seq_len, max_batch_size=2)
    assert model.args.dtype == ("fp8" if fp8 else "bf16")
    if fp8:
        assert model.layers[0].attn.wkv_a.weight.dtype == FP8_DTYPE
    _assert_matches(_dskc_run(model, fed), ref)


def _variant(model, **changes):
    other = Transformer(dataclasses.replace(model.args, **changes), dtype=torch.float32)
    other.load_state_dict(model.state_dict())
    return other


def test_the_comparison_sees_yarn_and_both_mscales(saved):
    """The V3 case has mscale 1.0 != mscale_all_dim 0.8: a cos/sin attention factor != 1 and a softmax mscale.
    Dropping YaRN, the attention factor or the softmax mscale each moves the logits far past the tolerance."""
    folder, ref, fed = saved("v3")
    model = from_pretrained(folder, dtype=torch.float32, max_seq_len=32, max_batch_size=2)
    a = model.args
    m = lambda f, s: 0.1 * s * torch.log(torch.tensor(f)).item() + 1   # noqa: E731
    assert a.yarn and a.rope_factor == 4.0 and a.original_seq_len == 128 and a.mscale == 0.8
    assert a.rope_attn_factor == pytest.approx(m(4.0, 1.0) / m(4.0, 0.8))
    for changes in (dict(yarn=False), dict(rope_attn_factor=1.0), dict(mscale=0.0)):
        got = _dskc_run(_variant(model, **changes), fed)
        assert max(_rel(g, r) for g, r in zip(got, ref)) > 1e-3, changes


def test_noaux_bias_and_group_routing_matter(saved):
    """The V3 case's random e_score_correction_bias changes which experts are chosen: without it dskc's logits
    leave transformers'."""
    folder, ref, fed = saved("v3")
    model = from_pretrained(folder, dtype=torch.float32, max_seq_len=32, max_batch_size=2)
    bias = model.layers[1].ffn.gate.bias
    assert bias is not None and bias.abs().min() > 0
    with torch.no_grad():
        for layer in model.layers[1:]:
            layer.ffn.gate.bias.zero_()
    assert max(_rel(g, r) for g, r in zip(_dskc_run(model, fed), ref)) > 1e-3


def test_quantize_fp8_on_load_is_dskc_quantiser_exactly(tmp_path):
    """A bf16 checkpoint with quantize="fp8": every Linear weight and scale equal quantize_weight of the stored
    tensor bit for bit; the logits then match transformers holding the dequantised weights."""
    model = hf.build("v3-fp8", seed=3)
    folder = hf.save(model, tmp_path, sharded=True, dtype=torch.bfloat16)   # model keeps the bf16-rounded values
    dskc = from_pretrained(folder, dtype=torch.float32, max_seq_len=32, max_batch_size=2, quantize="fp8")
    assert dskc.args.dtype == "fp8"
    stored = {}
    for path in folder.glob("*.safetensors"):
        stored.update(load_file(str(path)))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    checked = 0
    for name, mod in dskc.named_modules():
        if getattr(mod, "scale", None) is None:
            continue
        q, s = quantize_weight(stored[to_hf_name(name + ".weight")])
        assert torch.equal(mod.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(mod.scale, s), name
        checked += 1
    assert checked == 5 + 3 + 5 + 8 * 3 + 3   # layer 0: attention + dense MLP; layer 1: attention, 8 experts, shared
    hf.fp8_round_trip(model, folder)
    ref, fed = hf.reference_run(model, PROMPT, STEPS)
    _assert_matches(_dskc_run(dskc, fed), ref)


def test_mtp_layer_is_skipped_with_a_log_line_and_never_read(saved, tmp_path, caplog):
    """DeepSeek-V3 ships its multi-token-prediction module as layer num_hidden_layers: skipped (logged), and its
    shard is never opened: here it is listed in the index but missing from the folder."""
    folder, ref, fed = saved("v3")
    ckpt = tmp_path / "mtp"
    ckpt.mkdir()
    for p in folder.iterdir():
        (ckpt / p.name).write_bytes(p.read_bytes())
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    for name in ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.head.weight",
                 "self_attn.kv_a_proj_with_mqa.weight", "mlp.experts.0.gate_proj.weight"):
        index["weight_map"][f"model.layers.3.{name}"] = "model-mtp.safetensors"   # never written
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert json.loads((ckpt / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with caplog.at_level(logging.INFO, logger="dskc.model"):
        model = from_pretrained(ckpt, dtype=torch.float32, max_seq_len=32, max_batch_size=2)
    assert any("skipping 7 tensors of layer(s) [3]" in r.message and "multi-token-prediction" in r.message
               for r in caplog.records)
    _assert_matches(_dskc_run(model, fed), ref)


def _copy(folder, dst):
    dst.mkdir()
    for p in folder.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_checkpoint_errors_name_the_tensor(saved, tmp_path):
    folder, _, _ = saved("v3")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    load = lambda d: from_pretrained(d, dtype=torch.float32, max_seq_len=16, max_batch_size=1)  # noqa: E731
    # a missing shard: named, with the tensors the index puts there
    shard = index["weight_map"]["model.layers.2.self_attn.o_proj.weight"]
    d = _copy(folder, tmp_path / "shard")
    (d / shard).unlink()
    with pytest.raises(ValueError, match=f"shard {shard} is missing.*model.layers.2.self_attn.o_proj.weight"):
        load(d)
    # a shape mismatch: the tensor's stored name and both shapes
    d = _copy(folder, tmp_path / "shape")
    shard = index["weight_map"]["model.layers.1.self_attn.kv_b_proj.weight"]
    state = load_file(str(d / shard))
    state["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(128, 31)
    save_file(state, str(d / shard))
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.kv_b_proj.weight.*\(128, 31\), \(128, 32\)"):
        load(d)
    # an unknown tensor
    d = _copy(folder, tmp_path / "extra")
    save_file({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, str(d / "x.safetensors"))
    idx = dict(index, weight_map={**index["weight_map"], "model.layers.0.self_attn.rotary_emb.inv_freq":
                                  "x.safetensors"})
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="unexpected keys.*rotary_emb.inv_freq"):
        load(d)


def test_fp8_weight_without_its_scale_is_named(saved, tmp_path):
    folder, _, _ = saved("v3-fp8", True, True)
    d = _copy(folder, tmp_path / "noscale")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.experts.5.up_proj.weight_scale_inv"
    shard = index["weight_map"].pop(name)
    state = load_file(str(d / shard))
    del state[name]
    save_file(state, str(d / shard))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing keys.*model.layers.1.mlp.experts.5.up_proj.weight_scale_inv.*an "
                                         "FP8 weight without its scale"):
        from_pretrained(d, dtype=torch.float32, max_seq_len=16, max_batch_size=1)
    single = _copy(saved("v3-fp8", False, True)[0], tmp_path / "single")   # the same on a single file
    state = load_file(str(single / "model.safetensors"))
    del state[name]
    save_file(state, str(single / "model.safetensors"))
    with pytest.raises(ValueError, match="experts.5.up_proj.weight_scale_inv.*FP8 weight without its scale"):
        from_pretrained(single, dtype=torch.float32, max_seq_len=16, max_batch_size=1)


PEAK_CONFIG = {"model_type": "deepseek_v3", "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 2048,
               "moe_intermediate_size": 512, "num_hidden_layers": 6, "num_attention_heads": 4,
               "num_key_value_heads": 4, "first_k_dense_replace": 1, "n_routed_experts": 8, "n_shared_experts": 1,
               "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
               "q_lora_rank": 128, "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32,
               "v_head_dim": 32, "rope_theta": 10000, "max_position_embeddings": 4096}


def test_peak_memory_of_a_multi_shard_load_is_one_model(tmp_path):
    """A ~170 MB float32 model in 8 MB shards: loading it (meta build, tensor by tensor) raises the peak resident
    set by about the model's size; reading all tensors first and then copying (the old loader) took two."""
    args = args_from_hf_config(PEAK_CONFIG, max_seq_len=16, max_batch_size=1)
    src = Transformer(args, dtype=torch.float32)
    init_random(src, 0)
    files = save_checkpoint(src, tmp_path, layout="hf", max_shard_bytes=8 << 20)
    (tmp_path / "config.json").write_text(json.dumps(PEAK_CONFIG))
    del src
    assert len(files) > 15
    proc = subprocess.run([sys.executable, str(PEAK_PROBE), str(tmp_path)], capture_output=True, text=True,
                          env=knobs.subprocess_env(interpret=True), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    model_bytes, rise = res["param_bytes"], res["peak_rise_bytes"]
    assert model_bytes > 150e6
    assert 0.9 * model_bytes < rise < 1.3 * model_bytes, res
