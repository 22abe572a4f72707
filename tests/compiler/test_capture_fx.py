"""Regions from Dynamo's FX graphs (`plan(..., capture="dynamo")`): traced without running (meta device works),
only what the forward executes is lowered, a graph break is an error."""
import pytest
import torch
import torch.nn as nn

from dskc import compiler
from dskc.explain import render
from dskc.model import Transformer, get_config


def _kernels(p):
    return sorted((c.region, c.stem, c.problem) for c in p.choices)


@pytest.fixture(scope="module")
def tiny_plans():
    model = Transformer(get_config("tiny"), device="meta")
    return compiler.plan(model, "sm90a"), compiler.plan(model, "sm90a", capture="dynamo")


def test_dynamo_capture_lowers_the_same_kernels_as_the_module_tree(tiny_plans):
    by_module, by_fx = tiny_plans
    assert by_fx.capture["graphs"] == 2 and by_fx.fallbacks == []        # prefill + decode, fullgraph
    assert _kernels(by_fx) == _kernels(by_module)
    # absorbed MLA reads wkv_b's weight without calling the module: the graphs never run it
    assert by_fx.capture["not_run"] == [f"layers.{i}.attn.wkv_b" for i in range(3)]
    text = render(by_fx, passes=False)
    assert "Dynamo FX graphs" in text and "layers.0.attn.wkv_b" in text


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(256, 128, bias=False, dtype=torch.bfloat16)
        self.unused = nn.Linear(256, 256, bias=False, dtype=torch.bfloat16)

    def forward(self, x):
        return self.used(x)


class _Breaks(_WithUnused):
    def forward(self, x):
        torch._dynamo.graph_break()
        return self.used(x)


def test_a_region_the_forward_never_runs_is_not_lowered():
    model = _WithUnused()
    calls = [((torch.randn(3, 256, dtype=torch.bfloat16),), {})]
    p = compiler.plan(model, "sm90a", capture="dynamo", example_inputs=calls)
    assert [n.name for n in p.graph.nodes] == ["used"] and p.capture["not_run"] == ["unused"]
    assert {c.region for c in compiler.plan(model, "sm90a").choices} == {"used", "unused"}


def test_graph_break_and_bad_capture_are_clear_errors():
    calls = [((torch.randn(3, 256, dtype=torch.bfloat16),), {})]
    with pytest.raises(ValueError, match="graph break"):
        compiler.plan(_Breaks(), "sm90a", capture="dynamo", example_inputs=calls)
    with pytest.raises(ValueError, match="example_inputs"):
        compiler.plan(_WithUnused(), "sm90a", capture="dynamo")
    with pytest.raises(ValueError, match="capture must be"):
        compiler.plan(_WithUnused(), "sm90a", capture="fx")
