"""`dskc explain`: the IR after each pass, the region -> kernel table, what runs per token-count bucket, every kernel
each region launches in a decode step and in a prefill, every fallback with its reason, and the region report both
doors share (RegionRecord: dskc.compile's `regions()` and the torch.compile backend's)."""
from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class RegionRecord:
    """One recognised region: what it is, where, which family row read it, and what became of it."""
    kind: str            # "moe" | "mlp" | "mla" | "linear" | "fp8_linear" | "block"
    path: str            # module path ("model.layers.1.mlp")
    family: str          # the family table's row ("transformers.deepseek_v3.moe", "dskc.mla", "linear", ...)
    lowered: bool
    kernels: tuple = ()  # the stems it launches (sorted)
    reason: str = ""     # why not, when not lowered; a note otherwise ("absorbed into ...", "computed in bf16")


def region_table(records) -> str:
    """Records as an aligned table, then a count line."""
    if not records:
        return "no region recognised"
    rows = [("kind", "region", "family", "lowered", "kernels", "reason / note")]
    for r in records:
        rows.append((r.kind, r.path, r.family, "yes" if r.lowered else "no", ",".join(r.kernels) or "-", r.reason))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    done = sum(r.lowered for r in records)
    lines.append(f"{done} of {len(records)} regions lowered")
    return "\n".join(line.rstrip() for line in lines)


def plan_regions(plan) -> list[RegionRecord]:
    """The records of a dskc.compile plan: every node but RMSNorms and unfused blocks (which are no kernels of
    their own), with its stems from the plan's choices (a node fused into another lists that one's)."""
    stems, failed = {}, {}
    for c in plan.choices:
        stems.setdefault(c.region, set()).add(c.stem)
    for region, why in plan.fallbacks:
        failed.setdefault(region, why)
    out = []
    for n in plan.graph.nodes:
        kind = n.attr("kind") or n.op.value
        if kind == "rmsnorm" or (kind == "block" and not (n.attr("attn_norm") or n.attr("ffn_norm"))):
            continue
        why = failed.get(n.name) or n.attr("reason") or ""
        note = (f"absorbed into {n.attr('absorbed_into')}" if n.attr("absorbed_into") else
                f"runs in {n.attr('fused_into')}'s kernels" if n.attr("fused_into") else "")
        if n.attr("quantized") == "ahead":
            note = "FP8 weights quantised at compile time" + (f"; {note}" if note else "")
        if getattr(plan, "note", ""):
            note = "; ".join(x for x in (note, plan.note) if x)
        lowered = not why and n.op.value != "fallback"
        out.append(RegionRecord(kind, n.name, n.attr("family") or "-", lowered,
                                tuple(sorted(stems.get(n.attr("fused_into") or n.name, ()))), why or note))
    return out


def _fmt(pairs) -> str:
    return ",".join(f"{k}={v}" for k, v in pairs)


def _built(plan, c) -> str:
    key = (c.stem, c.problem, c.config)
    rep = plan.reports.get(key) or ([plan.libraries[key]] if key in getattr(plan, "libraries", {}) else None)
    if rep is None:
        return "-"
    if any(isinstance(r, Exception) for r in rep):
        return "FAILED"
    return " ".join(f"{r.registers}reg/{r.spill_store_bytes}spill/{'+'.join(r.tensor_core_ops) or 'no-TC'}"
                    for r in rep)


def _backend(c) -> str:
    """The backend and why ("triton" alone where CUTLASS has no kernel for this on the target)."""
    return f"{c.backend}: {c.why}" if c.why else c.backend


