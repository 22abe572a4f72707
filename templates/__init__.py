"""Kernel templates, one stem per kernel: `triton/<stem>.py` and `cutlass/<stem>.cu.jinja`.

The contract every Triton stem module follows (the compiler, the autotuner and the benches rely on it):

    STEM: str                        # e.g. "fp8_gemm_1d2d"
    SPACE: dict[str, tuple]          # tunable parameter -> candidate values: the search space, as data
    CONSTRAINTS: tuple[str, ...]     # Python expressions over SPACE names and problem names that a config must meet,
                                     # e.g. "BLOCK_K == 128", "BLOCK_M * BLOCK_K + BLOCK_N * BLOCK_K <= 65536"
    DEFAULTS: dict[str, dict]        # "sm80" | "sm90" | "sm100" -> a tuning-free config (a dict over SPACE names)
    def problem_names() -> tuple[str, ...]      # the problem's fields, e.g. ("M", "N", "K")
    def compile_specs(problem: dict, config: dict) -> list[CompileSpec]
                                     # the kernels to build for this problem and config (for cross-compilation,
                                     # reports and pruning)
    def cost(problem: dict) -> tuple[float, float]   # (flops, bytes moved) of the problem, for roofline models

`registry.stems()` lists the stems; `registry.get(stem)` returns the module; `registry.default_config(stem, arch)`.
"""
