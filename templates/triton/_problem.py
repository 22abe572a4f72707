"""What every stem's `Problem` shares (not a stem itself: it defines no STEM).

A stem's Problem is a frozen dataclass of the facts a launch depends on (shapes, dtypes, layout, epilogue). It is
the one description of the stem's problem: the tuner's model problems, selection, the CUTLASS mapping,
`compile_specs` and the op's launch all build it the same way. BUCKETS says how each field is bucketed for tuned
lookups and the per-token-count config tables: "pow2" (rounded up to a power of two: token and row counts) or
"exact". `launch(name, constexprs, config)` gives the keyword arguments of one kernel launch (constexprs plus the
config's num_warps / num_stages), the same dict `compile_specs` builds its CompileSpec from, so the cubin a build
ships and the launch the runtime makes cannot drift apart.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar


def pow2(v: int) -> int:
    """v rounded up to a power of two (1 for v <= 1)."""
    return 1 << max(0, int(v) - 1).bit_length()


class ProblemBase:
    """Mixin for the frozen Problem dataclasses of the stems."""
    BUCKETS: ClassVar[dict] = {}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, problem) -> "ProblemBase":
        """A Problem from itself or a dict with (at least) the fields without defaults; extra keys are ignored."""
        if isinstance(problem, cls):
            return problem
        names = cls.names()
        try:
            return cls(**{k: v for k, v in dict(problem).items() if k in names})
        except TypeError as exc:
            raise ValueError(f"{cls.__module__.rpartition('.')[2]} problem {dict(problem)} lacks a field: {exc}") \
                from None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def items(self) -> tuple:
        """Sorted (field, value) pairs (what Choice.problem holds)."""
        return tuple(sorted(self.as_dict().items()))

    def bucket(self) -> "ProblemBase":
        """The problem with its pow2 fields rounded up (the key of tuned entries and config tables)."""
        changes = {f: pow2(getattr(self, f)) for f, kind in self.BUCKETS.items()
                   if kind == "pow2" and isinstance(getattr(self, f), int) and getattr(self, f) > 0}
        return dataclasses.replace(self, **changes) if changes else self

    def bucket_kinds(self) -> dict:
        return {n: self.BUCKETS.get(n, "exact") for n in self.names()}


def launch(constexprs: dict, config: dict, num_stages: int | None = None) -> dict:
    """Launch keyword arguments: the constexprs plus num_warps and num_stages (the config's, or `num_stages` for a
    kernel whose stage count is fixed). Always explicit: a launch without num_stages gets Triton's default (3),
    which a cubin built with another count does not serve."""
    return {**constexprs, "num_warps": config["num_warps"],
            "num_stages": config.get("num_stages", 1) if num_stages is None else num_stages}


def element(dtype: str) -> str:
    """Triton pointer type of an activation dtype name ("bf16", "fp16", "fp32", "fp8")."""
    return {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp8": "*fp8e4nv", "bfloat16": "*bf16",
            "float16": "*fp16", "float32": "*fp32"}[dtype]


def dtype_name(dtype) -> str:
    """"bf16" | "fp16" | "fp32" | "fp8" for a torch dtype (or a name already)."""
    if isinstance(dtype, str):
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    import torch
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float8_e4m3fn: "fp8"}[dtype]
