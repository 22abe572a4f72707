"""`dskc.compile`: a model in, the same model running on generated kernels for a chosen GPU out.

capture (regions by structure from the module tree, or from Dynamo's FX graphs) -> ir -> lower (named passes) ->
select (kernel and config per node) -> build (cross-compile for the target, content-addressed cache) -> runtime
(kernel modules; decode steps on CUDA graphs on a GPU).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import time

import torch
import torch.nn as nn

from dskc import knobs
from dskc.arch import Arch, parse
from dskc.build.triton_xc import CompileError, compile_kernels
from dskc.capture.regions import find_regions
from dskc.ir.graph import Graph, Op
from dskc.lower.passes import Options, lower
from dskc.select.choose import ConfigError, choose
from dskc.select.launches import Context
from dskc.templates.triton._problem import pow2

log = logging.getLogger("dskc.compile")


DEFAULT_TOKENS = (1, 16, 128, 1024, 4096, 16384)   # token-count buckets planned when none are named


@dataclasses.dataclass
class Plan:
    target: Arch
    graph: Graph
    dumps: list                       # (pass name, graph after it)
    choices: list                     # Choice per (region, launch slot, token bucket) of every lowered node
    fallbacks: list                   # (region, reason)
    tokens: tuple = (64,)             # the token-count buckets the tables hold (a count between two takes the
                                      # next one up; past the last, the last)
    reports: dict = dataclasses.field(default_factory=dict)   # (stem, problem, config) -> KernelReport | error
    capture: dict = dataclasses.field(default_factory=dict)   # how the regions were found (see plan's capture)
    libraries: dict = dataclasses.field(default_factory=dict)  # (stem, problem, config) -> NvccBuild (CUTLASS)
    specs: dict = dataclasses.field(default_factory=dict)      # CompileSpec -> KernelReport | CompileError
    note: str = ""                    # what every lowered region shares (a float32 model computed in bf16)


def _find(model: nn.Module, capture: str, example_inputs) -> tuple[Graph, dict]:
    """The region graph and a summary of how it was found (capture "module" or "dynamo")."""
    if capture == "module":
        return find_regions(model), {"source": "module tree (regions by structure)"}
    if capture != "dynamo":
        raise ValueError(f"capture must be 'module' or 'dynamo', got {capture!r}")
    from dskc.capture import dynamo

    calls = example_inputs if example_inputs is not None else dynamo.transformer_calls(model)
    t0 = time.perf_counter()
    try:
        cap = dynamo.trace(model, calls)
    except torch._dynamo.exc.Unsupported as exc:   # dskc lowers whole graphs only
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"Dynamo cannot capture {type(model).__name__} whole (a graph break: {first}); find the "
                         "regions by structure instead (capture='module')") from exc
    graph, dropped = dynamo.regions_from_fx(model, cap)
    return graph, {"source": "Dynamo FX graphs (fullgraph, dynamic)", "graphs": cap.n_graphs, "calls": cap.calls,
                   "fx_nodes": [len(gm.graph.nodes) for gm in cap.graphs], "not_run": dropped,
                   "seconds": round(time.perf_counter() - t0, 1)}


_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_DTYPES = {v: k for k, v in _NAMES.items()}


def model_dtype(model: nn.Module) -> torch.dtype:
    """The model's activation dtype: its `dtype` (dskc's Transformer, transformers' models), else its first floating
    (non-FP8) parameter's."""
    dt = getattr(model, "dtype", None)
    if not isinstance(dt, torch.dtype):
        dt = next((p.dtype for p in model.parameters() if p.is_floating_point() and p.element_size() > 1),
                  torch.bfloat16)
    return dt


def compute_dtype(model: nn.Module, options: Options) -> torch.dtype:
    """What the kernels compute in: the model's dtype, or Options.compute_dtype for a float32 model."""
    dt = model_dtype(model)
    return _DTYPES[options.compute_dtype] if dt == torch.float32 and options.compute_dtype else dt


def _act_dtype(model: nn.Module, options: Options = Options()) -> str:
    return _NAMES.get(compute_dtype(model, options), "bf16")


def _context(model: nn.Module, graph: Graph, runs_on: str, options: Options = Options()) -> Context:
    """What selection needs to know of the model beyond the IR: dtype, cache capacity, shared experts' widths."""
    args = getattr(model, "args", None)
    shared = tuple((n.name, n.attr("shared_inter")) for n in graph.by_op(Op.MOE) if n.attr("shared_inter"))
    return Context(_act_dtype(model, options), runs_on, getattr(args, "max_seq_len", 4096), shared,
                   model_act=_NAMES.get(model_dtype(model), ""))


