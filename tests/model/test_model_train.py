"""dskc.model.train: the training-mode forward, the auxiliary-loss-free expert balancing, the FP8 export, the corpus."""
import dataclasses
import json
import math

import pytest
import torch

from dskc.model import Transformer, get_config, init_random
from dskc.model import train as T


def _small(attn_impl="naive", dtype=torch.float64):
    cfg = dataclasses.replace(T.training_config(), n_layers=2, max_seq_len=64, original_seq_len=32)
    return cfg, init_random(Transformer(cfg, attn_impl=attn_impl, dtype=dtype), seed=1)


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_all_logits_equal_the_inference_forward_at_every_position(attn_impl):
    """The uncached training forward gives, at each position, the logits the cached inference forward gives there
    (float64 model; the gate, RoPE and the returned logits are float32, hence 1e-5)."""
    cfg, model = _small(attn_impl)
    tok = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = T.all_logits(model, tok).float()
        for end in (1, 17, 40):   # prefill up to `end`: its last position
            torch.testing.assert_close(full[:, end - 1], model(tok[:, :end], 0), rtol=1e-5, atol=1e-5)
        last = model(tok[:, 40 - 1:40], 39)   # a decode step after a prefill of 39 positions, through the cache
        torch.testing.assert_close(full[:, -1], last, rtol=1e-5, atol=1e-5)


def test_training_step_reaches_every_weight_but_the_gate_bias():
    cfg = T.training_config()
    model = T.init_for_training(Transformer(cfg, attn_impl="naive", dtype=torch.float32), seed=0)
    tok = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(T.all_logits(model, tok[:, :-1]).flatten(0, 1), tok[:, 1:].flatten())
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5   # the init predicts bytes nearly uniformly
    loss.backward()
    for name, p in model.named_parameters():
        if name.endswith("gate.bias"):
            assert not p.requires_grad and p.grad is None and torch.count_nonzero(p) == 0
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bias_update_moves_a_fixed_step_towards_balance():
    """DeepSeek-V3 without auxiliary loss: overloaded experts' bias falls by gamma, underloaded ones' rises."""
    cfg, model = _small(dtype=torch.float32)
    load = T.ExpertLoad(model)
    before = {n: g.bias.clone() for n, g in load.gates.items()}
    with torch.no_grad():
        T.all_logits(model, torch.randint(0, cfg.vocab_size, (2, 50), generator=torch.Generator().manual_seed(2)))
    counts = load.counts["layers.1.ffn.gate"]
    assert counts.sum() == 2 * 50 * cfg.n_activated_experts
    load.balance(0.01)
    step = load.gates["layers.1.ffn.gate"].bias - before["layers.1.ffn.gate"]
    mean = counts.float().mean()
    expect = 0.01 * torch.sign(mean - counts.float())
    torch.testing.assert_close(step, expect)
    assert (step[counts > mean] < 0).all() and (step[counts < mean] > 0).all()
    load.remove()
    assert all(not g._forward_hooks for g in load.gates.values())


def test_fp8_export_quantises_every_fp8_linear_and_keeps_the_rest():
    model = T.init_for_training(Transformer(T.training_config(), attn_impl="naive", dtype=torch.float32), seed=0)
    with torch.no_grad():
        model.layers[1].ffn.gate.bias.normal_()
    fp8 = T.to_fp8(model)
    assert fp8.args == get_config("tiny-text") and fp8.args.dtype == "fp8"
    src = model.state_dict()
    for name, t in fp8.state_dict().items():
        if name.endswith(".scale"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            w = fp8.get_submodule(name.removesuffix(".weight")).dense_weight().float()
            # e4m3 keeps 3 mantissa bits: each weight within 1/16 relative, or below the block's smallest step
            err = (w - src[name]).abs()
            assert (err <= src[name].abs() / 16 + fp8.get_submodule(name.removesuffix(".weight")).scale.max()).all()
        elif name.endswith("gate.bias"):
            assert t.dtype == torch.float32 and torch.equal(t, src[name])
        else:
            assert t.dtype == torch.bfloat16 and torch.equal(t, src[name].bfloat16()), name


def test_corpus_and_split_are_the_stdlib_reference_text():
    data, about = T.corpus()
    assert about["bytes"] == len(data) > 100_000 and len(about["sha256"]) == 64
    train, val = T.split(data, 1 / 16)
    assert len(train) + len(val) == len(data) and len(val) == len(data) // 16
    assert bytes(val.tolist()) == data[-len(val):]
    assert T.decode(T.encode('The "if" statement')) == 'The "if" statement'
    assert T.decode([0xE2, 0x80]) == "\ufffd"    # cut inside a character: a replacement mark, no exception


def test_a_short_run_writes_a_loadable_fp8_checkpoint_and_its_record(tmp_path):
    cfg = T.TrainConfig(steps=2, batch=2, seq_len=32, warmup=1)
    lines = []
    model, record = T.train(cfg, log=lines.append)
    assert len(record["loss_curve"]) == 2 and record["validation_curve"][-1][0] == 2
    assert record["corpus"]["sha256"] == T.corpus()[1]["sha256"] and record["train"]["steps"] == 2
    assert any("expert" in line and "bpb" in line for line in lines)
    record.update({"validation_bits_per_byte": dict.fromkeys(("float32", "bf16", "fp8_weights",
                                                              "fp8_weights_and_activations"), 7.5),
                   "expert_load": {"max_over_mean": {"layers.1": 1.5}, "max_over_mean_train_sample": {"layers.1": 1.2}}})
    path = T.save(model, record, tmp_path)
    loaded = T.load_trained(tmp_path).state_dict()
    for name, t in T.to_fp8(model).state_dict().items():   # bit for bit (e4m3 compared as bytes)
        bits = (lambda x: x.view(torch.uint8)) if t.dtype == torch.float8_e4m3fn else (lambda x: x)
        assert loaded[name].dtype == t.dtype and torch.equal(bits(loaded[name]), bits(t)), name
    saved = json.loads((tmp_path / T.RECORD).read_text())
    assert saved["checkpoint"]["bytes"] == path.stat().st_size and "sha256" in saved["checkpoint"]
    assert "validation bits per byte" in (tmp_path / "record.md").read_text()
