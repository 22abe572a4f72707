"""Every combination of the lowering's pass switches either compiles the tiny model and keeps its numerics, or is
refused at compile with a clear error (before anything is built or any module replaced).

Numerics: a prefill then a decode step of the compiled model against a float64 eager reference with the same FP8
recipe (1x128 activation quantisation); bound: the eager bf16 model's own error against that reference, times
three (e4m3 steps flip under any rounding change and compound over layers: README "two commands"), or 0.3.
quantize_weights also quantises the bf16 LM head to FP8 blocks, an error the reference does not make: it gets the
bound too (measured: see the assertion message on failure).
"""
import itertools

import pytest
import torch

from dskc import compiler
from dskc.lower.passes import Options
from dskc.model import Transformer, get_config, init_random

GRID = [Options(q, a, f) for q, a, f in itertools.product((False, True), repeat=3)]


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    model = Transformer(cfg)
    init_random(model, seed=3)
    ref = Transformer(cfg, dtype=torch.float64, gemm_impl="fp8")
    ref.load_state_dict(model.state_dict())
    eager = Transformer(cfg, gemm_impl="fp8")
    eager.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(4)
    toks = torch.randint(0, cfg.vocab_size, (1, 5), generator=gen), torch.randint(0, cfg.vocab_size, (1, 1), generator=gen)
    return model, _logits(ref, toks), _logits(eager, toks), toks


def _logits(model, toks):
    with torch.inference_mode():
        return torch.cat([model(toks[0], 0).double(), model(toks[1], 5).double()])


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("opt", GRID, ids=lambda o: f"q{int(o.quantize_weights)}a{int(o.absorb_mla)}"
                                                    f"f{int(o.fuse_block_norms)}")
def test_options_compile_and_keep_numerics_or_are_refused(tiny, opt):
    model, ref, eager, toks = tiny
    if not opt.absorb_mla:
        with pytest.raises(ValueError, match=r"absorb_mla=False\): dskc's MLA kernels run the absorbed form only"):
            compiler.compile(model, "sm90a", options=opt, build_kernels=False, progress=False, tokens=(1, 8))
        return
    compiled = compiler.compile(model, "sm90a", options=opt, build_kernels=False, progress=False, tokens=(1, 8))
    assert compiled.plan.fallbacks == []
    got = _logits(compiled, toks)
    bound = max(0.3, 3 * _rel(eager, ref))
    assert torch.isfinite(got).all() and _rel(got, ref) < bound, (_rel(got, ref), _rel(eager, ref))
