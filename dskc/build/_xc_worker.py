"""Subprocess worker for triton_xc: reads specs as JSON on stdin, compiles each for the target, prints results.

Runs without TRITON_INTERPRET, so @triton.jit kernels are real JITFunctions here.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import traceback

from dskc.build.cache import ENVIRONMENT_ERRNOS
from dskc.build.triton_xc import parse_resource_usage, parse_spills, tensor_core_ops


def _bin(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas_verbose(ptx: str, arch: str, workdir: str) -> str:
    """ptxas -v with the flags Triton's own build uses, so the spill figures match the cubin we keep."""
    path = os.path.join(workdir, "k.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    for tool in ("ptxas-blackwell", "ptxas"):
        exe = _bin(tool)
        if not os.path.exists(exe):
            continue
        proc = subprocess.run([exe, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", path,
                               "-o", os.devnull], capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stderr + proc.stdout
    return ""


def _compile_one(spec: dict, cc: int, suffix: str, workdir: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    given = {k: v for k, v in spec["signature"]}
    if sorted(given) != sorted(fn.arg_names):
        raise ValueError(f"signature names {sorted(given)} are not {spec['kernel']}'s parameters {fn.arg_names}")
    sig = {name: given[name] for name in fn.arg_names}   # in parameter order: attrs below index parameters
    consts = {k: v for k, v in spec["constexprs"]}
    # Pointer arguments are 16-byte aligned, as Triton's launcher specialises them at run time on a GPU (dskc.ops
    # checks it before launching); without this a cross-compile loses vectorised loads and reports false spills.
    unaligned = set(spec.get("unaligned", ()))
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, t) in enumerate(sig.items())
             if t.startswith("*") and name not in unaligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                        options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    out_dir = tempfile.mkdtemp(dir=workdir)
    cubin = os.path.join(out_dir, "kernel.cubin")
    with open(cubin, "wb") as f:
        f.write(ck.asm["cubin"])
    with open(os.path.join(out_dir, "kernel.ptx"), "w") as f:
        f.write(ck.asm["ptx"])
    meta_json = os.path.join(out_dir, "kernel.json")  # Triton's own metadata: what a launcher needs (dskc.runtime.aot)
    with open(meta_json, "w") as f:
        f.write(json.dumps(ck.metadata._asdict(), default=vars))
    usage = parse_resource_usage(subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", cubin],
                                                capture_output=True, text=True).stdout)
    sass = subprocess.run([_bin("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True).stdout
    stores, loads = parse_spills(_ptxas_verbose(ck.asm["ptx"], f"sm_{cc}{suffix}", workdir))
    meta = {"registers": usage["registers"], "stack": usage["stack"],
            "shared": max(int(ck.metadata.shared), usage["static_shared"]),
            "spill_stores": stores, "spill_loads": loads, "tensor_core_ops": tensor_core_ops(sass),
            "name": ck.metadata.name, "num_warps": spec["num_warps"],
            "divisible_by_16": [fn.arg_names[i] for (i,) in sorted(attrs)]}
    return {"files": {"kernel.cubin": cubin, "kernel.ptx": os.path.join(out_dir, "kernel.ptx"),
                      "kernel.json": meta_json}, "meta": meta}


def compile_all(req: dict) -> list[dict]:
    """One result per spec: {"files", "meta"}, {"error"} (the kernel does not build) or {"environment"} (the
    scratch folder is full or not writable: no verdict on the kernel; the caller raises cache.CacheError)."""
    cc, suffix = req["arch"]
    workdir = req["workdir"]  # the caller's temporary folder: it removes it after publishing the builds
    results = []
    for spec in req["specs"]:
        try:
            results.append(_compile_one(spec, cc, suffix, workdir))
        except Exception as exc:  # a failing config is a result, not a crash
            if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
                results.append({"environment": f"cannot write build files in {workdir}: {exc}; free space or "
                                               "point TMPDIR at a writable folder with room"})
            else:
                results.append({"error": f"{type(exc).__name__}: {exc}"[:4000],
                                "trace": traceback.format_exc()[-2000:]})
    return results


def main() -> None:
    results = compile_all(json.loads(sys.stdin.read()))
    sys.stdout.write("\n" + json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
