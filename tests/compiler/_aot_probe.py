"""Run without TRITON_INTERPRET (by test_aot_load.py): install a `dskc compile --out` DIR's hooks and ask each one,
through Triton's own argument binder and specialisation (as a JIT launch on an sm_90 GPU would), for its kernel.

Prints one JSON line: per shipped kernel, whether a matching launch was served by the shipped cubin, and whether a
misaligned pointer / another constexpr went to Triton's compile instead.
"""
import json
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import CompiledKernel, make_backend
from triton.runtime.jit import create_function_from_signature

from dskc.runtime import aot

_PTR = {"*fp16": torch.float16, "*bf16": torch.bfloat16, "*fp32": torch.float32, "*fp8e4nv": torch.float8_e4m3fn,
        "*i32": torch.int32, "*i64": torch.int64, "*u8": torch.uint8, "*i8": torch.int8, "*i1": torch.bool}
TARGET = GPUTarget("cuda", 90, 32)


def _src(fn, launch, misalign=False, constexpr_delta=0):
    args, kwargs = [], {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"], "debug": False}
    for name, t in launch["signature"].items():
        if t == "constexpr":
            v = launch["constexprs"][name]
            kwargs[name] = v + constexpr_delta if isinstance(v, int) and not isinstance(v, bool) else v
        elif t.startswith("*"):
            buf = torch.zeros(64, dtype=_PTR[t])
            args.append(buf[1:] if misalign and not args else buf)   # an odd element offset: not 16-byte aligned
        else:
            args.append(0.5 if t.startswith("fp") else 7)
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    n = len(args)
    names = [p.name for p in fn.params]
    kwargs.update({names[i]: args[i] for i in range(n)})
    bound, spec, opts = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    from triton.compiler import ASTSource
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


def main(out_dir):
    compiled_here = []
    installed = aot.install(out_dir)
    for h in installed.hooks:   # Triton's real compile is not run here: record that it would have been
        h.original = lambda src, target=None, options=None, h=h, **kw: compiled_here.append(h.fn.__name__)
    rows = []
    for h in installed.hooks:
        for e in h.entries:
            launch = e["launch"]
            src, options = _src(h.fn, launch)
            k = h(src, target=TARGET, options=options)
            row = {"function": launch["function"], "served": isinstance(k, CompiledKernel),
                   "name_ok": isinstance(k, CompiledKernel) and k.metadata.name == launch["function"],
                   "cubin_ok": isinstance(k, CompiledKernel)
                   and k.kernel == open(f"{out_dir}/{e['file']}", "rb").read()}
            before = len(compiled_here)
            h(*_src(h.fn, launch, misalign=True)[:1], target=TARGET, options=_src(h.fn, launch)[1])
            row["misaligned_compiles"] = len(compiled_here) == before + 1
            if any(t == "constexpr" and isinstance(launch["constexprs"][n], int)
                   and not isinstance(launch["constexprs"][n], bool) for n, t in launch["signature"].items()):
                before = len(compiled_here)
                src2, opt2 = _src(h.fn, launch, constexpr_delta=1)
                h(src2, target=TARGET, options=opt2)
                row["other_constexpr_compiles"] = len(compiled_here) == before + 1
            rows.append(row)
    print(json.dumps({"serving": installed.serving, "reason": installed.reason, "rows": rows,
                      "served": installed.stats.served, "compiled": installed.stats.compiled}))


if __name__ == "__main__":
    main(sys.argv[1])
