"""Capture a model's forward with Dynamo: whole graphs (fullgraph=True), dynamic batch and sequence length.

`capture(model, calls)` runs each (args, kwargs) call through torch.compile with a recording backend and returns
the FX graphs Dynamo produced. It checks what the compiler relies on: no graph breaks, and decoding token after
token does not recompile (one graph for prefill shapes, one for decode). `trace` records the same graphs without
running them (so a model on the meta device, with no weights, traces too). `module_paths(gm)` lists the modules
whose code each FX graph contains (from nn_module_stack); `regions_from_fx` keeps the regions the graphs execute
(`dskc.compiler.plan(..., capture="dynamo")`).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import fx

log = logging.getLogger("dskc.capture")


@dataclasses.dataclass
class Capture:
    graphs: list            # fx.GraphModule, in the order Dynamo compiled them
    calls: int              # forward calls made

    @property
    def n_graphs(self) -> int:
        return len(self.graphs)


def capture(model: torch.nn.Module, calls: list[tuple[tuple, dict]]) -> Capture:
    """Run `calls` through `torch.compile(model, fullgraph=True, dynamic=True)`, recording every graph.

    Raises torch._dynamo.exc.Unsupported (a graph break) if the model cannot be captured whole.
    """
    return _record(model, calls, run=True)


def module_paths(gm: fx.GraphModule) -> set[str]:
    """Module paths (as in named_modules) whose code appears in the graph."""
    paths = set()
    for node in gm.graph.nodes:
        for key, _ in (node.meta.get("nn_module_stack") or {}).values():
            path = key.replace("L['self']", "").replace("L['fn']", "").lstrip(".")
            path = path.replace("._modules['", ".").replace("']", "").replace("['", ".")
            if path:
                paths.add(path)
    return paths


class _Traced(Exception):
    """Raised by the recording backend's stub instead of running a traced graph."""


def trace(model: torch.nn.Module, calls: list[tuple[tuple, dict]]) -> Capture:
    """Dynamo's FX graphs for `calls` (fullgraph, dynamic), recorded but never run: each call stops after Dynamo
    handed its graph over. Works on the meta device. Raises torch._dynamo.exc.Unsupported on a graph break."""
    cap = _record(model, calls, run=False)
    torch._dynamo.reset()
    return cap


def _record(model, calls, run: bool) -> Capture:
    """Every graph Dynamo compiles for `calls`; each graph runs eagerly (run=True) or its call stops (run=False)."""
    graphs = []

    def record(gm: fx.GraphModule, example_inputs):
        graphs.append(gm)
        if run:
            return gm.forward

        def stop(*args, **kwargs):
            raise _Traced()
        return stop

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True), \
            torch.inference_mode():
        for args, kwargs in calls:
            try:
                compiled(*args, **kwargs)
            except _Traced:
                pass
    return Capture(graphs, len(calls))


def transformer_calls(model: torch.nn.Module) -> list[tuple[tuple, dict]]:
    """Example calls for a dskc.model.Transformer-like module (model.args with max_seq_len): a prefill of 4
    tokens and a decode step after it, on the model's device."""
    args = getattr(model, "args", None)
    if args is None or not hasattr(args, "max_seq_len"):
        raise ValueError(f"{type(model).__name__} is not a dskc.model.Transformer: pass example_inputs "
                         "(a list of (args, kwargs) calls) to trace it")
    device = next(model.parameters()).device
    return [((torch.zeros(1, 4, dtype=torch.long, device=device), 0), {}),
            ((torch.zeros(1, 1, dtype=torch.long, device=device), 4), {})]


def regions_from_fx(model: torch.nn.Module, cap: Capture):
    """The IR graph of the regions whose code Dynamo's graphs contain (found by structure, as find_regions does,
    and kept only where traced), plus the names of recognised regions the graphs never execute (left out)."""
    from dskc.capture.regions import find_regions
    from dskc.ir.graph import Graph, verify

    traced = set().union(*(module_paths(gm) for gm in cap.graphs)) if cap.graphs else set()
    g = find_regions(model)
    keep = [n for n in g.nodes if n.name in traced or (n.name == "" and cap.graphs)]
    dropped = [n.name for n in g.nodes if n not in keep]
    if not keep:
        raise ValueError(f"Dynamo traced {len(cap.graphs)} graphs of {type(model).__name__} but none executes a "
                         "region dskc recognises")
    if dropped:
        log.info("dskc: %d recognised regions never run in the traced forward (left out): %s", len(dropped),
                 dropped[:8])
    return verify(Graph(tuple(keep))), dropped
