"""Transformer forward: float64 reference, naive vs absorb, decode vs prefill, state_dict names, bad input."""
import math

import pytest
import torch

import ds_reference as ref
from dskc.model import CONFIGS, Transformer, get_config, init_random, kv_cache_bytes_per_token
from dskc.model.mla import apply_rope, precompute_rope


def _tokens(bsz, seqlen, seed, vocab=1024):
    return torch.randint(0, vocab, (bsz, seqlen), generator=torch.Generator().manual_seed(seed))


VARIANTS = {  # tiny (V3-like) plus V2-Lite-like and V2-like paths
    "v3-like": {},
    "v2-lite-like": dict(q_lora_rank=0, score_func="softmax", gate_bias=None, n_expert_groups=1,
                         n_limited_groups=1, route_scale=1.0, dtype="bf16", max_seq_len=128, mscale=0.707,
                         yarn=False),
    "v2-like": dict(score_func="softmax", gate_bias=None, route_scale=16.0, dtype="bf16"),
}


@pytest.mark.parametrize("attn_impl, variant", [("absorb", "v3-like"), ("naive", "v3-like"),
                                                ("absorb", "v2-lite-like"), ("naive", "v2-like")])
def test_matches_float64_reference(make_tiny, attn_impl, variant):
    model = make_tiny(attn_impl, seed=3, args=VARIANTS[variant])
    tokens = _tokens(2, 37, seed=11)
    got = model(tokens)
    want = ref.forward(model.state_dict(), model.args, tokens)
    assert got.dtype == torch.float32 and got.shape == (2, 1024)
    assert want.std() > 0.3  # logits are not degenerate
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=2e-4)