def default_tokens(model: nn.Module) -> tuple:
    """DEFAULT_TOKENS up to the model's max_batch_size * max_seq_len (all of them for a model without args)."""
    args = getattr(model, "args", None)
    most = getattr(args, "max_batch_size", 0) * getattr(args, "max_seq_len", 0) or DEFAULT_TOKENS[-1]
    return tuple(t for t in DEFAULT_TOKENS if t <= most) or (1,)


def _check_options(graph: Graph, options: Options) -> None:
    """Refuse the pass switches dskc cannot honour, before anything is built."""
    if not options.absorb_mla and graph.by_op(Op.MLA):
        raise ValueError("Options(absorb_mla=False): dskc's MLA kernels run the absorbed form only (they cache the "
                         "576-wide latent and fold wkv_b into the query and output); compile with absorb_mla=True, "
                         "or run the model without dskc")


def plan(model: nn.Module, target="sm90a", options: Options = Options(), m_hint: int | None = None,
         runs_on: str = "gpu", capture: str = "module", example_inputs=None, tokens=None) -> Plan:
    """Find, lower and select (no build, no weights touched: works on a model on the meta device).

    tokens: the token counts whose buckets (powers of two) get a config table (default: DEFAULT_TOKENS up to the
    model's max_batch_size * max_seq_len); m_hint: one token count (the same as tokens=(m_hint,)).
    runs_on: "gpu" (kernels for the target's GPU) or "cpu" (Triton's interpreter: CUTLASS is never selected, and
    bf16 dot operands run as fp16). capture: "module" finds the regions by structure in the module tree (fast);
    "dynamo" traces the forward with Dynamo (fullgraph, dynamic; nothing runs, so a meta-device model works) and
    keeps the regions whose code the FX graphs execute; a graph break is an error. example_inputs: the calls to
    trace, [(args, kwargs), ...] (default for a dskc.model.Transformer: a 4-token prefill and a decode step).
    Raises ValueError for Options dskc cannot honour (absorb_mla=False with MLA regions)."""
    arch = parse(target)
    dumps = []
    regions, how = _find(model, capture, example_inputs)
    graph = lower(regions, options, dump=lambda name, g: dumps.append((name, g)))
    _check_options(graph, options)
    if tokens is None:
        tokens = (m_hint,) if m_hint is not None else default_tokens(model)
    buckets = tuple(sorted({pow2(t) for t in tokens}))
    if not buckets or buckets[0] < 1:
        raise ValueError(f"tokens must be positive counts, got {tokens}")
    ctx = _context(model, graph, runs_on, options)
    choices, fallbacks = [], []
    for node in graph.nodes:
        if node.op is Op.FALLBACK:
            fallbacks.append((node.name, node.attr("reason")))
            continue
        if node.attr("absorbed_into"):
            continue
        try:
            choices.extend(choose(node, arch, buckets, runs_on, ctx))
        except ConfigError as exc:   # a config breaking its kernel's constraints never reaches a launch
            fallbacks.append((node.name, str(exc)))
    note = (f"float32 model: regions computed in {options.compute_dtype} (Options.compute_dtype)"
            if model_dtype(model) == torch.float32 and options.compute_dtype else "")
    return Plan(arch, graph, dumps, choices, fallbacks, buckets, capture=how, note=note)


def build(p: Plan, progress: bool = True) -> Plan:
    """Cross-compile every kernel the plan's choices launch for its target (each distinct CompileSpec once,
    cached by content). A kernel that does not build makes every region that launches it a fallback, with the
    compiler's message; it never aborts the whole compile."""
    from dskc.templates import registry

    _build_cutlass(p, progress)
    wanted = {}                                   # (stem, problem, config) -> its specs
    for c in p.choices:
        if c.backend != "cutlass":
            key = (c.stem, c.problem, c.config)
            if key not in wanted:
                wanted[key] = registry.get(c.stem).compile_specs(dict(c.problem), dict(c.config))
    specs = list(dict.fromkeys(s for ss in wanted.values() for s in ss))
    if progress:
        print(f"[dskc] building {len(specs)} kernels for {p.target} ...", file=sys.stderr, flush=True)
    built = dict(zip(specs, compile_kernels(specs, p.target)))
    p.specs = built
    failed_keys = set()
    for key, ss in wanted.items():
        if not all(s in built for s in ss):
            continue
        p.reports[key] = [built[s] for s in ss]
        if any(isinstance(built[s], CompileError) for s in ss):
            failed_keys.add(key)
    marked = set()
    for c in p.choices:
        key = (c.stem, c.problem, c.config)
        if key in failed_keys and c.region not in marked:
            marked.add(c.region)
            err = next(r for r in p.reports[key] if isinstance(r, CompileError))
            p.fallbacks.append((c.region, f"{c.stem} does not build for {p.target}: {err}"))
    return p