def grouped_table(plan) -> str:
    """One row per distinct (kernel, config, source, build result), with how many regions use it."""
    groups = {}
    for c in plan.choices:
        key = (c.stem, _fmt(c.config), c.source, _built(plan, c), _backend(c))
        groups.setdefault(key, set()).add(c.region)
    rows = [("regions", "kernel", "config", "arch", "source", "build (per kernel: registers/spills/tensor cores)",
             "backend")]
    for (stem, cfg, src, built, backend), regions in groups.items():
        rows.append((str(len(regions)), stem, cfg, plan.target.name, src, built, backend))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def kernel_table(plan) -> str:
    rows = [("region", "kernel", "config", "arch", "source", "build", "backend")]
    for c in plan.choices:
        built = _built(plan, c)
        rows.append((c.region, c.stem, _fmt(c.config), plan.target.name, c.source, built, _backend(c)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    fused = _patterns(f"{n.name} -> {n.attr('fused_into')}" for n in plan.graph.nodes if n.attr("fused_into"))
    if fused:
        lines.append(f"fused into another region's kernels: {fused}")
    eager = [n.name for n in plan.graph.nodes if n.op.value == "rmsnorm" and not n.attr("fused_into")]
    if eager:
        lines.append(f"eager PyTorch (not lowered, by design): {len(eager)} RMSNorm regions: {_patterns(eager)}")
    return "\n".join(lines)


def _patterns(names) -> str:
    """Names with their layer numbers folded ("layers.*.ffn_norm (2)"), in first-seen order, with counts."""
    counts = {}
    for name in names:
        key = re.sub(r"(?<=\.)\d+(?=\.|\s|$)", "*", name)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({v})" for k, v in counts.items())


def _short(config) -> str:
    """A config in a few characters: BLOCK_M=64 -> M64, num_warps=8 -> w8, num_stages=4 -> s4."""
    names = {"num_warps": "w", "num_stages": "s"}
    return ",".join(f"{names.get(k, k.removeprefix('BLOCK_'))}{v}" for k, v in config)


def bucket_table(plan) -> str:
    """What runs per token-count bucket: one row per (region pattern, slot, kernel), one column per bucket of the
    plan, each cell the config its module launches for that many rows (the regions of a pattern share it, or the
    cell says how many configs they use)."""
    buckets = list(getattr(plan, "tokens", ()))
    cells = {}
    for c in plan.choices:
        key = (re.sub(r"(?<=\.)\d+(?=\.|$)", "*", c.region), c.slot, c.stem)
        cells.setdefault(key, {}).setdefault(c.tokens, set()).add(_short(c.config))
    rows = [("region", "slot", "kernel") + tuple(f"tokens<={t}" for t in buckets)]
    for (region, slot, stem), by_t in cells.items():
        vals = [by_t.get(t, set()) for t in buckets]
        rows.append((region, slot, stem) + tuple(next(iter(v)) if len(v) == 1 else (f"{len(v)} configs" if v else "-")
                                                for v in vals))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


# launch slots a region's module does not run in a phase: a decode step is one token per sequence, a prefill one
# prompt (dskc.select.launches: MLA's "decode" / "step" vs "prefill" / "prefill_step")
NOT_IN = {"decode": ("prefill", "prefill_step"), "prefill": ("decode", "step")}
PER_STEP = ("step", "prefill_step")      # slots launched once per step, by the region owning the step's state


def _kernel_names(c) -> list[str]:
    """The kernels one launch of choice c runs (its stem's bind), in launch order."""
    if c.backend != "triton":
        return [c.stem]
    from dskc.templates import registry
    mod = registry.get(c.stem)
    return list(mod.bind(mod.Problem.of(dict(c.problem)), dict(c.config)))


def step_kernels(plan, phase: str, tokens: int) -> list[tuple]:
    """[(region, slot, stem, [kernel names])] of every kernel the compiled model launches in a `phase` ("decode" |
    "prefill") step of `tokens` rows (a planned bucket), in the plan's order: what the runtime modules launch
    (tests/compiler/test_plan_runs.py and test_lean_step.py check it against the launches)."""
    return [(c.region, c.slot, c.stem, _kernel_names(c)) for c in plan.choices
            if c.tokens == tokens and c.slot not in NOT_IN[phase]]


def phase_buckets(plan) -> dict:
    """The buckets the step listing shows: decode at the smallest, prefill at the largest up to 128 rows."""
    buckets = list(getattr(plan, "tokens", ())) or [1]
    prefill = max([b for b in buckets if 1 < b <= 128] or [buckets[-1]])
    return {"decode": buckets[0], "prefill": prefill}


def launch_table(plan) -> str:
    """The kernels each region launches in a decode step and in a prefill (stem:kernel xN, "(per step)" for the
    step's shared state), one row per group of regions launching the same (layer numbers folded), and the Triton
    launches per step in all."""
    phases = phase_buckets(plan)
    lists = {}                                       # region -> {phase: [kernel labels]}
    for phase, t in phases.items():
        for region, slot, stem, names in step_kernels(plan, phase, t):
            tag = " (per step)" if slot in PER_STEP else ""
            label = [(n.removesuffix("_kernel") if n.startswith(stem) else f"{stem}:{n.removesuffix('_kernel')}")
                     + tag for n in names]
            lists.setdefault(region, {p: [] for p in phases})[phase].extend(label)
    groups = {}                                      # (pattern, decode, prefill) -> regions
    for region, by_phase in lists.items():
        key = (re.sub(r"(?<=\.)\d+(?=\.|$)", "*", region),) + tuple(_counted(by_phase[p]) for p in phases)
        groups.setdefault(key, []).append(region)
    rows = [("regions", f"decode (tokens<={phases['decode']}, 1 per sequence)", f"prefill (tokens<={phases['prefill']})")]
    for (pattern, *texts), regions in groups.items():
        rows.append((regions[0] if len(regions) == 1 else f"{pattern} ({len(regions)})", *texts))
    totals = {p: sum(len(v[p]) for v in lists.values()) for p in phases}
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"Triton launches per step: decode {totals['decode']}, prefill {totals['prefill']} (plus the aten "
                 "ops of what stays in PyTorch, e.g. the embedding; dskc.runtime.counter counts both)")
    return "\n".join(lines)


def _counted(names: list[str]) -> str:
    counts = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(n if k == 1 else f"{n} x{k}" for n, k in counts.items()) or "-"


def capture_line(c: dict) -> str:
    """How the regions were found: the module tree, or Dynamo's graphs (count, FX nodes, regions never run)."""
    if "graphs" not in c:
        return c.get("source", "?")
    not_run = ", ".join(c.get("not_run") or []) or "none"
    return (f"{c['source']}: {c['graphs']} graphs from {c['calls']} calls, FX nodes {c['fx_nodes']}, "
            f"traced in {c['seconds']} s; recognised regions never called: {not_run}")


def render(plan, passes: bool = True) -> str:
    out = []
    if passes:
        for name, g in plan.dumps:
            out.append(f"== IR after {name}\n{g}")
    if getattr(plan, "capture", None):
        out.append("== capture\n" + capture_line(plan.capture))
    out.append("== kernels\n" + kernel_table(plan))
    out.append("== configs per token-count bucket (what each module launches for that many rows)\n" +
               bucket_table(plan))
    out.append("== kernels per step (what each region's module launches, per region of the pattern)\n" +
               launch_table(plan))
    out.append("== fallbacks\n" + ("\n".join(f"{r}: {why}" for r, why in plan.fallbacks) or "none"))
    out.append("== regions (family table)\n" + region_table(plan_regions(plan)))
    return "\n\n".join(out)
