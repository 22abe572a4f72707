"""`torch.compile(model, backend="dskc")`: the regions of the family table (dskc.capture.families) found in the FX
graph Dynamo hands over become dskc custom ops (dskc.runtime.fx_ops), each linear dskc can serve becomes
`dskc::linear` / `dskc::fp8_linear`, and the rest of the graph goes to Inductor (aot_eager where Inductor cannot
run). Models dskc did not write keep their code: transformers' DeepSeek-V2/V3, Qwen2/3-MoE and Mixtral MoE blocks
run on fused_moe, their SwiGLU MLPs on the stacked [gate; up] GEMM, DeepSeek's attention core on mla_decode (its
projections as linears, wkv_b absorbed; transformers' cache read as it is).

Options (`torch.compile(m, backend="dskc", options={...})` or `DskcBackend(...)`):
  fp8=True               FP8 128x128 weights quantised at compile time (DeepSeek's recipe) for the MoE, MLP and
                         linear GEMMs (1x128 activations quantised on the fly); default: the model's dtype
  compute_dtype="bf16"   run the regions of a float32 model in bf16 (default: left on Inductor, with the reason)
  rest="aot_eager"       the rest of the graph on aot_eager instead of Inductor
`report()` prints what each graph got (dskc.explain.RegionRecord per region: kind, module path, family, lowered,
kernels, reason). Region ops are forward-only: a graph that needs gradients keeps its regions on Inductor (linears
keep a PyTorch backward). A MoE written as a loop over experts with `torch.where` breaks Dynamo's graph unless
`torch._dynamo.config.capture_dynamic_output_shape_ops = True`.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging

import torch
import torch.nn.functional as F
from torch import fx

from dskc.capture import fx as fxr
from dskc.capture import layouts
from dskc.capture.regions import node_of
from dskc.explain import RegionRecord, region_table
from dskc.ir.graph import Graph, Op
from dskc.logs import warn_once
from dskc.lower.passes import Options, lower
from dskc.runtime import fx_ops  # noqa: F401  (registers the dskc:: ops)
from dskc.runtime import weights
from dskc.runtime.modules import dot_dtype

log = logging.getLogger("dskc.runtime")  # where warn_once reports (as before)

_LINEARS = (F.linear, torch._C._nn.linear)
_KNOWN_LEFT = {F.scaled_dot_product_attention: "standard attention (SDPA): no dskc kernel; Inductor's",
               torch.where: "data-dependent routing (torch.where) in a loop over experts: left to Inductor"}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    fp8: bool = False
    compute_dtype: str | None = None
    rest: str = "inductor"

    @classmethod
    def parse(cls, options: dict | None, base: "BackendOptions") -> "BackendOptions":
        opts = dict(options or {})
        unknown = set(opts) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"dskc backend options {sorted(unknown)} unknown; known: fp8, compute_dtype, rest")
        out = dataclasses.replace(base, **opts)
        if out.rest not in ("inductor", "aot_eager"):
            raise ValueError(f"rest must be 'inductor' or 'aot_eager', got {out.rest!r}")
        if out.compute_dtype not in (None, "bf16", "fp16"):
            raise ValueError(f"compute_dtype must be None, 'bf16' or 'fp16', got {out.compute_dtype!r}")
        return out


@dataclasses.dataclass
class GraphReport:
    regions: list             # RegionRecord per region / linear / known op of the graph
    compiler: str             # "inductor" | "aot_eager" (the rest of the graph)

    @property
    def lowered(self) -> list:
        return [r.path for r in self.regions if r.lowered]

    @property
    def left(self) -> list:
        return [(r.path, r.reason) for r in self.regions if not r.lowered]


class RegionError(ValueError):
    """The graph does not hold a region the way dskc replaces it (the region stays on Inductor, with the reason)."""


class _Lowering:
    """One FX graph being lowered: its weights registered as graph constants, its records."""

    def __init__(self, gm: fx.GraphModule, example_inputs, opts: BackendOptions):
        self.gm, self.opts, self.records = gm, opts, []
        self.inputs = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
        self.grad = torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in example_inputs)
        self.eager = set()    # FX nodes of regions never half-lowered (their linears stay too)
        self._names = itertools.count()

    def const(self, t: torch.Tensor | None):
        """A get_attr node for a weight laid out at compile time (None stays None)."""
        if t is None:
            return None
        from torch._dynamo.source import ConstantSource
        name = f"dskc_w{next(self._names)}"
        self.gm.register_buffer(name, t, persistent=False)
        if hasattr(self.gm, "_param_name_to_source"):   # aot_autograd lifts graph constants by their source
            self.gm._param_name_to_source[name] = ConstantSource(name)
        return self.gm.graph.get_attr(name)

    def compute(self, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype a region of activation dtype `dtype` computes in, or None (not served)."""
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
        return _DTYPES.get(self.opts.compute_dtype) if dtype == torch.float32 else None


