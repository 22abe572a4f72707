"""Recording what a compiled model launches (used by the plan-governs-launch and ahead-of-time tests).

`record()` is a context manager yielding a Recording with
- lookups: (region, slot, bucket, stem, config items) of every config-table lookup a kernel module made
  (dskc.runtime.table.ConfigTable.config), and
- kernels: every Triton launch the interpreter ran, as a dict: module, function, constexprs (INTERP_FIX set to 0,
  the value every GPU launch and shipped cubin has), num_warps, num_stages, and per argument its Triton type and
  value facts (pointer dtype + 16-byte alignment, int value, float).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch
from triton.runtime.interpreter import InterpretedFunction

from dskc.runtime.table import ConfigTable

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float8_e4m3fn: "*fp8e4nv",
        torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8", torch.int8: "*i8", torch.bool: "*i1"}


@dataclasses.dataclass
class Recording:
    lookups: list = dataclasses.field(default_factory=list)
    kernels: list = dataclasses.field(default_factory=list)

    def launched_specs(self) -> set:
        """{(function, constexprs items, num_warps, num_stages)} of the launches."""
        return {(k["function"], tuple(sorted(k["constexprs"].items())), k["num_warps"], k["num_stages"])
                for k in self.kernels}


def _arg(value) -> dict:
    if isinstance(value, torch.Tensor):
        return {"type": _PTR[value.dtype], "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"type": "i1", "value": int(value)}
    if isinstance(value, int):
        return {"type": "int", "value": value}
    return {"type": "fp32", "value": float(value)}


@contextlib.contextmanager
def record():
    rec = Recording()
    config, run = ConfigTable.config, InterpretedFunction.run

    def looked_up(self, slot, rows):
        cfg = config(self, slot, rows)
        c = self.choice(slot, rows)
        rec.lookups.append((self.region, slot, self.bucket(rows), c.stem, tuple(sorted(cfg.items()))))
        return cfg

    def launched(self, *args, grid, warmup, **kwargs):
        names = list(inspect.signature(self.fn).parameters)
        constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        if "INTERP_FIX" in constexprs:
            constexprs["INTERP_FIX"] = 0
        rec.kernels.append({"module": self.fn.__module__, "function": self.fn.__name__, "constexprs": constexprs,
                            "num_warps": kwargs.get("num_warps"), "num_stages": kwargs.get("num_stages"),
                            "args": {names[i]: _arg(a) for i, a in enumerate(args)}})
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    ConfigTable.config, InterpretedFunction.run = looked_up, launched
    try:
        yield rec
    finally:
        ConfigTable.config, InterpretedFunction.run = config, run


def steps(model, batches, vocab: int, seed: int = 0):
    """A prefill of each batch's prompt lengths [bsz, seqlen] then one decode step, on the compiled model."""
    gen = torch.Generator().manual_seed(seed)
    outs = []
    with torch.inference_mode():
        for bsz, seqlen in batches:
            tok = torch.randint(0, vocab, (bsz, seqlen), generator=gen)
            outs.append(model(tok, 0))
            outs.append(model(torch.randint(0, vocab, (bsz, 1), generator=gen), seqlen))
    return outs
