"""The committed tiny-text checkpoint (model/checkpoints/tiny-text, written by `python -m dskc.model.train`): its
format, its record, and its validation figure recomputed from the weights. Default CI only loads it; the slow tier
retrains it with its seed."""
import hashlib
import json

import pytest
import torch

from dskc.model import get_config
from dskc.model import train as T

RECORD = json.loads((T.CHECKPOINT_DIR / T.RECORD).read_text())


def _same_corpus_or_skip() -> bytes:
    data, about = T.corpus()
    if about["sha256"] != RECORD["corpus"]["sha256"]:
        trained_on = RECORD["corpus"]
        pytest.skip(f"this Python's pydoc_data.topics differs from the corpus the checkpoint was trained on (sha256 "
                    f"{about['sha256'][:12]}... on Python {about['python']}, trained on {trained_on['sha256'][:12]}"
                    f"... from Python {trained_on['python']}): its figures cannot be reproduced here")
    return data


def test_checkpoint_is_fp8_with_block_scales_and_matches_its_record():
    path = T.CHECKPOINT_DIR / RECORD["checkpoint"]["file"]
    blob = path.read_bytes()
    assert len(blob) == RECORD["checkpoint"]["bytes"] <= 10 * 2**20
    assert hashlib.sha256(blob).hexdigest() == RECORD["checkpoint"]["sha256"]
    model = T.load_trained()
    assert model.args == get_config("tiny-text") and model.args.dtype == "fp8" and model.args.vocab_size == 256
    fp8 = {n: m for n, m in model.named_modules() if getattr(m, "scale", None) is not None}
    assert len(fp8) == 3 * 5 + 3 + 2 * (16 + 1) * 3   # MLA 5 per layer, dense MLP 3, (16 routed + shared) x 3 x 2
    for name, m in fp8.items():
        assert m.weight.dtype == torch.float8_e4m3fn and m.scale.dtype == torch.float32, name
        assert m.scale.shape == (-(-m.weight.shape[0] // 128), -(-m.weight.shape[1] // 128)), name
        assert torch.isfinite(m.dense_weight()).all() and m.dense_weight().abs().max() > 0, name
    biases = [m.ffn.gate.bias for m in model.layers[1:]]
    assert all(b.dtype == torch.float32 and b.abs().max() > 0 for b in biases)   # moved by the balancing


def test_record_states_corpus_seed_steps_time_figures_and_balance():
    assert RECORD["config"] == "tiny-text" and len(RECORD["corpus"]["sha256"]) == 64
    assert RECORD["train"]["seed"] == T.TrainConfig().seed and RECORD["train"]["steps"] == len(RECORD["loss_curve"])
    assert 0 < RECORD["seconds"]["cpu"] and 0 < RECORD["seconds"]["wall"] <= 60 * 60
    v = RECORD["validation_bits_per_byte"]
    assert 0 < v["float32"] <= v["fp8_weights_and_activations"] < 3.0   # far below 8 (uniform) and ~4.5 (unigram)
    assert abs(v["bf16"] - v["float32"]) < 0.02 and abs(v["fp8_weights"] - v["float32"]) < 0.1
    loads = RECORD["expert_load"]["fractions"]
    assert len(loads) == 2 and all(abs(sum(f) - 1) < 1e-3 and len(f) == 16 for f in loads.values())
    assert all(1 <= r < 2 for r in RECORD["expert_load"]["max_over_mean"].values())   # 1.65 / 1.56 on the validation
    assert all(1 <= r < 1.3 for r in RECORD["expert_load"]["max_over_mean_train_sample"].values())   # 1.07 / 1.18
    assert (T.CHECKPOINT_DIR / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_weights_give_the_recorded_validation_figure_and_expert_load():
    """Validation bits per byte of the committed FP8 checkpoint with FP8 activations, and its experts' load on the
    validation text and on the training sample, recomputed here."""
    data = _same_corpus_or_skip()
    cfg = T.TrainConfig(**RECORD["train"])
    train, val = T.split(data, cfg.val_fraction)
    report = T.expert_load(T.load_trained(attn_impl="naive", gemm_impl="fp8"), train, val, cfg.seq_len)
    assert report["validation_bits_per_byte"] == pytest.approx(
        RECORD["validation_bits_per_byte"]["fp8_weights_and_activations"], abs=2e-4)
    for key in ("max_over_mean", "max_over_mean_train_sample"):
        assert report[key] == pytest.approx(RECORD["expert_load"][key], abs=2e-3), key


def test_training_refuses_another_corpus(capsys):
    assert T.main(["--expect-sha256", "0" * 64, "--out", "/nonexistent"]) == 3
    assert "the corpus differs" in capsys.readouterr().err


@pytest.mark.slow
def test_retraining_with_the_seed_reproduces_the_validation_figure_within_2pct():
    """Reruns the whole training (`python -m dskc.model.train` with the recorded settings: 10-35 min on 2 cores)."""
    data = _same_corpus_or_skip()
    cfg = T.TrainConfig(**RECORD["train"])
    trained, _ = T.train(cfg)
    figures = T.evaluate(trained, data, cfg)["validation_bits_per_byte"]
    for key in ("float32", "fp8_weights_and_activations"):
        assert figures[key] == pytest.approx(RECORD["validation_bits_per_byte"][key], rel=0.02), (key, figures)
