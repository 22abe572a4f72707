"""Regions in a Dynamo FX graph, through the same family table the module-tree walk reads.

Dynamo tags every node with the stack of modules whose code produced it (`nn_module_stack`: key -> (path, type)).
The module instances come from the frame Dynamo is compiling (its locals: `L['self']` is the compiled module), so
each module on a stack can be classified by the table exactly as dskc.compile classifies it in the module tree;
a region's FX nodes are the nodes whose stack holds its module.

Also here: the graph surgery the backend does with a region (its inputs and outputs, the nodes a replaced output
leaves dead, including in-place writes into buffers only they use).
"""
from __future__ import annotations

import dataclasses
import operator
import re

import torch
from torch import fx

from dskc.capture.family import Unservable
from dskc.capture.families import classify
from dskc.capture.regions import covered_children

_BASE = re.compile(r"^([LG])\['([^']+)'\]")


def frame_scope() -> tuple[dict, dict]:
    """(locals, globals) of the frame Dynamo is compiling now ({} outside a Dynamo compile)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
    except Exception:   # noqa: BLE001 - another torch: no frame, so no module instances (regions stay unresolved)
        return {}, {}
    return (dict(tx.f_locals), dict(tx.f_globals)) if tx is not None else ({}, {})


def normalise(path: str) -> tuple[str, str]:
    """("L['self']", "model.layers.0.mlp") from an nn_module_stack path in any of Dynamo's spellings."""
    m = _BASE.match(path)
    if m is None:
        return "", path
    rest = path[m.end():].replace("._modules['", ".").replace("']", "").replace("['", ".")
    return m.group(0), rest.lstrip(".")


def resolve(path: str, scope: tuple[dict, dict]):
    """The module an nn_module_stack path names, or None."""
    base, rest = normalise(path)
    if not base:
        return None
    obj = (scope[0] if base.startswith("L") else scope[1]).get(base[3:-2])
    for part in filter(None, rest.split(".")):
        obj = getattr(obj, part, None) if not part.isdigit() else _item(obj, int(part))
        if obj is None:
            return None
    return obj if isinstance(obj, torch.nn.Module) else None


def _item(obj, i):
    try:
        return obj[i]
    except (TypeError, IndexError, KeyError):
        return getattr(obj, str(i), None)


def stack(node: fx.Node) -> list[tuple[str, str]]:
    """[(key, path)] of the modules whose code produced `node`, outermost first."""
    return [(k, v[0]) for k, v in (node.meta.get("nn_module_stack") or {}).items()]


@dataclasses.dataclass
class FxRegion:
    key: str              # the nn_module_stack key of the module's call
    path: str             # its module path below the compiled root ("model.layers.1.mlp")
    module: torch.nn.Module
    family: object        # the table's row
    spec: object          # the row's spec, or Unservable
    nodes: list           # the FX nodes its call produced, in graph order


def find(gm: fx.GraphModule, scope: tuple[dict, dict]) -> list[FxRegion]:
    """Every region whose module's code the graph holds (outermost first; children a region covers are not
    regions of their own), in graph order."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    calls, order = {}, []
    for n in nodes:
        for key, path in stack(n):
            if key not in calls:
                calls[key] = (path, [])
                order.append(key)
            calls[key][1].append(n)
    out, covered = [], []
    root = scope[0].get("self")
    got = classify(root) if isinstance(root, torch.nn.Module) else None
    if got is not None:   # the compiled module is a region itself: its own code carries no stack entry
        family, spec = got
        out.append(FxRegion("", "", root, family, spec, nodes))
        covered.extend(covered_children(family, spec, root))
    for key in order:
        path, members = calls[key]
        rel = normalise(path)[1]
        if any(rel == c or rel.startswith(c + ".") for c in covered):
            continue
        module = resolve(path, scope)
        got = classify(module) if module is not None else None
        if got is None:
            continue
        family, spec = got
        out.append(FxRegion(key, rel, module, family, spec, members))
        covered.extend(f"{rel}.{c}" if rel else c for c in covered_children(family, spec, module))
    return out


# ------------------------------------------------------------------ graph surgery

_VIEWS = {"view", "reshape", "transpose", "expand", "permute", "unsqueeze", "squeeze", "contiguous", "flatten",
          "__getitem__", "narrow", "select", "t", "view_as", "split", "chunk", "unflatten"}


def _is_inplace(n: fx.Node) -> bool:
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return n.target is operator.setitem or (name.endswith("_") and not name.startswith("_")) or \
        getattr(getattr(n.target, "_schema", None), "is_mutable", False)


def base(n):
    """The tensor a view chain starts from (getitem / view / transpose ... followed back)."""
    while isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and n.args and (
            (n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")) in _VIEWS
            or n.target is operator.getitem):
        n = n.args[0]
    return n


def value(n):
    return n.meta.get("example_value") if isinstance(n, fx.Node) else None


def external_inputs(region_nodes) -> list[fx.Node]:
    """Nodes outside the region that its nodes read, in first-use order."""
    inside, seen = set(region_nodes), {}
    for n in region_nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                seen.setdefault(a, None)
    return list(seen)


def outputs(region_nodes) -> list[fx.Node]:
    """Region nodes read outside the region (or by the graph's output). Sizes (SymInt arithmetic on the graph's
    symbolic sizes, which Dynamo computes once and reuses in later layers) are not outputs when no tensor of the
    region feeds them: they stay where they are."""
    inside = set(region_nodes)
    return [n for n in region_nodes if any(u not in inside for u in n.users) and not _size_only(n, inside)]


def _size_only(n: fx.Node, inside: set) -> bool:
    """A non-tensor node computed from sizes alone (no tensor of the region among its ancestors in the region)."""
    todo, seen = [n], set()
    while todo:
        x = todo.pop()
        if x in seen or x not in inside:
            continue
        seen.add(x)
        if isinstance(value(x), torch.Tensor):
            return False
        todo.extend(x.all_input_nodes)
    return True


def writes_outside(region_nodes) -> list[fx.Node]:
    """In-place writes of the region into tensors it did not create (erasing those would lose a side effect)."""
    inside = set(region_nodes)
    return [n for n in region_nodes if _is_inplace(n) and n.args and isinstance(n.args[0], fx.Node)
            and base(n.args[0]) not in inside]


def sweep(gm: fx.GraphModule, region_nodes) -> int:
    """Erase the region's nodes nothing live reads any more (after its output was replaced), in-place writes into
    dead buffers included. Returns how many went."""
    inside = list(region_nodes)
    live = {n for n in inside if any(u not in set(inside) for u in n.users)}
    changed = True
    while changed:
        changed = False
        for n in inside:
            if n in live:
                continue
            if any(u in live for u in n.users) or (_is_inplace(n) and n.args and base(n.args[0]) in live):
                live.add(n)
                changed = True
    dead = [n for n in reversed(inside) if n not in live]
    for n in dead:
        for u in list(n.users):
            if u not in dead:
                raise RuntimeError(f"dskc: {n} is still read by {u} after its region was replaced")
    for n in dead:
        gm.graph.erase_node(n)
    return len(dead)


def unservable(spec) -> bool:
    return isinstance(spec, Unservable)
