"""Kernel templates, one stem per kernel: `triton/<stem>.py` and `cutlass/<stem>.cu.jinja`.

The contract every Triton stem module follows (the compiler, the autotuner and the benches rely on it):

    STEM: str                        # e.g. "fp8_gemm_1d2d"
    SPACE: dict[str, tuple]          # tunable parameter -> candidate values: the search space, as data
    CONSTRAINTS: tuple[str, ...]     # Python expressions over SPACE names and problem names that a config must meet,
                                     # e.g. "BLOCK_K == 128", "BLOCK_M * BLOCK_K + BLOCK_N * BLOCK_K <= 65536"
    DEFAULTS: dict[str, dict]        # "sm80" | "sm90" | "sm100" -> a tuning-free config (a dict over SPACE names)
    class Problem                    # frozen dataclass: the stem's problem (shapes, dtypes, layout, ...) and its
                                     # BUCKETS (field -> "pow2" | "exact"); the one description selection, the tuner,
                                     # the CUTLASS mapping, compile_specs and the launch all use (triton/_problem.py)
    def bind(problem, config) -> dict[str, dict]
                                     # kernel name -> launch keyword arguments (constexprs, num_warps, num_stages):
                                     # what compile_specs builds and what the launcher passes, so they cannot drift
    def rule(problem, family, base, sms, fits) -> dict    # optional: the tuning-free config for a problem
    def problem_names() -> tuple[str, ...]      # Problem's fields
    def compile_specs(problem, config: dict) -> list[CompileSpec]
                                     # the kernels the problem launches with this config (for cross-compilation,
                                     # AOT shipping, reports and pruning); problem: a Problem or a dict of its fields
    def cost(problem: dict) -> tuple[float, float]   # (flops, bytes moved) of the problem, for roofline models

`registry.stems()` lists the stems; `registry.get(stem)` returns the module; `registry.default_config(stem, arch,
problem=None)` the DEFAULTS entry, or with a problem the stem's rule for it; `registry.problem(stem, dict)`.
A new kernel or fused stem joins the compiled model's per-bucket config tables by adding its slots to
dskc/select/launches.py and reading them (dskc.runtime.table) in its runtime module.
"""
