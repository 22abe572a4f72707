"""What dskc selects is what runs: every launch of a compiled model's prefill and decode steps is the plan's.

Recorded while the model runs (interpreter): each kernel module's config-table lookup (region, slot, bucket, stem,
config) and every Triton launch (kernel, constexprs, warps, stages, argument types). The lookups must be the plan's
choices for (region, slot, bucket); the launched kernels must be exactly the kernels those choices bind
(stem.compile_specs of the plan's problem and config), with the same pointer types; and the plan must hold no
choice that no step used at the buckets the steps hit. Models: the tiny config and a shrunk deepseek-v3-structured
one (3 dense layers' worth of structure in fewer layers: group-limited sigmoid routing with a bias, one shared
expert, q_lora), at several token counts.
"""
import pytest
import torch

from dskc import compiler
from dskc.model import Transformer, get_config, init_random
from dskc.templates import registry

from _launches import record, steps

# (bsz, prompt length): prefills of 1x1 (a one-token prompt runs as a decode step) and 3x6 (18 rows: past the last
# bucket, its config), a decode step each (rows 1 and 3: bucket 4); the LM head sees 1 and 3 rows
BATCHES = [(1, 1), (3, 6)]
TOKENS = (1, 4, 16)


def _v3_shrunk():
    return get_config("deepseek-v3", max_batch_size=4, max_seq_len=128, vocab_size=512, dim=256, inter_dim=512,
                      moe_inter_dim=128, n_layers=2, n_dense_layers=1, n_heads=2, n_routed_experts=16,
                      n_expert_groups=4, n_limited_groups=2, n_activated_experts=4, q_lora_rank=128,
                      gate_bias=True)


def _spec_key(spec) -> tuple:
    return spec.kernel, tuple(sorted(spec.constexprs)), spec.num_warps, spec.num_stages


def _run(cfg):
    model = Transformer(cfg)
    init_random(model, seed=0)
    compiled = compiler.compile(model, "sm90a", build_kernels=False, progress=False, tokens=TOKENS)
    assert compiled.plan.fallbacks == []
    with record() as rec:
        outs = steps(compiled, BATCHES, cfg.vocab_size)
    assert all(torch.isfinite(o).all() for o in outs)
    return compiled.plan, rec


@pytest.mark.parametrize("name", ["tiny", "v3-shrunk"])
def test_every_launch_is_the_plans(name):
    plan, rec = _run(get_config("tiny") if name == "tiny" else _v3_shrunk())
    table = {(c.region, c.slot, c.tokens): c for c in plan.choices}
    used = set()
    for region, slot, bucket, stem, config in rec.lookups:
        c = table[(region, slot, bucket)]
        assert (stem, config) == (c.stem, c.config), (region, slot, bucket)
        used.add((region, slot, bucket))
    # every planned (region, slot) ran, and every planned bucket was reached
    assert {k[:2] for k in table} == {k[:2] for k in used}
    assert {k[2] for k in used} == set(TOKENS)
    # the kernels launched are exactly those the used choices bind, with the plan's pointer types
    bound = {}
    for key in used:
        c = table[key]
        for spec in registry.get(c.stem).compile_specs(dict(c.problem), dict(c.config)):
            bound[_spec_key(spec)] = spec
    launched = {}
    for k in rec.kernels:
        key = (k["function"], tuple(sorted(k["constexprs"].items())), k["num_warps"], k["num_stages"])
        launched.setdefault(key, k)
    assert set(launched) == set(bound), (sorted(set(launched) ^ set(bound)))[:4]
    for key, k in launched.items():
        sig = dict(bound[key].signature)
        ptrs = {n: a["type"] for n, a in k["args"].items() if a["type"].startswith("*")}
        assert ptrs == {n: sig[n] for n in ptrs}, (key[0], ptrs, sig)


def test_explain_shows_what_runs_per_bucket():
    from dskc.explain import render

    model = Transformer(get_config("deepseek-v3"), device="meta")
    text = render(compiler.plan(model, "sm90a", tokens=(1, 4096)), passes=False)
    section = text.split("== configs per token-count bucket")[1]
    assert "tokens<=1" in section and "tokens<=4096" in section
    row = next(line for line in section.splitlines() if line.startswith("layers.*.attn.wo ") and "fp8_gemm" in line)
    # the tuning-free rule: 64-row tiles (one wgmma) with narrow N for one token, 128 x 128 for 4096 (waves over
    # 132 SMs, as DeepGEMM picks its blocks)
    first, last = row.split("fp8_gemm_1d2d")[1].split()[0], row.split()[-1]
    assert "M64,N64," in first and "M128,N128," in last, (first, last)


def test_a_kernel_that_does_not_build_marks_every_region_launching_it(monkeypatch):
    from dskc.build.triton_xc import CompileError

    p = compiler.plan(Transformer(get_config("tiny"), device="meta"), "sm90a", tokens=(1, 16))
    victim = next(c for c in p.choices if c.slot == "gemm" and c.region.endswith("attn.wo"))
    bad = set(registry.get(victim.stem).compile_specs(dict(victim.problem), dict(victim.config)))
    users = {c.region for c in p.choices
             if bad & set(registry.get(c.stem).compile_specs(dict(c.problem), dict(c.config)))}
    assert len(users) > 1                       # the three wo's at least: one failed build, many regions
    monkeypatch.setattr(compiler, "compile_kernels",
                        lambda specs, arch: [CompileError("made up") if s in bad else None for s in specs])
    compiler.build(p, progress=False)
    assert {r for r, _ in p.fallbacks} == users
    assert all("does not build for sm90a: made up" in why for _, why in p.fallbacks)