def _build_cutlass(p: Plan, progress: bool) -> None:
    """Build the CUTLASS picks with nvcc (cached). One that does not build goes back to the Triton kernel it
    replaced, and the Choice's `why` says so."""
    from dskc.select import backends
    from dskc.templates import cutlass

    picks = [(i, c) for i, c in enumerate(p.choices) if c.backend == "cutlass"]
    if not picks:
        return
    unique = {(c.stem, c.problem, c.config): c for _, c in picks}
    if progress:
        print(f"[dskc] building {len(unique)} CUTLASS kernels for {p.target} ...", file=sys.stderr, flush=True)
    built = {key: cutlass.build(c.stem, dict(c.config), p.target,
                                backends.cutlass_problem(c.triton[0], dict(c.problem))) for key, c in unique.items()}
    for i, c in picks:
        res = built[(c.stem, c.problem, c.config)]
        if res.ok:
            p.libraries[(c.stem, c.problem, c.config)] = res
        else:
            log.warning("dskc: %s: CUTLASS %s does not build (%s); using Triton %s", c.region, c.stem,
                        res.message[:200], c.triton[0])
            p.choices[i] = dataclasses.replace(c, stem=c.triton[0], config=c.triton[1], backend="triton",
                                               source=c.triton[2], triton=(),
                                               why=f"Triton: CUTLASS {c.stem} failed to build ({res.stage}); {c.why}")


def _cutlass_build(p: Plan, region: str):
    """The NvccBuild of the region's CUTLASS pick, or None when it runs on Triton."""
    for c in p.choices:
        if c.region == region and c.backend == "cutlass":
            lib = p.libraries.get((c.stem, c.problem, c.config))
            if lib is None:
                raise ValueError(f"{region}: CUTLASS {c.stem} was selected but not built (call compiler.build)")
            return lib
    return None


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _kernel_module(node, src: nn.Module, model: nn.Module, options: Options, cutlass=None, table=None):
    """The kernel module of a region, its weights laid out by the region's family (dskc.capture.layouts) in the
    kernels' dtype; `table` (dskc.runtime.table.ConfigTable) holds the configs it launches."""
    from dskc.capture import layouts
    from dskc.capture.families import classify
    from dskc.runtime.block import KernelBlock
    from dskc.runtime.foreign import KernelLatentAttention
    from dskc.runtime.mla import KernelMLA
    from dskc.runtime.modules import KernelLinear, KernelMLP, KernelMoE, dot_dtype

    kd, quantize = dot_dtype(compute_dtype(model, options)), node.attr("quantized") == "ahead"
    if node.op in (Op.LINEAR, Op.FP8_LINEAR):
        norm = model.get_submodule(node.attr("norm")) if node.attr("norm") else None
        return KernelLinear(layouts.linear(src, quantize, kd), node, cutlass=cutlass, table=table, norm=norm)
    if node.op is Op.BLOCK:   # wraps its parts, already kernel modules; a block with nothing fused stays as it is
        return KernelBlock(src, node, table) if node.attr("attn_norm") or node.attr("ffn_norm") else None
    if node.op is Op.MLA and node.attr("rope_layout") in (None, "dskc"):
        args = getattr(model, "args", None)
        return KernelMLA(src, node, getattr(args, "max_batch_size", 8), getattr(args, "max_seq_len", 4096), table)
    if node.op not in (Op.MLP, Op.MOE, Op.MLA):
        return None
    _, spec = classify(src)
    bundle = layouts.layout(src, spec, quantize, kd)
    if node.op is Op.MLA:
        return KernelLatentAttention(src, node, spec, bundle, table)
    return (KernelMLP if node.op is Op.MLP else KernelMoE)(bundle, node, table)


def tables(p: Plan) -> dict:
    """region -> ConfigTable of its choices (regions with no kernel of their own have none)."""
    from dskc.runtime.table import ConfigTable

    rows = {}
    for c in p.choices:
        rows.setdefault(c.region, []).append(c)
    return {region: ConfigTable(region, cs) for region, cs in rows.items()}


