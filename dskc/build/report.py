"""`kernel_report`: what the compiler made of a template stem for a problem on an arch (no GPU needed)."""
from __future__ import annotations

from dskc.arch import parse
from dskc.build.triton_xc import CompileError, KernelReport, compile_kernels


def kernel_report(stem: str, problem: dict, arch: str = "sm90a", config: dict | None = None) -> list[KernelReport]:
    """Cross-compile every kernel of `stem` for `problem` with `config` (default: the arch's default config).

    Returns one KernelReport per kernel (registers, shared memory, spills, tensor-core SASS ops).
    Raises KeyError for an unknown stem or arch default, CompileError if a kernel does not build.
    """
    from dskc.templates import registry

    arch = parse(arch)
    mod = registry.get(stem)
    cfg = dict(config) if config is not None else registry.default_config(stem, arch)
    problem = mod.Problem.of(problem)          # fields with defaults may be left out; ValueError naming a missing one
    reports = compile_kernels(mod.compile_specs(problem, cfg), arch)
    for r in reports:
        if isinstance(r, CompileError):
            raise r
    return reports
