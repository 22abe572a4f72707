"""Tensor + expert parallelism: 2 gloo processes on the CPU give the single-process logits."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from dskc.model import Transformer, get_config, init_random, load_checkpoint, save_checkpoint
from dskc.model.parallel import TP, check_parallel, shard_state_dict

WORLD = 2
PREFILL, STEPS = 13, 3
IMPLS = ("absorb", "naive")


def _tokens():
    return torch.randint(0, 1024, (2, PREFILL + STEPS), generator=torch.Generator().manual_seed(9))


def _run(model):
    """Prefill then single-token decode steps; every step's logits stacked [steps + 1, bsz, vocab]."""
    tokens = _tokens()
    out = [model(tokens[:, :PREFILL])]
    out += [model(tokens[:, p:p + 1], p) for p in range(PREFILL, PREFILL + STEPS)]
    return torch.stack(out)


def _worker(rank, port, ckpts, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for attn_impl in IMPLS:
            model = Transformer(get_config("tiny"), attn_impl, dtype=torch.float32)
            assert model.tp == TP(WORLD, rank)
            assert model.layers[0].attn.n_local_heads == 2
            assert sum(e is not None for e in model.layers[1].ffn.experts) == 8
            load_checkpoint(model, ckpts[attn_impl])
            sd = model.state_dict()
            assert sd["layers.0.attn.wq_b.weight"].shape == (256, 128) and f"layers.1.ffn.experts.{8 * rank}.w1.weight" in sd
            torch.save(_run(model), f"{out_dir}/{attn_impl}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_single_process(tmp_path):
    """One spawn (process start-up dominates) checks both attention variants and both deepseek-layout forms:
    absorb loads the world-size-1 file (sharded on load), naive loads per-rank model{r}-mp2 files."""
    want = {}
    for attn_impl in IMPLS:
        model = Transformer(get_config("tiny"), attn_impl, dtype=torch.float32)
        init_random(model, 21)
        want[attn_impl] = _run(model)
    save_checkpoint(model, tmp_path / "mp1")  # world-size-1 file, sharded on load
    (tmp_path / "mp2").mkdir()  # per-rank files as DeepSeek's convert.py writes them
    for rank in range(WORLD):
        part = shard_state_dict(model.state_dict(), model.args, TP(WORLD, rank))
        save_file({k: v.contiguous() for k, v in part.items()}, str(tmp_path / "mp2" / f"model{rank}-mp2.safetensors"))
    ckpts = {"absorb": str(tmp_path / "mp1"), "naive": str(tmp_path / "mp2")}
    mp.spawn(_worker, args=(_free_port(), ckpts, str(tmp_path)), nprocs=WORLD)
    for attn_impl in IMPLS:
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"{attn_impl}-rank{rank}.pt")
            assert got.shape == want[attn_impl].shape == (STEPS + 1, 2, 1024)
            torch.testing.assert_close(got, want[attn_impl], atol=1e-4, rtol=1e-4)


def test_shard_state_dict_splits_like_convert_py():
    args = get_config("tiny")
    model = Transformer(args, dtype=torch.float32)
    init_random(model, 0)
    full = model.state_dict()
    parts = [shard_state_dict(full, args, TP(WORLD, r)) for r in range(WORLD)]
    for name in ["layers.0.attn.wq_b.weight", "layers.0.attn.wq_b.scale", "embed.weight", "head.weight",
                 "layers.1.ffn.shared_experts.w1.weight"]:
        assert torch.equal(torch.cat([p[name].float() for p in parts], 0), full[name].float()), name
    for name in ["layers.0.attn.wo.weight", "layers.0.ffn.w2.scale", "layers.2.ffn.shared_experts.w2.weight"]:
        assert torch.equal(torch.cat([p[name].float() for p in parts], 1), full[name].float()), name
    for name in ["layers.0.attn.wkv_a.weight", "layers.1.ffn.gate.bias", "norm.weight"]:
        assert all(torch.equal(p[name].float(), full[name].float()) for p in parts), name
    assert "layers.1.ffn.experts.7.w1.weight" in parts[0] and "layers.1.ffn.experts.7.w1.weight" not in parts[1]
    assert "layers.1.ffn.experts.8.w1.weight" in parts[1] and "layers.1.ffn.experts.8.w1.weight" not in parts[0]


def test_unsplittable_configs_raise():
    with pytest.raises(ValueError, match="n_heads"):
        check_parallel(get_config("tiny", n_heads=3, dtype="bf16"), TP(2, 0))
    with pytest.raises(ValueError, match="multiples of 128"):
        check_parallel(get_config("tiny"), TP(4, 1))  # wo in: 4 * 64 / 4 = 64 per rank
    with pytest.raises(ValueError, match="rank"):
        check_parallel(get_config("tiny"), TP(2, 2))