class CompiledModel(nn.Module):
    """The model with its regions on generated kernels; same call signature as the original."""

    def __init__(self, module: nn.Module, p: Plan):
        super().__init__()
        self.module, self.plan = module, p

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def explain(self) -> str:
        from dskc.explain import render
        return render(self.plan)

    def regions(self) -> list:
        """One dskc.explain.RegionRecord per recognised region: kind, module path, family, lowered or not, the
        kernels it launches, and the reason when it stays eager."""
        from dskc.explain import plan_regions
        return plan_regions(self.plan)

    def report(self) -> str:
        """regions() as a table."""
        from dskc.explain import region_table
        return region_table(self.regions())


def _link_runtime(module: nn.Module) -> None:
    """What the kernel modules share at run time: the MLA regions' per-step state (dskc.runtime.mla), and norms
    their consumers apply (dskc.runtime.modules.fuse_norms)."""
    from dskc.runtime.mla import share_step_state
    from dskc.runtime.modules import fuse_norms

    share_step_state(module)
    fuse_norms(module)


def _attach_decode_graphs(module: nn.Module) -> None:
    """On a GPU, decode steps of a Transformer-like compiled module replay CUDA graphs (dskc.runtime.graphs); the
    module keeps its type and call signature (its forward sends decode steps to the graphs, the rest as before)."""
    from dskc.runtime.graphs import DecodeGraphs

    args = getattr(module, "args", None)
    try:
        runner = DecodeGraphs(module, args.max_batch_size, args.max_seq_len)
    except (ValueError, AttributeError) as exc:
        log.info("dskc: decode steps run without CUDA graphs: %s", exc)
        return
    plain = module.forward

    def forward(tokens, start_pos=0):
        if hasattr(module, "_check_input"):
            module._check_input(tokens, start_pos)
        out = runner(tokens, start_pos)
        return plain(tokens, start_pos) if out is None else out

    module.forward, module.decode_graphs = forward, runner


KERNEL_DTYPES = (torch.bfloat16, torch.float16)   # activation dtypes the generated kernels take


def _check_dtype(model: nn.Module, options: Options = Options()) -> None:
    """Refuse a model computing in a dtype no kernel takes (float32, float64) here, not at its first forward, unless
    Options(compute_dtype=...) asks for a float32 model's regions in bf16 / fp16 (the torch.compile backend leaves
    such regions on Inductor with the same reason unless its compute_dtype option asks)."""
    if options.compute_dtype not in (None, "bf16", "fp16"):
        raise ValueError(f"Options.compute_dtype must be None, 'bf16' or 'fp16', got {options.compute_dtype!r}")
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype):   # a plain nn.Module: its float (non-FP8) matrices' dtype
        kinds = {p.dtype for p in model.parameters() if p.dim() >= 2 and p.is_floating_point() and p.itemsize > 1}
        dtype = kinds.pop() if len(kinds) == 1 else None
    if dtype is None or dtype in KERNEL_DTYPES or (dtype == torch.float32 and options.compute_dtype):
        return
    raise ValueError(f"dskc.compile: the model computes in {dtype}, which no dskc kernel takes (they take "
                     f"bfloat16 or float16 activations); build it in one of those, e.g. "
                     f"Transformer(args, dtype=torch.bfloat16) or dskc.model.from_pretrained(path, "
                     f"dtype=torch.bfloat16), and compile that"
                     + ("; or ask for its regions in bf16 with Options(compute_dtype='bf16') (the float32 parts "
                        "around them stay float32)" if dtype == torch.float32 else ""))


