"""Capture a model's forward with Dynamo: whole graphs (fullgraph=True), dynamic batch and sequence length.

`capture(model, calls)` runs each (args, kwargs) call through torch.compile with a recording backend and returns
the FX graphs Dynamo produced. It checks what the compiler relies on: no graph breaks, and decoding token after
token does not recompile (one graph for prefill shapes, one for decode). `module_paths(gm)` lists the modules
whose code each FX graph contains (from nn_module_stack), so regions found by structure can be checked against
what Dynamo actually traced.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import fx


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
    graphs = []

    def record(gm: fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True), \
            torch.inference_mode():
        for args, kwargs in calls:
            compiled(*args, **kwargs)
    return Capture(graphs, len(calls))


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
