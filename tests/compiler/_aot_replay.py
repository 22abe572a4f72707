"""Run without TRITON_INTERPRET (by test_aot_replay.py): replay a compiled model's recorded launches through the
hooks `dskc.runtime.aot.install` puts on a `dskc compile --out` DIR's kernels, with Triton's own argument binder
and specialisation for an sm_90 target (what a JIT launch on the GPU does before it compiles), and count what the
shipped cubins served and what would have compiled here.

argv: DIR, a JSON file of recorded launches (tests/compiler/_launches.py's Recording.kernels). Prints one JSON line.
"""
import importlib
import json
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import CompiledKernel, make_backend
from triton.runtime.jit import create_function_from_signature

from dskc.runtime import aot

_DT = {"*fp16": torch.float16, "*bf16": torch.bfloat16, "*fp32": torch.float32, "*fp8e4nv": torch.float8_e4m3fn,
       "*i32": torch.int32, "*i64": torch.int64, "*u8": torch.uint8, "*i8": torch.int8, "*i1": torch.bool}
TARGET = GPUTarget("cuda", 90, 32)


def _source(fn, launch: dict):
    """(ASTSource, options) Triton's JIT makes for this launch on TARGET."""
    kwargs = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"], "debug": False,
              **launch["constexprs"]}
    for name, a in launch["args"].items():
        if a["type"].startswith("*"):
            buf = torch.zeros(64, dtype=_DT[a["type"]])
            kwargs[name] = buf if a["aligned"] else buf[1:]
        elif a["type"] == "fp32":
            kwargs[name] = a["value"]
        else:
            kwargs[name] = bool(a["value"]) if a["type"] == "i1" else int(a["value"])
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


def main(out_dir, launches_file):
    launches = json.loads(open(launches_file).read())
    installed = aot.install(out_dir)
    compiled_here = []
    hooks = {(h.fn.__module__, h.fn.__name__): h for h in installed.hooks}
    for h in installed.hooks:   # Triton's real compile never runs here: record that it would have
        h.original = lambda src, target=None, options=None, h=h, **kw: compiled_here.append(h.fn.__name__)
    served, missing = 0, []
    for launch in launches:
        h = hooks.get((launch["module"], launch["function"]))
        if h is None:
            missing.append(launch["function"])
            continue
        fn = getattr(importlib.import_module(launch["module"]), launch["function"])
        src, options = _source(fn, launch)
        served += isinstance(h(src, target=TARGET, options=options), CompiledKernel)
    print(json.dumps({"serving": installed.serving, "reason": installed.reason, "launches": len(launches),
                      "served": served, "compiled_here": len(compiled_here) + len(missing),
                      "not_shipped": sorted(set(missing)), "misses": installed.stats.misses[:10]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
