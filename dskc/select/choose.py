"""Selection: for each IR node and each token-count bucket, the kernels its runtime module launches
(dskc.select.launches) and each kernel's config for the target arch: the autotuner's exported entry for this
(arch, shape bucket) when one exists, else the stem's tuning-free rule for that problem
(registry.default_config). `source` says which, for `dskc explain`. The compiled model's modules launch exactly
these configs (dskc.runtime.table).

Backends: where a CUTLASS stem can serve a kernel on the target (FP8 / bf16 dense GEMMs and FP8 grouped GEMMs,
sm90a only; see dskc.select.backends), the Choice lists it in `alternatives`, and it replaces the Triton kernel only
when a MEASURED decision says it is faster for that shape bucket and the runtime has a CUTLASS path for the
region (RUNTIME_CUTLASS). `why` says which backend and why, for `dskc explain`.
"""
from __future__ import annotations

import dataclasses

from dskc.arch import Arch
from dskc.ir.graph import Node, Op
from dskc.select.launches import Context, launches
from dskc.templates.triton._problem import pow2


@dataclasses.dataclass(frozen=True)
class Choice:
    region: str
    stem: str
    problem: tuple          # sorted (name, value) pairs of the stem's Problem (dskc.templates.triton.<stem>)
    config: tuple           # sorted (name, value) pairs
    source: str             # "default:sm90" | "tuned:<file>" | "measured:<file>" (a CUTLASS pick)
    backend: str = "triton"
    why: str = ""           # why this backend ("" where CUTLASS has no kernel for the node on the target)
    alternatives: tuple = ()  # CUTLASS stems that could serve this kernel on the target
    triton: tuple = ()      # for a CUTLASS pick: (stem, config, source) of the Triton kernel it replaces (used
                            # when the CUTLASS build fails)
    slot: str = ""          # which of the region's launches (dskc.select.launches: "quant", "gemm", "gemm1", ...)
    tokens: int = 0         # the token-count bucket (rows the region's module sees) this row serves


class ConfigError(ValueError):
    """A selected config that breaks its stem's constraints for the problem (the region stays eager)."""


# regions whose runtime module can launch a CUTLASS GEMM (dskc.runtime.modules.KernelLinear); the MLP and MoE
# modules fuse epilogues into their Triton kernels and have no CUTLASS path yet
RUNTIME_CUTLASS = frozenset({Op.LINEAR, Op.FP8_LINEAR})


def config_for(stem: str, arch: Arch, problem) -> tuple[dict, str]:
    """(config, source) of one kernel: the autotuner's exported entry for this arch and the problem's bucket, else
    the stem's tuning-free rule for the problem."""
    from dskc.select import tuned
    from dskc.templates import registry

    cfg, source = tuned.lookup(stem, arch, problem.bucket().as_dict())
    if cfg is None:
        return registry.default_config(stem, arch, problem.bucket()), f"default:{arch.family}"
    return cfg, source


def choose(node: Node, arch: Arch, tokens=(64,), runs_on: str = "gpu", ctx: Context | None = None) -> list[Choice]:
    """The kernels (with configs) that serve `node` on `arch` at each token-count bucket of `tokens`; [] for
    regions left to eager PyTorch. runs_on: "gpu" (the target GPU) or "cpu" (Triton's interpreter, where CUTLASS is
    never selected). Raises ConfigError when a selected config breaks its stem's constraints, TunedFileError for an
    unreadable export."""
    from dskc.templates import registry

    ctx = dataclasses.replace(ctx or Context(runs_on=runs_on), sms=arch.sms)
    tokens = (tokens,) if isinstance(tokens, int) else tokens
    out = []
    for t in sorted({pow2(t) for t in tokens}):
        for slot, stem, problem in launches(node, t, ctx):
            cfg, source = config_for(stem, arch, problem)
            broken = registry.broken_constraints(registry.get(stem), cfg, problem)
            if broken:
                raise ConfigError(f"{node.name}: {stem} config {cfg} ({source}) breaks {broken} for {problem}")
            choice = Choice(node.name, stem, problem.items(), tuple(sorted(cfg.items())), source, slot=slot,
                            tokens=t)
            out.append(_backend(choice, node, arch, runs_on))
    return out


def _backend(c: Choice, node: Node, arch: Arch, runs_on: str) -> Choice:
    """`c` with its CUTLASS alternatives and backend decision (a CUTLASS Choice only on a measured win)."""
    from dskc.select import backends
    from dskc.templates import cutlass

    problem = dict(c.problem)
    decision = backends.decide(c.stem, problem, arch, runs_on=runs_on)
    if decision is None:
        return c
    alts = (cutlass.OPS[backends.cutlass_op(c.stem, problem)],)
    if decision.backend == "triton":
        return dataclasses.replace(c, why=decision.why, alternatives=alts)
    if node.op not in RUNTIME_CUTLASS:
        return dataclasses.replace(c, alternatives=alts, why=f"Triton: no CUTLASS path in the {node.op.value} "
                                   f"runtime module (CUTLASS {decision.why})")
    return Choice(c.region, decision.stem, c.problem, decision.config, decision.source, "cutlass", decision.why,
                  alts, (c.stem, c.config, c.source), c.slot, c.tokens)