def _activation(low: _Lowering, r: fxr.FxRegion) -> fx.Node:
    """The region's one activation input (graph inputs that are the model's state, and sizes, excluded)."""
    xs = [a for a in fxr.external_inputs(r.nodes) if isinstance(fxr.value(a), torch.Tensor)
          and not (a.op == "placeholder" and _is_state(a, low))]
    if len(xs) != 1:
        raise RegionError(f"the region reads {len(xs)} activations ({[a.name for a in xs][:4]}), dskc's op takes one")
    return xs[0]


def _is_state(node: fx.Node, low: _Lowering) -> bool:
    """A graph input holding the model's state (a parameter, buffer or attribute of a module), not an activation."""
    arg = node.meta.get("grapharg")
    name = getattr(getattr(arg, "source", None), "name", "")
    name = name() if callable(name) else name
    return isinstance(low.inputs.get(node), torch.nn.Parameter) or "._modules[" in name or \
        "._parameters[" in name or "._buffers[" in name


def _single_output(r: fxr.FxRegion) -> fx.Node:
    outs = fxr.outputs(r.nodes)
    if len(outs) != 1:
        raise RegionError(f"the region's code is read outside it at {len(outs)} places ({[o.name for o in outs][:4]})")
    if fxr.writes_outside(r.nodes):
        raise RegionError("the region writes into a tensor it did not create (in place)")
    return outs[0]


def _weights_args(low, tensors) -> list:
    return [low.const(t) if t is not None else None for t in tensors]


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = fxr.value(a), fxr.value(b)
    return va is not None and vb is not None and [str(d) for d in va.shape] == [str(d) for d in vb.shape]


def _lower_ffn(low: _Lowering, r: fxr.FxRegion, node, kd: torch.dtype) -> None:
    """A MoE or MLP region -> dskc::moe / dskc::mlp on its one activation."""
    x, out = _activation(low, r), _single_output(r)
    if not _same_shape(x, out):
        raise RegionError("the region's output is not shaped like its input")
    quantize = node.attr("quantized") == "ahead"
    w = layouts.layout(r.module, r.spec, quantize, kd)
    with low.gm.graph.inserting_before(out):
        if node.op is Op.MLP:
            args = [x] + _weights_args(low, (w.up.weight, w.up.scale, w.down.weight, w.down.scale))
            new = low.gm.graph.call_function(torch.ops.dskc.mlp.default, tuple(args))
        else:
            sh = w.shared
            ts = (w.gate, w.gate_bias, w.w13, w.w13_scale, w.w2, w.w2_scale) + (
                (sh.up.weight, sh.up.scale, sh.down.weight, sh.down.scale) if sh else (None,) * 4) + (w.shared_gate,)
            route = (node.attr("top_k"), node.attr("n_groups"), node.attr("topk_groups"), node.attr("score_func"),
                     float(node.attr("route_scale")), bool(node.attr("renorm")))
            new = low.gm.graph.call_function(torch.ops.dskc.moe.default, tuple([x] + _weights_args(low, ts)) + route)
    _swap(low, r, out, new)


