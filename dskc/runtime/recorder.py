"""Recording what a compiled model launches: config-table lookups, Triton launches and every other device op.

`record()` is a context manager yielding a Recording with
- lookups: (region, slot, bucket, stem, config items) of every config-table lookup a kernel module made
  (dskc.runtime.table.ConfigTable.config);
- kernels: every Triton launch (the interpreter's, or the JIT's on a GPU) as a dict: module, function, constexprs
  (INTERP_FIX set to 0, the value every GPU launch and shipped cubin has), num_warps, num_stages, per argument its
  Triton type and value facts (pointer dtype + 16-byte alignment, int value, float);
- launches: (kernel name, scope) of each Triton launch (scopes: see below);
- ops: every other device op, as (aten op name, scope): each non-view aten op dispatched on a tensor that is not on
  the meta device, seen by a TorchDispatchMode (composite ops are counted as the ops they decompose into, the way
  they run). Ops that only allocate (empty, empty_strided, ...) or only alias (views, detach) launch no kernel and
  are not counted; nor is anything a Triton launch does inside the interpreter.

Scopes: `scoped(modules)` names the op/launch by the innermost of the given modules running it (forward pre/post
hooks), e.g. {"layers.0": block, "head": head}; outside them the scope is `Recording.scope` ("" by default; a caller
can set it, e.g. "step" around per-step work). dskc.runtime.counter builds per-step counts by layer type from these.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dskc.runtime.table import ConfigTable

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float8_e4m3fn: "*fp8e4nv",
        torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8", torch.int8: "*i8", torch.bool: "*i1"}
# aten ops that allocate or alias without launching a kernel (views are told by OpOverload.is_view)
NO_KERNEL = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
                       "_local_scalar_dense", "resize_", "set_", "_unsafe_view", "alias", "detach", "is_nonzero",
                       "record_stream", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"})


@dataclasses.dataclass
class Recording:
    lookups: list = dataclasses.field(default_factory=list)
    kernels: list = dataclasses.field(default_factory=list)
    launches: list = dataclasses.field(default_factory=list)  # (Triton kernel name, scope), one per launch
    ops: list = dataclasses.field(default_factory=list)       # (aten op name, scope)
    scope: str = ""                                           # the scope of what runs outside scoped modules
    _stack: list = dataclasses.field(default_factory=list)
    _in_triton: int = 0

    @property
    def current(self) -> str:
        return self._stack[-1] if self._stack else self.scope

    def launched_specs(self) -> set:
        """{(function, constexprs items, num_warps, num_stages)} of the launches."""
        return {(k["function"], tuple(sorted(k["constexprs"].items())), k["num_warps"], k["num_stages"])
                for k in self.kernels}

    def clear(self) -> None:
        self.lookups.clear()
        self.kernels.clear()
        self.launches.clear()
        self.ops.clear()

    @contextlib.contextmanager
    def scoped(self, modules: dict):
        """Attribute what `modules` ({scope name: module}) run to their names while inside the block."""
        def enter(name):
            return lambda module, args: self._stack.append(name)

        def leave(module, args, output):
            self._stack.pop()       # returns None: the output stays as it is

        handles = []
        for name, mod in modules.items():
            handles.append(mod.register_forward_pre_hook(enter(name)))
            handles.append(mod.register_forward_hook(leave))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _arg(value) -> dict:
    if isinstance(value, torch.Tensor):
        return {"type": _PTR[value.dtype], "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"type": "i1", "value": int(value)}
    if isinstance(value, int):
        return {"type": "int", "value": value}
    return {"type": "fp32", "value": float(value)}


class _OpCounter(TorchDispatchMode):
    """Every aten op on a device tensor that launches a kernel (see the module docstring)."""

    def __init__(self, rec: Recording):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:      # a composite (einsum, matmul, rms_norm on a CPU): count what it runs as
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if not self.rec._in_triton and not func.is_view and func._schema.name.split("::")[-1] not in NO_KERNEL:
            devices = {t.device.type for t in _tensors((args, kwargs, out))}
            if devices and devices != {"meta"}:
                self.rec.ops.append((func._schema.name.split("::")[-1], self.rec.current))
        return out


def _tensors(tree):
    flat, _ = torch.utils._pytree.tree_flatten(tree)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _launchers() -> list:
    """The classes whose `run` launches a Triton kernel here: the interpreter's and the JIT's."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    return [InterpretedFunction, JITFunction]


@contextlib.contextmanager
def record(ops: bool = True):
    """Record lookups, Triton launches and (ops=True) every other device op while the block runs."""
    rec = Recording()
    config = ConfigTable.config
    runs = {cls: cls.run for cls in _launchers()}

    def looked_up(self, slot, rows):
        cfg = config(self, slot, rows)
        c = self.choice(slot, rows)
        rec.lookups.append((self.region, slot, self.bucket(rows), c.stem, tuple(sorted(cfg.items()))))
        return cfg

    def hooked(run):
        def launched(self, *args, grid, warmup, **kwargs):
            if warmup or rec._in_triton:
                return run(self, *args, grid=grid, warmup=warmup, **kwargs)
            names = list(inspect.signature(self.fn).parameters)
            constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            if "INTERP_FIX" in constexprs:
                constexprs["INTERP_FIX"] = 0
            rec.kernels.append({"module": self.fn.__module__, "function": self.fn.__name__,
                                "constexprs": constexprs, "num_warps": kwargs.get("num_warps"),
                                "num_stages": kwargs.get("num_stages"),
                                "args": {names[i]: _arg(a) for i, a in enumerate(args)}})
            rec.launches.append((self.fn.__name__, rec.current))
            rec._in_triton += 1
            try:
                return run(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                rec._in_triton -= 1
        return launched

    ConfigTable.config = looked_up
    for cls, run in runs.items():
        cls.run = hooked(run)
    mode = _OpCounter(rec) if ops else contextlib.nullcontext()
    try:
        with mode:
            yield rec
    finally:
        ConfigTable.config = config
        for cls, run in runs.items():
            cls.run = run