def test_naive_and_absorb_agree_prefill_and_decode(make_tiny):
    naive, absorb = make_tiny("naive", seed=5), make_tiny("absorb", seed=5)
    tokens = _tokens(3, 29, seed=1)
    torch.testing.assert_close(naive(tokens[:, :21]), absorb(tokens[:, :21]), atol=1e-4, rtol=1e-4)
    for pos in range(21, 29):  # single-token decode steps
        step = tokens[:, pos:pos + 1]
        torch.testing.assert_close(naive(step, pos), absorb(step, pos), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_decode_equals_full_prefill(make_tiny, attn_impl):
    model, full = make_tiny(attn_impl, seed=7), make_tiny(attn_impl, seed=7)
    tokens = _tokens(2, 23, seed=2)
    model(tokens[:, :9])
    chunk = model(tokens[:, 9:14], 9)  # chunked prefill: several tokens at start_pos > 0
    torch.testing.assert_close(chunk, full(tokens[:, :14]), atol=1e-4, rtol=1e-4)
    for pos in range(14, 23):
        got = model(tokens[:, pos:pos + 1], pos)
        torch.testing.assert_close(got, full(tokens[:, :pos + 1]), atol=1e-4, rtol=1e-4)


def test_bfloat16_default_close_to_float32(make_tiny):
    f32 = make_tiny(dtype=torch.float32, seed=4)
    bf16 = Transformer(get_config("tiny"))
    init_random(bf16, 4)
    assert bf16.embed.weight.dtype == torch.bfloat16 and bf16.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fn
    tokens = _tokens(4, 16, seed=3)
    a, b = f32(tokens), bf16(tokens)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    sim = torch.nn.functional.cosine_similarity(a, b, dim=-1)  # bf16 rounding may flip a routing
    assert sim.mean() > 0.98 and sim.min() > 0.85, sim


def test_rope_table_matches_complex_reference(tiny_args):
    assert tiny_args.yarn_active
    table = precompute_rope(tiny_args)
    fc = ref.freqs_cis(tiny_args)
    torch.testing.assert_close(table[..., 0].double(), fc.real, atol=1e-5, rtol=0)
    torch.testing.assert_close(table[..., 1].double(), fc.imag, atol=1e-5, rtol=0)
    x = torch.randn(2, 5, 3, 64, dtype=torch.float64)
    got = apply_rope(x.float(), table[:5]).double()
    torch.testing.assert_close(got, ref.rope(x, fc[:5]), atol=1e-4, rtol=1e-4)


def test_softmax_scale_mscale():
    a = get_config("tiny")
    m = 0.1 * a.mscale * math.log(a.rope_factor) + 1.0
    assert a.softmax_scale == pytest.approx(128 ** -0.5 * m * m)  # qk_head_dim 64 + 64
    off = get_config("tiny", yarn=False)  # the config switches YaRN off: no mscale
    assert not off.yarn_active and off.softmax_scale == pytest.approx(128 ** -0.5)


def test_max_seq_len_sizes_the_cache_and_nothing_else():
    """DeepSeek's reference turns YaRN off when max_seq_len <= original_seq_len (128 for tiny); dskc keeps the
    config's YaRN: a shorter cache gives the same logits (the issue measured 0.57 relative error before)."""
    long, short = get_config("tiny"), get_config("tiny", max_seq_len=64)
    assert short.yarn_active and short.softmax_scale == long.softmax_scale
    torch.testing.assert_close(precompute_rope(short), precompute_rope(long)[:64], atol=0, rtol=0)
    tokens = _tokens(2, 20, seed=8)
    models = []
    for args in (long, short):
        m = Transformer(args, dtype=torch.float32)
        init_random(m, 6)
        models.append(m)
    torch.testing.assert_close(models[1](tokens), models[0](tokens), atol=1e-5, rtol=1e-5)


def test_rope_attn_factor_scales_the_yarn_table():
    base, scaled = get_config("tiny"), get_config("tiny", rope_attn_factor=1.25)
    torch.testing.assert_close(precompute_rope(scaled), precompute_rope(base) * 1.25, atol=1e-6, rtol=1e-6)
    off = get_config("tiny", yarn=False, rope_attn_factor=1.25)   # the factor belongs to YaRN
    angles = precompute_rope(off)
    torch.testing.assert_close(angles.pow(2).sum(-1), torch.ones(angles.shape[:-1]), atol=1e-5, rtol=0)


def _tiny_keys():
    keys = ["embed.weight"]
    for i in range(3):
        p = f"layers.{i}."
        keys += [p + k for k in [
            "attn.wq_a.weight", "attn.wq_a.scale", "attn.q_norm.weight", "attn.wq_b.weight", "attn.wq_b.scale",
            "attn.wkv_a.weight", "attn.wkv_a.scale", "attn.kv_norm.weight", "attn.wkv_b.weight",
            "attn.wkv_b.scale", "attn.wo.weight", "attn.wo.scale"]]
        if i == 0:
            keys += [p + k for k in ["ffn.w1.weight", "ffn.w1.scale", "ffn.w2.weight", "ffn.w2.scale",
                                     "ffn.w3.weight", "ffn.w3.scale"]]
        else:
            keys += [p + "ffn.gate.weight", p + "ffn.gate.bias"]
            for e in range(16):
                keys += [f"{p}ffn.experts.{e}.{w}.{t}" for w in ("w1", "w2", "w3") for t in ("weight", "scale")]
            keys += [f"{p}ffn.shared_experts.{w}.{t}" for w in ("w1", "w2", "w3") for t in ("weight", "scale")]
        keys += [p + "attn_norm.weight", p + "ffn_norm.weight"]
    return keys + ["norm.weight", "head.weight"]


def test_tiny_state_dict_names_and_shapes(tiny_args):
    model = Transformer(tiny_args, dtype=torch.float32)
    sd = model.state_dict()
    assert list(sd) == _tiny_keys()
    assert sd["layers.0.attn.wkv_a.weight"].shape == (576, 256)
    assert sd["layers.0.attn.wkv_a.weight"].dtype == torch.float8_e4m3fn
    assert sd["layers.0.attn.wkv_a.scale"].shape == (5, 2) and sd["layers.0.attn.wkv_a.scale"].dtype == torch.float32
    assert sd["layers.1.ffn.gate.bias"].dtype == torch.float32 and sd["head.weight"].dtype == torch.float32
    assert sd["layers.1.ffn.shared_experts.w2.weight"].shape == (256, 256)
    assert not any("cache" in k or "rope" in k for k in sd)  # buffers are not persistent


def test_reference_gate_bias_rule():
    assert not get_config("tiny", gate_bias=None).has_gate_bias  # dim 256 != 7168
    assert CONFIGS["deepseek-v3"].has_gate_bias and not CONFIGS["deepseek-v2"].has_gate_bias
    m = Transformer(get_config("tiny", gate_bias=False), dtype=torch.float32)
    assert "layers.1.ffn.gate.bias" not in m.state_dict()


def test_kv_cache_bytes_per_token(tiny_args):
    v3 = CONFIGS["deepseek-v3"]
    assert kv_cache_bytes_per_token(v3, "absorb") == 61 * 576 * 2
    assert kv_cache_bytes_per_token(v3, "naive", torch.float32) == 61 * 128 * (192 + 128) * 4
    for impl in ("absorb", "naive"):
        model = Transformer(tiny_args, impl, dtype=torch.bfloat16)
        cache = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("_cache"))
        assert cache == kv_cache_bytes_per_token(tiny_args, impl) * tiny_args.max_batch_size * tiny_args.max_seq_len
    with pytest.raises(ValueError, match="attn_impl"):
        kv_cache_bytes_per_token(v3, "flash")


def test_bad_inputs_raise(make_tiny):
    model = make_tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_tokens(1, 257, seed=0))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_tokens(1, 10, seed=0), start_pos=250)
    with pytest.raises(ValueError, match="max_batch_size"):
        model(_tokens(5, 4, seed=0))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[3, 1024]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="start_pos"):
        model(_tokens(1, 4, seed=0), start_pos=-1)
    with pytest.raises(ValueError, match="attn_impl"):
        Transformer(get_config("tiny"), "flash")
    with pytest.raises(TypeError, match="ModelArgs"):
        Transformer({"dim": 256})