def _swap(low, r, out, new) -> None:
    new.meta = {k: v for k, v in out.meta.items() if k in ("example_value", "val", "nn_module_stack", "stack_trace")}
    out.replace_all_uses_with(new)
    fxr.sweep(low.gm, r.nodes)


def _linear_in(r: fxr.FxRegion, child: str) -> fx.Node:
    want = f"{r.path}.{child}" if r.path else child
    hits = [n for n in r.nodes if n.op == "call_function" and n.target in _LINEARS and fxr.stack(n)
            and fxr.normalise(fxr.stack(n)[-1][1])[1] == want]
    if len(hits) != 1:
        raise RegionError(f"{len(hits)} calls of {child} in the graph (one expected)")
    return hits[0]


def _rope_key(r: fxr.FxRegion, key_states: fx.Node, nope: int) -> fx.Node:
    """The full rotated rope key [B, 1, L, R] that transformers copies into key_states[..., nope:]."""
    for n in r.nodes:
        if n.op == "call_method" and n.target == "copy_" and isinstance(n.args[0], fx.Node):
            dst = n.args[0]
            idx = dst.args[1] if dst.op == "call_function" and len(dst.args) > 1 else None
            sl = idx[-1] if isinstance(idx, tuple) and idx else idx
            if fxr.base(dst) is key_states and isinstance(sl, slice) and sl.start == nope:
                return fxr.base(n.args[1])
    raise RegionError("no copy of the rope key into the keys (transformers' expand_kv) in the graph")


