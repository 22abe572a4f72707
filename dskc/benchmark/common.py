"""What every suite shares: the run context, published figures, tuned-config lookup, torch.compile and the
external libraries that join when importable."""
from __future__ import annotations

import dataclasses
import importlib.util

import torch

E4M3 = torch.float8_e4m3fn
H800 = "H800 SXM5 (NVCC 12.8), as published"
DEEPGEMM_SRC = "deepseek-ai/DeepGEMM README (REFERENCE.md section 3)"
FLASHMLA_SRC = "deepseek-ai/FlashMLA README (REFERENCE.md section 3)"

# (M, N, K) -> DeepGEMM's published TFLOPS (dense 1D2D, H800 SXM5, NVCC 12.8).
DEEPGEMM_DENSE = {(64, 2112, 7168): 206, (64, 24576, 1536): 289, (64, 7168, 16384): 336, (128, 7168, 16384): 645,
                  (128, 4096, 7168): 533, (4096, 2112, 7168): 1127, (4096, 24576, 1536): 1212,
                  (4096, 7168, 16384): 1520, (4096, 4096, 7168): 1410, (4096, 7168, 2048): 1168}
# (layout, groups, M per group, N, K) -> DeepGEMM's published TFLOPS (H800 SXM5); masked: every group full.
DEEPGEMM_GROUPED = {("contiguous", 4, 8192, 4096, 7168): 1346, ("contiguous", 8, 4096, 7168, 2048): 1214,
                    ("masked", 1, 1024, 4096, 7168): 1233, ("masked", 4, 256, 7168, 2048): 815}
# FlashMLA's decode grid (h_q, batch, seqlen) and its published H800 figures.
FLASHMLA_GRID = [(h, b, n) for h in (16, 32, 64, 128) for b in (64, 128) for n in (4096, 16384)]
FLASHMLA_GBPS, FLASHMLA_TFLOPS, FLAGGEMS_GBPS = 3000, 660, 1180


@dataclasses.dataclass(frozen=True)
class Ctx:
    """One bench run: device ("cuda" | "cpu"), smoke (tiny shapes, interpreter), arch name for tuned lookups
    (None on the CPU), torch.compile mode for kernel baselines (None: not run, with `compile_skip` as reason)."""
    device: str
    smoke: bool
    arch: str | None
    compile_mode: str | None
    compile_skip: str = ""

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"


def make_ctx(smoke: bool, compile_mode: str | None) -> Ctx:
    if smoke:
        return Ctx("cpu", True, None, None, "torch.compile baselines run in the GPU suites only (the CPU smoke "
                                             "run must stay under a minute)")
    if not torch.cuda.is_available():
        raise RuntimeError("the gemm / moe / mla / model suites need a CUDA GPU; on the CPU run --suite smoke")
    from dskc.arch import detect
    skip = "" if compile_mode else "torch.compile baselines turned off (--torch-compile off)"
    return Ctx("cuda", False, detect().name, compile_mode, skip)


def have(module: str) -> bool:
    """True when `module` can be imported here (external libraries join the benches automatically)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def tuned_impl(ctx: Ctx, stem: str, problem: dict, run) -> "Impl":
    """The "dskc-tuned" row: run(config) -> callable with the autotuner's exported config for this arch and
    problem. No entry: a skipped row saying why; an unreadable export: an error row with the reader's message."""
    from dskc.benchmark.cases import Impl

    if ctx.arch is None:
        return Impl("dskc-tuned", skip="tuned configs are looked up for a CUDA arch only (none in a CPU smoke run)")
    from dskc.select import tuned
    try:
        cfg, why = tuned.lookup(stem, ctx.arch, problem)
    except ValueError as exc:   # TunedFileError is a ValueError: recorded as this row's error, not hidden
        def fail(exc=exc):
            raise exc
        return Impl("dskc-tuned", fail)
    if cfg is None:
        return Impl("dskc-tuned", skip=f"no tuned entry for {stem} {problem} on {ctx.arch}: {why}")
    return Impl("dskc-tuned", lambda: run(cfg), note=f"{why}: {cfg}")


def compiled(ctx: Ctx, fn):
    """torch.compile(fn) with the run's mode (the caller only uses it when ctx.compile_mode is set).

    Dynamo's caches are reset first: every case compiles the same baseline function (one code object) at a new
    shape, and past the recompile limit (8) Dynamo would silently run it eager."""
    torch._dynamo.reset()
    return torch.compile(fn, mode=ctx.compile_mode, dynamic=False)


def compile_impl(ctx: Ctx, make_fn) -> "Impl":
    """The torch.compile row of a case: make_fn() -> (fn, args); the compiled fn is called on args."""
    from dskc.benchmark.cases import Impl

    if not ctx.compile_mode:
        return Impl("torch-compile", skip=ctx.compile_skip)

    def make():
        fn, args = make_fn()
        cfn = compiled(ctx, fn)
        return lambda: cfn(*args)
    return Impl("torch-compile", make, note=f"mode={ctx.compile_mode}")


def rel_err(out, ref) -> float:
    """Relative Frobenius error of out against ref (float64)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
