"""Decode steps on device positions (what dskc.runtime.graphs captures in CUDA graphs).

On a CPU there is no graph to capture; the device-position step itself runs through the interpreter and must give
exactly the logits of the compiled model's own forward (same kernels, positions from a tensor instead of an int).
The GPU test replays graphs against the plain compiled forward.
"""
import pytest
import torch

from dskc import compiler
from dskc.model import Transformer, generate, get_config, init_random
from dskc.runtime.graphs import DecodeGraphs, decode_step


def _compiled_pair(dtype_cfg):
    cfg = get_config("tiny", dtype=dtype_cfg)
    model = Transformer(cfg, gemm_impl="fp8" if dtype_cfg == "fp8" else "bf16")
    init_random(model, seed=5)
    return cfg, [compiler.compile(model, "sm90a", build_kernels=False, progress=False) for _ in range(2)]


@pytest.mark.parametrize("dtype_cfg", ["fp8", "bf16"])
def test_device_position_step_equals_the_compiled_forward(dtype_cfg):
    cfg, (a, b) = _compiled_pair(dtype_cfg)
    gen = torch.Generator().manual_seed(6)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=gen)
    with torch.inference_mode():
        a(prompt, 0), b(prompt, 0)
        for pos in (5, 6, 7):
            tok = torch.randint(0, cfg.vocab_size, (2, 1), generator=gen)
            want = a(tok, pos)
            got = decode_step(b.module, tok, torch.full((2,), pos, dtype=torch.int32))
            assert torch.isfinite(got).all()
            assert torch.equal(got, want), (pos, (got - want).abs().max())


def test_device_positions_are_checked_and_graphs_skip_what_they_cannot_serve():
    cfg, (a, _) = _compiled_pair("bf16")
    with pytest.raises(ValueError, match="one token per sequence"), torch.inference_mode():
        decode_step(a.module, torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, dtype=torch.int64))
    graphs = DecodeGraphs(a.module, cfg.max_batch_size, cfg.max_seq_len)
    assert graphs(torch.zeros(2, 1, dtype=torch.long), 3) is None          # CPU tensors: the plain forward runs
    assert graphs(torch.zeros(2, 4, dtype=torch.long), 0) is None          # a prefill
    with pytest.raises(ValueError, match="KernelMLA"):
        eager = Transformer(cfg, device="meta")
        DecodeGraphs(eager, cfg.max_batch_size, cfg.max_seq_len)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_graphs_replay_the_compiled_forward():
    cfg = get_config("tiny")
    model = Transformer(cfg, device="cuda")
    init_random(model, seed=5)
    plain = compiler.compile(model, "auto", cuda_graphs=False, progress=False)
    graphed = compiler.compile(model, "auto", progress=False)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    assert generate(graphed.module, prompts, 12) == generate(plain.module, prompts, 12)
    assert graphed.module.decode_graphs.replays > 0 and set(graphed.module.decode_graphs.graphs) == {2}
