"""A lean decode step: kernels per step of the compiled tiny model (dskc.runtime.counter: Triton launches plus every
non-view aten op on the device), counted on the path CUDA graphs replay (device positions, input checks skipped as
under capture), held to the bounds of issue 17 as a regression guard; and `explain`'s list of what each region
launches equals what runs.

Measured here (CPU, interpreter, tiny fp8, batch 2): a dense layer 12 kernels, a MoE layer 15, the step 46 (embedding
1, the per-step MLA state 1, final norm + head 2); before this work: 97, 122 and 354.
"""
import collections

import pytest
import torch

from dskc import compiler
from dskc.explain import launch_table, step_kernels
from dskc.model import Transformer, get_config, init_random
from dskc.runtime import counter, recorder

DENSE_MAX, MOE_MAX, STEP_MAX = 12, 16, 50


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    model = Transformer(cfg, gemm_impl="fp8")
    init_random(model, seed=0)
    return compiler.compile(model, "sm90a", build_kernels=False, progress=False)


@pytest.fixture(scope="module")
def decode(tiny):
    return counter.count_decode(tiny, batch=2, position=5)


def test_decode_step_within_the_bounds(decode):
    by_type = decode.by_layer_type()
    assert by_type["dense"]["layers"] == 1 and by_type["moe"]["layers"] == 2
    assert by_type["dense"]["total"] <= DENSE_MAX, decode.table()
    assert by_type["moe"]["total"] <= MOE_MAX, decode.table()
    assert decode.total()["total"] <= STEP_MAX, decode.table()
    assert len({c["total"] for c in decode.per_layer("moe")}) == 1          # every MoE layer the same
    assert decode.scopes["step"] == {"triton": 1, "other": 0}, decode.detail["step"]   # the per-step MLA state
    assert decode.detail["norm"] == {} and sum(decode.scopes["head"].values()) == 2   # norm fused into the head
    for scope, names in decode.detail.items():     # nothing but kernels in the layers: no aten op on the device
        if scope.startswith("layers."):
            assert decode.scopes[scope]["other"] == 0, (scope, names)


def _names(pairs) -> collections.Counter:
    return collections.Counter(name for name, _ in pairs)


def _listed(plan, phase, rows) -> collections.Counter:
    bucket = next(b for b in plan.tokens if b >= rows)
    return collections.Counter(n for *_, names in step_kernels(plan, phase, bucket) for n in names)


def test_explain_lists_what_a_decode_step_and_a_prefill_launch(tiny, decode):
    plan = tiny.plan
    launched = collections.Counter({name: n for name, n in sum(decode.detail.values(), collections.Counter()).items()
                                    if name.endswith("_kernel")})
    assert launched == _listed(plan, "decode", 2)
    with torch.inference_mode(), recorder.record(ops=False) as rec:
        tiny(torch.randint(0, tiny.module.args.vocab_size, (1, 9)), 0)
    assert _names(rec.launches) == _listed(plan, "prefill", 9)
    text = launch_table(plan)
    assert "mla_step (per step)" in text and "moe_route_align" in text and "mla_absorb:mla_q_absorb" in text
    assert f"Triton launches per step: decode {sum(_listed(plan, 'decode', 1).values())}" in text
