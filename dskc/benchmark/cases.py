"""Bench cases, implementations and result rows: what every suite builds and the runner measures.

A Case is one problem (shape) of one kernel stem with its work (flops, bytes); an Impl is one way to run it
(dskc with its default config, dskc with a tuned config, a torch baseline, an external library, a published
figure). `Impl.make()` prepares operands and returns a zero-argument callable; a failure there or in the call is
recorded in the row (status "error"), never hidden.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

# impl name -> what it is (copied into every result file's "impls").
IMPLS = {
    "dskc-default": "dskc kernel with the stem's tuning-free default config for this arch",
    "dskc-tuned": "dskc kernel with the autotuner's exported config for this shape (autotune/configs/<arch>)",
    "dskc-bf16": "dskc kernel on bf16 operands (default config)",
    "dskc": "dskc.compiler.compile(model): the model on dskc's generated kernels",
    "dskc-backend": "torch.compile(model, backend='dskc'): a transformers model's MoE / MLP / MLA regions and linears "
                    "on dskc's kernels, the rest on Inductor (aot_eager in the CPU smoke run)",
    "torch-bf16": "torch eager bf16 (torch.matmul / the model in plain PyTorch)",
    "torch-scaled-mm": "torch._scaled_mm fp8 with row-wise scales (cuBLASLt; coarser scaling than 1D2D)",
    "torch-grouped-mm": "torch._grouped_mm bf16 (eager)",
    "torch-sdpa": "torch scaled_dot_product_attention on a contiguous (un-paged) cache",
    "torch-compile": "torch.compile (Inductor, mode in the note) of the torch eager baseline",
    "deep_gemm": "DeepGEMM, imported from this environment",
    "flash_mla": "FlashMLA, imported from this environment",
    "vllm": "vLLM fused_experts (Triton), imported from this environment",
    "published-deepgemm": "DeepGEMM's published figure (REFERENCE.md section 3), not measured here",
    "published-flashmla": "FlashMLA's published figure (REFERENCE.md section 3), not measured here",
    "published-flaggems": "FlagGems' Triton MLA decode as published (REFERENCE.md section 3), not measured here",
}


@dataclasses.dataclass(frozen=True)
class Impl:
    """One way to run a case. make() -> zero-arg callable (its result may be compared with Case.ref).
    skip: a reason not to run (recorded). published: (value, hardware, source[, metric]) for a reference row.
    count: () -> kernels one call launches (the model suite: dskc.runtime.counter), run after the timing."""
    name: str
    make: Callable | None = None
    skip: str | None = None
    note: str = ""
    published: tuple | None = None
    count: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    """One problem. primary: the figure that ranks impls ("tflops" | "gbps" | "tokens_per_s").
    ceiling: which compute ceiling the TFLOPS are compared with ("bf16_matmul" | "fp8_scaled_mm").
    tokens: tokens per call (model suite: tokens/s = tokens / time). ref: a callable giving the reference output
    (smoke cases: float64 torch) that each impl's output is compared with (relative Frobenius error)."""
    suite: str
    name: str
    stem: str
    shape: dict
    impls: tuple
    flops: float | None = None
    bytes: float | None = None
    primary: str = "tflops"
    ceiling: str = "bf16_matmul"
    tokens: int | None = None
    ref: Callable | None = None


def empty_row(case: Case, impl: Impl) -> dict:
    return {"suite": case.suite, "case": case.name, "stem": case.stem, "shape": dict(case.shape), "impl": impl.name,
            "kind": "published" if impl.published else "measured", "status": "ok", "primary": case.primary,
            "ms": None, "flops": case.flops, "bytes": case.bytes, "tflops": None, "gbps": None, "tokens_per_s": None,
            "pct_compute": None, "pct_bandwidth": None, "rel_err": None, "note": impl.note, "hardware": None,
            "source": None, "launches_per_step": None}


def fill_figures(row: dict, case: Case, ms: float, ceilings: dict) -> dict:
    """Derived figures of a measured time: TFLOP/s, GB/s, tokens/s and % of this run's ceilings."""
    row["ms"] = ms
    if case.flops:
        row["tflops"] = case.flops / ms / 1e9
        ceil = ceilings.get(case.ceiling) or ceilings["bf16_matmul"]
        row["pct_compute"] = 100.0 * row["tflops"] / ceil["value"]
    if case.bytes:
        row["gbps"] = case.bytes / ms / 1e6
        row["pct_bandwidth"] = 100.0 * row["gbps"] / ceilings["copy"]["value"]
    if case.tokens:
        row["tokens_per_s"] = case.tokens / ms * 1e3
    return row


def published_row(case: Case, impl: Impl) -> dict:
    """A reference row: published = (value, hardware, source[, metric]); metric defaults to the case's primary.
    The other figures follow from the implied time on this case's work (no % of ceilings: other hardware)."""
    value, hardware, source, *rest = impl.published
    metric = rest[0] if rest else case.primary
    row = empty_row(case, impl)
    row.update(hardware=hardware, source=source)
    work = {"tflops": (case.flops, 1e9), "gbps": (case.bytes, 1e6)}
    if metric in work and work[metric][0]:
        row["ms"] = work[metric][0] / value / work[metric][1]
        row["tflops"] = case.flops / row["ms"] / 1e9 if case.flops else None
        row["gbps"] = case.bytes / row["ms"] / 1e6 if case.bytes else None
    row[metric] = float(value)
    return row
