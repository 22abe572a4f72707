"""Dynamo captures the dskc model whole, for prefill and decode, without recompiling per decode step."""
import torch

from dskc.capture.dynamo import capture, module_paths
from dskc.capture.regions import find_regions
from dskc.ir.graph import Op
from dskc.lower.passes import lower
from dskc.model import Transformer, get_config, init_random


def test_tiny_captured_whole_prefill_and_decode_without_recompiles():
    cfg = get_config("tiny")
    model = Transformer(cfg)
    init_random(model, seed=0)
    torch.manual_seed(0)
    calls = [((torch.randint(0, cfg.vocab_size, (2, 9)), 0), {})]
    calls += [((torch.randint(0, cfg.vocab_size, (2, 1)), 9 + i), {}) for i in range(3)]
    calls += [((torch.randint(0, cfg.vocab_size, (3, 5)), 0), {})]   # another batch and prompt length
    cap = capture(model, calls)
    # one graph for prefill shapes, one for decode (seqlen 1 takes the mask-free path); none per step or shape
    assert cap.n_graphs == 2, [g.graph for g in cap.graphs]
    seen = set().union(*(module_paths(g) for g in cap.graphs))
    graph = lower(find_regions(model))
    lowered = [n.name for n in graph.nodes
               if n.op in (Op.MLA, Op.MOE, Op.MLP, Op.FP8_LINEAR) and not n.attr("absorbed_into")]
    assert len(lowered) > 10
    missing = [r for r in lowered if r not in seen]
    assert not missing, f"regions not in the captured graphs: {missing[:5]} (graph saw e.g. {sorted(seen)[:5]})"