def _lower_mla(low: _Lowering, r: fxr.FxRegion, node, kd: torch.dtype) -> None:
    """transformers' DeepSeek attention: its SDPA core (with wkv_b's expansion) -> dskc::mla_attend over the
    latent cache the graph holds; projections, norms, RoPE and the cache write stay (linears lower on their own)."""
    spec = r.spec
    sdpa = [n for n in r.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    if len(sdpa) != 1:
        raise RegionError("no SDPA call in the attention (dskc matches transformers' 'sdpa' attention "
                          "implementation; load the model with attn_implementation='sdpa')")
    s = sdpa[0]
    q, k = s.args[0], s.args[1]
    mask = s.kwargs.get("attn_mask", s.args[3] if len(s.args) > 3 else None)
    if s.kwargs.get("dropout_p", 0.0) not in (0, 0.0):
        raise RegionError("attention dropout")
    kv = _linear_in(r, spec.names["kv_b"]).args[0]
    kr = _rope_key(r, k, spec.nope)
    o = _linear_in(r, spec.names["o"])
    core = o.args[0]
    w = layouts.mla(r.module, spec, kd)
    with low.gm.graph.inserting_before(o):
        args = (q, kv, kr, mask, low.const(w.w_uk), low.const(w.w_uv), float(spec.scale))
        new = low.gm.graph.call_function(torch.ops.dskc.mla_attend.default, args)
    _swap(low, r, core, new)


_LOWER = {Op.MOE: _lower_ffn, Op.MLP: _lower_ffn, Op.MLA: _lower_mla}


def _stems(node, compute: torch.dtype) -> tuple:
    """The kernels a region's op launches: what dskc.compile plans for the same IR node (dskc.select.launches)."""
    from dskc.select.launches import Context, launches
    ctx = Context({torch.bfloat16: "bf16", torch.float16: "fp16"}[compute],
                  "gpu" if torch.cuda.is_available() else "cpu")
    return tuple(sorted({stem for t in (1, 16) for _, stem, _ in launches(node, t, ctx)}))


def _why_left(low: _Lowering, r: fxr.FxRegion, dt: torch.dtype | None) -> str | None:
    if fxr.unservable(r.spec):
        return str(r.spec)
    if low.grad:
        return ("the graph needs gradients (grad mode, parameters requiring grad): dskc's region ops are "
                "forward-only; run under torch.no_grad() / torch.inference_mode()")
    if low.compute(dt) is None:
        return (f"{dt} activations: dskc's kernels compute in bf16 / fp16; ask with "
                "options={'compute_dtype': 'bf16'}" if dt == torch.float32 else f"{dt} activations")
    return None


def _region_dtype(r: fxr.FxRegion) -> torch.dtype | None:
    vals = [fxr.value(a) for a in fxr.external_inputs(r.nodes)]
    floats = [v.dtype for v in vals if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2
              and not isinstance(v, torch.nn.Parameter)]
    return floats[0] if floats else None


def lower_regions(low: _Lowering, scope) -> None:
    """Every MoE / MLP / MLA region of the graph: replaced by its dskc op, or recorded with the reason."""
    if not any(scope):
        low.records.append(RegionRecord("graph", "-", "-", False, (), "the compiled frame's module instances are not "
                                        "reachable from Dynamo here (another torch version?): only linears lowered"))
    regions = [r for r in fxr.find(low.gm, scope) if r.family.kind in _LOWER]
    by_path = {r.path: node_of(r.path, r.family, r.spec) for r in regions}
    graph = lower(Graph(tuple(by_path.values())), Options(quantize_weights=low.opts.fp8)) if by_path else Graph(())
    nodes = {n.name: n for n in graph.nodes}
    for r in regions:
        node, kind, dt = nodes[r.path], r.family.kind.value, _region_dtype(r)
        why = _why_left(low, r, dt)
        if why is None:
            try:
                _LOWER[r.family.kind](low, r, node, dot_dtype(low.compute(dt)))
            except RegionError as exc:
                why = str(exc)
        if why is not None:
            if r.family.kind in (Op.MOE, Op.MLP):
                low.eager.update(r.nodes)
            low.records.append(RegionRecord(kind, r.path, r.family.name, False, (), why))
            continue
        notes = ("FP8 weights quantised at compile time" if node.attr("quantized") == "ahead" else "",
                 f"float32 computed in {low.opts.compute_dtype} (asked)" if dt == torch.float32 else "")
        low.records.append(RegionRecord(kind, r.path, r.family.name, True, _stems(node, low.compute(dt)),
                                        "; ".join(n for n in notes if n)))


def _why_not_linear(low: _Lowering, node: fx.Node) -> str | None:
    args = list(node.args) + [None] * 3
    x, w = fxr.value(args[0]), fxr.value(args[1])
    if node.kwargs.get("bias") is not None or args[2] is not None:
        return "linear with bias: bias epilogue not in the bf16_gemm template yet"
    if w is None or x is None:
        return "shapes unknown at capture"
    if w.dim() != 2 or x.dtype != w.dtype or low.compute(w.dtype) is None:
        hint = "; ask with options={'compute_dtype': 'bf16'}" if w.dtype == torch.float32 else ""
        return f"{w.dtype} weight {tuple(w.shape)}: dskc linears compute in bf16/fp16{hint}"
    if w.shape[1] % (128 if low.opts.fp8 else 8):
        return f"input width {w.shape[1]} is not a multiple of {128 if low.opts.fp8 else 8}"
    if low.opts.fp8 and (low.grad or low.inputs.get(args[1]) is None):
        return "FP8 linear: " + ("the graph needs gradients" if low.grad else "its weight is computed in the graph")
    return None


def _linear_path(node: fx.Node) -> tuple[str, str]:
    st = fxr.stack(node)
    return (fxr.normalise(st[-1][1])[1], "linear") if st else (node.name, "F.linear")


def lower_linears(low: _Lowering) -> None:
    """Each F.linear dskc serves (outside regions kept eager) -> dskc::linear / dskc::fp8_linear."""
    g = low.gm.graph
    for node in list(g.nodes):
        if node.op != "call_function" or node in low.eager:
            continue
        if node.target in _KNOWN_LEFT:
            low.records.append(RegionRecord("attention" if node.target is F.scaled_dot_product_attention else "op",
                                            node.name, "-", False, (), _KNOWN_LEFT[node.target]))
        if node.target not in _LINEARS:
            continue
        path, fam = _linear_path(node)
        why = _why_not_linear(low, node)
        if why:
            low.records.append(RegionRecord("linear", path, fam, False, (), why))
            continue
        w = fxr.value(node.args[1])
        with g.inserting_before(node):
            if low.opts.fp8:
                d = weights.dense(low.inputs[node.args[1]], None, quantize=True, kdtype=w.dtype)
                new = g.call_function(torch.ops.dskc.fp8_linear.default,
                                      (node.args[0], low.const(d.weight), low.const(d.scale)))
            else:
                kd = dot_dtype(low.compute(w.dtype))
                src = node.args[1] if w.dtype == kd or low.inputs.get(node.args[1]) is None else \
                    low.const(low.inputs[node.args[1]].detach().to(kd))
                new = g.call_function(torch.ops.dskc.linear.default, (node.args[0], src))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        stems = ("act_quant", "fp8_gemm_1d2d") if low.opts.fp8 else ("bf16_gemm",)
        low.records.append(RegionRecord("fp8_linear" if low.opts.fp8 else "linear", path, fam, True, stems,
                                        "FP8 weight quantised at compile time" if low.opts.fp8 else ""))


def lower_graph(gm: fx.GraphModule, example_inputs, opts: BackendOptions, scope=None) -> list:
    """Rewrite the graph in place; returns its RegionRecords."""
    low = _Lowering(gm, example_inputs, opts)
    lower_regions(low, scope if scope is not None else fxr.frame_scope())
    lower_linears(low)
    gm.graph.lint()
    gm.recompile()
    return low.records


class DskcBackend:
    """The callable registered as the `dskc` Dynamo backend. `report()` lists what each captured graph got."""

    def __init__(self, rest: str = "inductor", **options):
        self.options = BackendOptions.parse(dict(options, rest=rest), BackendOptions())
        self.graphs: list[GraphReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs, options: dict | None = None):
        opts = BackendOptions.parse(options, self.options)
        rep = GraphReport(lower_graph(gm, example_inputs, opts), "")
        for r in rep.regions:
            if not r.lowered:
                warn_once(log, f"backend:{r.reason}", f"dskc backend: {r.path} left to {opts.rest}: {r.reason}")
        fn, rep.compiler = _compile_rest(gm, example_inputs, opts.rest)
        self.graphs.append(rep)
        return fn

    def regions(self) -> list:
        """Every graph's RegionRecords, in compile order."""
        return [r for g in self.graphs for r in g.regions]

    def report(self) -> str:
        lines = []
        for i, g in enumerate(self.graphs):
            done = [r for r in g.regions if r.lowered]
            if not g.regions:
                lines.append(f"graph {i}: nothing dskc lowers (no MoE, MLP, MLA or linear it serves); all on "
                             f"{g.compiler}")
                continue
            lines.append(f"graph {i}: {len(done)} regions on dskc kernels "
                         f"({sum(r.kind.endswith('linear') for r in done)} linears), rest on {g.compiler}")
            lines += ["  " + line for line in region_table(g.regions).splitlines()]
        return "\n".join(lines) or "no graph compiled yet"

    def reset(self) -> None:
        self.graphs.clear()


def _compile_rest(gm, example_inputs, rest: str):
    try:
        if rest != "inductor":
            raise RuntimeError("aot_eager requested")
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs), "inductor"
    except Exception as exc:  # noqa: BLE001 - Inductor needs a working C++ toolchain on CPU; fall back visibly
        if rest == "inductor":
            warn_once(log, "backend:aot_eager", f"dskc backend: Inductor could not compile the rest ({exc!r:.200}); "
                      "using aot_eager")
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs), "aot_eager"


dskc_backend = DskcBackend()
