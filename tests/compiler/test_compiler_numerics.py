"""The compiled tiny model against eager: a prefill and 16 greedy decode steps, on generated kernels (the Triton
interpreter on a CPU). The reference is the eager model in float64 with the same weights (and, for FP8, the same
1x128 activation quantisation).

Without FP8 (bf16 weights, fp16 compute) the compiled model must stay within 5e-3 and pick the same greedy tokens.
With FP8 weights and activations, a random-weight model is chaotic under any rounding change (a one-ulp flip of an
e4m3 input moves it by 1/16, and top-k routing amplifies it): eager bf16 itself lands 8-45 % from float64, so the
compiled model is held to doing no worse than eager bf16.
"""
import statistics

import pytest
import torch

from dskc import compiler
from dskc.model import Transformer, get_config, init_random

STEPS = 16


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _run(dtype_cfg: str, compute=torch.bfloat16):
    cfg = get_config("tiny", dtype=dtype_cfg)
    impl = "fp8" if dtype_cfg == "fp8" else "bf16"
    eager = Transformer(cfg, gemm_impl=impl, dtype=compute)
    init_random(eager, seed=3)
    ref = Transformer(cfg, dtype=torch.float64, gemm_impl=impl)
    ref.load_state_dict(eager.state_dict())
    compiled = compiler.compile(eager, "sm90a", build_kernels=False, progress=False)
    torch.manual_seed(4)
    tok, pos = torch.randint(0, cfg.vocab_size, (1, 7)), 0
    errs, eager_errs, agree = [], [], []
    with torch.inference_mode():
        for _ in range(STEPS + 1):
            r, e = ref(tok, pos), eager(tok, pos)
            c = compiled(torch.full_like(tok, -1).copy_(tok), pos)  # a fresh input tensor each call
            assert torch.isfinite(c).all()
            errs.append(_rel(c, r))
            eager_errs.append(_rel(e, r))
            agree.append(bool(c.argmax(-1) == e.argmax(-1)))
            pos += tok.shape[1]
            tok = r.argmax(-1, keepdim=True)  # teacher-forced on the reference's greedy choice
    return errs, eager_errs, agree, compiled


@pytest.fixture(scope="module")
def half_run():
    return _run("bf16", compute=torch.float16)


@pytest.fixture(scope="module")
def fp8_run():
    return _run("fp8")


def test_without_fp8_within_5e3_and_same_greedy_tokens(half_run):
    errs, eager_errs, agree, compiled = half_run
    assert compiled.plan.fallbacks == []
    # measured here: compiled <= 1.6e-3 at every step, eager fp16 <= 2.1e-3
    assert max(errs) < 5e-3, errs
    assert all(agree), agree


def test_fp8_weights_and_activations_as_close_as_eager_bf16(fp8_run):
    errs, eager_errs, agree, compiled = fp8_run
    assert compiled.plan.fallbacks == []
    # 1x128 e4m3 activations make a random-weight model sensitive: a one-ulp flip of an input moves a value by
    # 1/16; eager bf16 itself lands 8-45 % from float64 here. The compiled model must do no worse.
    assert statistics.median(errs) <= 1.25 * statistics.median(eager_errs)
    assert max(errs) <= 1.25 * max(eager_errs) + 1e-2
    assert statistics.median(errs) < 0.2


def test_compiled_model_keeps_call_signature_and_modules(half_run):
    *_, compiled = half_run
    from dskc.runtime.mla import KernelMLA
    from dskc.runtime.modules import KernelLinear, KernelMoE
    mods = dict(compiled.module.named_modules())
    assert isinstance(mods["layers.0.attn"], KernelMLA) and isinstance(mods["layers.1.ffn"], KernelMoE)
    assert isinstance(mods["head"], KernelLinear)
    with pytest.raises(ValueError, match="max_seq_len"):
        compiled(torch.zeros(1, 1, dtype=torch.long), 10_000)