def compile(model: nn.Module, target="auto", *, options: Options = Options(), build_kernels: bool = True,
            inplace: bool = False, progress: bool = True, cuda_graphs: bool = True, capture: str = "module",
            example_inputs=None, tokens=None) -> CompiledModel:
    """Compile `model` for `target` ("sm90a" | "sm100a" | "sm80" | "auto" = this GPU).

    Without a GPU, target "auto" means sm90a for the build, and the generated kernels run through Triton's
    interpreter on the CPU (set TRITON_INTERPRET=1 before importing dskc). The original model is not modified
    unless inplace=True. Regions dskc cannot serve stay eager and are listed with the reason in `explain()` and
    `regions()` / `report()`. Models dskc did not write (transformers' DeepSeek-V2/V3, Qwen2/3-MoE, Mixtral, SwiGLU
    MLPs, ...) are recognised through the family table (dskc.capture.families) and keep their call signatures. A
    model computing in a dtype no kernel takes (float32 today) is refused here with a ValueError naming the fix,
    unless options=Options(compute_dtype="bf16") asks for a float32 model's regions in bf16.
    cuda_graphs: on a GPU, replay decode steps (one token per sequence) from CUDA graphs, one per batch size.
    capture / example_inputs: how regions are found, "module" (structure) or "dynamo" (FX graphs); see `plan`.
    tokens: the token counts whose buckets get a config table (see `plan`); each region's module launches the
    configs of its table (the bucket at or above the rows it sees).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dskc.compile takes an nn.Module, got {type(model).__name__}")
    _check_dtype(model, options)
    if not torch.cuda.is_available():
        if not knobs.get().triton_interpret:
            raise RuntimeError("no CUDA GPU here: to run generated kernels on the CPU set TRITON_INTERPRET=1 before "
                               "Python starts (./dev does); to only build for a GPU use `dskc compile --out DIR`")
        if target == "auto":
            target = "sm90a"
    if progress and capture == "dynamo":
        print("[dskc] tracing the forward with Dynamo ...", file=sys.stderr, flush=True)
    p = plan(model, target, options, runs_on="gpu" if torch.cuda.is_available() else "cpu", capture=capture,
             example_inputs=example_inputs, tokens=tokens)
    if build_kernels:
        build(p, progress)
    else:
        _build_cutlass(p, progress)   # Triton kernels JIT at first launch; a CUTLASS pick needs its library now
    module = model if inplace else copy.deepcopy(model)
    failed = {region for region, _ in p.fallbacks}
    by_region = tables(p)
    for node in sorted(p.graph.nodes, key=lambda n: n.op is Op.BLOCK):   # blocks last: they wrap their parts
        if node.name in failed or node.op in (Op.RMSNORM, Op.FALLBACK) or node.attr("absorbed_into"):
            continue
        try:
            cut = _cutlass_build(p, node.name)
            new = _kernel_module(node, module.get_submodule(node.name), module, options, cut,
                                 by_region.get(node.name))
        except ValueError as exc:
            p.fallbacks.append((node.name, str(exc)))
            log.warning("dskc: %s stays eager: %s", node.name, exc)
            continue
        if new is not None:
            _set_module(module, node.name, new)
    for region, reason in p.fallbacks:
        log.warning("dskc: fallback for %s: %s", region, reason)
    _link_runtime(module)
    if cuda_graphs and torch.cuda.is_available():
        _attach_decode_graphs(module)
    return CompiledModel(module, p)


def load(model: nn.Module, out_dir, *, inplace: bool = False, progress: bool = False,
         manifest: dict | None = None) -> CompiledModel:
    """`model` on the kernels of a `dskc compile --out DIR` build.

    The manifest is verified first (every shipped file against its hash); a model whose config differs from the
    one compiled, or a GPU of another arch than the build's, is refused. On a GPU the shipped cubins serve Triton's
    launches (dskc.runtime.aot: nothing compiles when this machine's Triton built them; every launch that does
    compile is counted in `compiled.aot.stats` and logged). Without a GPU the same kernels run through the
    interpreter. A selection that differs from the manifest's (a tuned database changed since) is logged.
    Not yet: CUTLASS picks are rebuilt from the dskc cache (nvcc), not loaded from DIR.
    manifest: what `dskc.build.aot.verify(out_dir)` returned, when the caller verified the directory already.
    """
    from dskc.arch import detect
    from dskc.build import aot as aot_files
    from dskc.runtime import aot as aot_runtime

    manifest = manifest or aot_files.verify(out_dir)
    shipped_cfg, args = manifest.get("model") or {}, getattr(model, "args", None)
    if shipped_cfg and dataclasses.is_dataclass(args):
        mine = dataclasses.asdict(args)
        differ = sorted(k for k in set(shipped_cfg) | set(mine) if shipped_cfg.get(k) != mine.get(k))
        if differ:
            raise ValueError(f"{out_dir} was compiled for another model: {', '.join(differ)} differ "
                             f"(e.g. {differ[0]}: built {shipped_cfg.get(differ[0])!r}, here {mine.get(differ[0])!r})")
    target = parse(manifest["target"])
    here = detect() if torch.cuda.is_available() else None
    if here is not None and here.cc != target.cc:
        raise ValueError(f"{out_dir} holds kernels for {target}, this GPU is {here}: compile for it with "
                         f"`dskc compile --target {here}`")
    installed = aot_runtime.install(out_dir, manifest)
    compiled = compile(model, target, build_kernels=False, inplace=inplace, progress=progress,
                       tokens=manifest.get("tokens"))
    want = {(r["region"], r["stem"], tuple(sorted(r["config"].items()))) for r in manifest["regions"]}
    have = {(c.region, c.stem, c.config) for c in compiled.plan.choices}
    if want != have:
        log.warning("dskc: the selection here differs from %s's in %d kernels (tuned database changed?): those "
                    "launches compile", out_dir, len(want ^ have))
    compiled.aot = installed
    return compiled
