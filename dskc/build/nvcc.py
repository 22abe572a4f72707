"""Build rendered CUDA C++ (CUTLASS instantiations) with nvcc into shared libraries, cached by content.

`build_many(jobs)` compiles every `NvccJob` that the cache lacks, in parallel (`knobs.jobs` workers, one nvcc each
with `--threads 1`), and prints one progress line per build on stderr. Each job yields, in its slot, either an
`NvccBuild` (the .so path plus what ptxas and cuobjdump report: registers, spills, shared memory, tensor-core SASS
opcodes) or an `NvccFailure` carrying the compiler's message. Nothing here raises for a kernel that does not
compile: a failing candidate is a result, so one bad config cannot take a whole compile or tuning run down.

The cache key (kind "cutlass") holds the source hash (rendered text plus every header we own that it includes),
the config, the arch, the nvcc flags and the toolchain: nvcc's release and the nvidia-cutlass version.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dskc import knobs
from dskc.arch import Arch, parse
from dskc.build import cache
from dskc.build.triton_xc import TENSOR_CORE_OPS

CUTLASS_DIST = "nvidia-cutlass"
_MAX_MESSAGE = 4000


@dataclasses.dataclass(frozen=True)
class NvccJob:
    """One translation unit to build: `source` is complete CUDA C++ (already rendered)."""
    name: str                     # the stem, e.g. "sm90_fp8_grouped_gemm_1d2d"
    config: tuple                 # sorted (param, value) pairs it was rendered with
    source: str
    arch: str = "sm90a"
    include_dirs: tuple = ()      # extra -I folders (CUTLASS's are added by `flags`)
    depends: tuple = ()           # files the source includes whose content must key the cache


@dataclasses.dataclass(frozen=True)
class NvccBuild:
    name: str
    config: tuple
    arch: str
    library: str                  # path of the cached .so
    registers: int                # of the main kernel (the one using the most registers)
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int             # static shared memory (CUTLASS kernels take theirs dynamically)
    tensor_core_ops: tuple        # sorted distinct tensor-core SASS opcodes in the library
    seconds: float                # wall time of the build (0.0 when served from the cache)
    cached: bool
    ok: bool = True

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


@dataclasses.dataclass(frozen=True)
class NvccFailure:
    name: str
    config: tuple
    arch: str
    stage: str                    # "space" | "constraints" | "nvcc" | "timeout" | "tools"
    message: str
    ok: bool = False


def cutlass_root() -> Path:
    """The CUTLASS C++ tree that the nvidia-cutlass wheel carries (cutlass_library/source)."""
    import cutlass_library

    root = Path(cutlass_library.__file__).parent / "source"
    if not (root / "include" / "cutlass" / "cutlass.h").is_file():
        raise FileNotFoundError(f"CUTLASS headers not found under {root}; install {CUTLASS_DIST} 4.2")
    return root


def nvcc_version() -> str:
    """nvcc's release string, e.g. 'V13.0.88'; raises FileNotFoundError naming the knob when nvcc is missing."""
    exe = knobs.get().nvcc
    if shutil.which(exe) is None:
        raise FileNotFoundError(f"nvcc {exe!r} not found; put the CUDA toolkit on PATH or set DSKC_NVCC")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"\b(V\d+\.\d+\.\d+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


def toolchain() -> tuple:
    return (("cutlass", importlib.metadata.version(CUTLASS_DIST)), ("nvcc", nvcc_version()))


def flags(arch: Arch, include_dirs: tuple = ()) -> list[str]:
    """nvcc flags for a shared library with the kernel for `arch` (sm_90a needs its 'a' suffix for wgmma/TMA)."""
    if arch.suffix != "a":
        raise ValueError(f"CUTLASS 3.x kernels need an arch-specific target such as sm90a, not {arch.name}")
    root = cutlass_root()
    return ["-std=c++17", "-O3", "-DNDEBUG", "-shared", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
            f"-gencode=arch=compute_{arch.cc}{arch.suffix},code=sm_{arch.cc}{arch.suffix}", "--threads", "1",
            "-Xptxas", "-v", f"-I{root / 'include'}", f"-I{root / 'tools' / 'util' / 'include'}",
            *(f"-I{d}" for d in include_dirs)]


def _source_hash(job: NvccJob) -> str:
    h = hashlib.sha256(job.source.encode())
    for dep in sorted(job.depends):
        h.update(Path(dep).read_bytes())
    return h.hexdigest()


def cache_key(job: NvccJob, tools: tuple) -> cache.CacheKey:
    arch = parse(job.arch)
    portable = tuple(f for f in flags(arch) if not f.startswith("-I"))   # headers are keyed by version/content
    cfg = job.config + (("flags", portable),)
    return cache.CacheKey("cutlass", job.name, _source_hash(job), cfg, arch.name, tools)


def cuobjdump() -> str:
    """A cuobjdump: the CUDA toolkit's if on PATH, else the one Triton's wheel ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton

    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not exe.is_file():
        raise FileNotFoundError("no cuobjdump on PATH nor in triton's wheel; cannot read the built SASS")
    return str(exe)


def parse_ptxas(text: str) -> list[dict]:
    """Per-kernel figures from `ptxas -v`: name, registers, stack, spill stores/loads."""
    kernels = []
    for block in re.split(r"Compiling entry function '", text)[1:]:
        name = block.split("'", 1)[0]
        regs = re.search(r"Used (\d+) registers", block)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        smem = re.search(r"(\d+) bytes smem", block)
        kernels.append({"name": name, "registers": int(regs.group(1)) if regs else 0,
                        "stack": int(frame.group(1)) if frame else 0,
                        "spill_stores": int(frame.group(2)) if frame else 0,
                        "spill_loads": int(frame.group(3)) if frame else 0,
                        "shared": int(smem.group(1)) if smem else 0})
    return kernels


def tensor_core_ops(sass: str) -> list[str]:
    return sorted(set(re.findall(r"\b(" + "|".join(TENSOR_CORE_OPS) + r")\b", sass)))


def _compile(job: NvccJob, tmp: Path) -> dict:
    """Run nvcc in `tmp` (the cache's staging dir); raise _BuildError with the compiler's message on failure."""
    arch = parse(job.arch)
    src, lib = tmp / "kernel.cu", tmp / "kernel.so"
    src.write_text(job.source)
    cmd = [knobs.get().nvcc, *flags(arch, job.include_dirs), str(src), "-o", str(lib)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=knobs.get().compile_timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise _BuildError("timeout", f"nvcc ran past DSKC_COMPILE_TIMEOUT={knobs.get().compile_timeout_s:g} s") \
            from exc
    if proc.returncode != 0 or not lib.is_file():
        if os.strerror(errno.ENOSPC) in proc.stderr + proc.stdout:   # the disk, not the kernel: cache.CacheError
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        raise _BuildError("nvcc", f"nvcc exited {proc.returncode}: {summarize_errors(proc.stderr + proc.stdout)}")
    kernels = parse_ptxas(proc.stderr + proc.stdout)
    sass = subprocess.run([cuobjdump(), "--dump-sass", str(lib)], capture_output=True, text=True)
    if sass.returncode != 0:
        raise _BuildError("tools", f"cuobjdump --dump-sass failed: {sass.stderr[-_MAX_MESSAGE:]}")
    return {"kernels": kernels, "tensor_core_ops": tensor_core_ops(sass.stdout)}


class _BuildError(Exception):
    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def summarize_errors(text: str) -> str:
    """The compiler's error lines (static_assert reasons first), trimmed to a readable size."""
    lines = [ln.strip() for ln in text.splitlines() if re.search(r"\berror\b", ln)]
    picked = "\n".join(lines) if lines else text.strip()
    return picked[:_MAX_MESSAGE]


def _result(job: NvccJob, entry: Path, seconds: float, cached: bool) -> NvccBuild:
    meta = cache.read_meta(entry)
    main = max(meta["kernels"], key=lambda k: k["registers"]) if meta["kernels"] else {
        "registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "shared": 0}
    return NvccBuild(name=job.name, config=job.config, arch=parse(job.arch).name, library=str(entry / "kernel.so"),
                     registers=main["registers"], stack_bytes=main["stack"],
                     spill_store_bytes=main["spill_stores"], spill_load_bytes=main["spill_loads"],
                     shared_bytes=main["shared"], tensor_core_ops=tuple(meta["tensor_core_ops"]),
                     seconds=seconds, cached=cached)


def build_one(job: NvccJob, tools: tuple) -> NvccBuild | NvccFailure:
    """Build (or fetch from the cache) one job; a failure comes back as an NvccFailure, never raised. A cache that
    cannot be written (no permission, the disk full) raises cache.CacheError: no verdict on the kernel."""
    start = time.monotonic()
    try:
        entry, hit = cache.get_or_build(cache_key(job, tools), lambda tmp: _compile(job, tmp))
    except _BuildError as exc:
        return NvccFailure(job.name, job.config, parse(job.arch).name, exc.stage, str(exc))
    except (OSError, ValueError) as exc:
        return NvccFailure(job.name, job.config, parse(job.arch).name, "tools", f"{type(exc).__name__}: {exc}")
    return _result(job, entry, 0.0 if hit else time.monotonic() - start, hit)


def describe(res: NvccBuild | NvccFailure) -> str:
    cfg = ",".join(f"{k}={v}" for k, v in res.config)
    if not res.ok:
        first = res.message.splitlines()[0] if res.message else ""
        return f"{res.name}[{cfg}] FAILED ({res.stage}): {first[:300]}"
    how = "cached" if res.cached else f"built in {res.seconds:.1f} s"
    return (f"{res.name}[{cfg}] {how}: {res.registers} regs, spills {res.spill_store_bytes}/"
            f"{res.spill_load_bytes} B, tensor cores {','.join(res.tensor_core_ops) or 'none'}")


def build_many(jobs: list[NvccJob], progress: bool = True) -> list[NvccBuild | NvccFailure]:
    """Build every job, `knobs.jobs` at a time; results in the order of `jobs`, one progress line each on stderr."""
    if not jobs:
        return []
    try:
        tools = toolchain()
    except (OSError, importlib.metadata.PackageNotFoundError) as exc:
        return [NvccFailure(j.name, j.config, parse(j.arch).name, "tools", str(exc)) for j in jobs]
    out: list = [None] * len(jobs)
    workers = max(1, min(knobs.get().jobs, len(jobs)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(build_one, job, tools): i for i, job in enumerate(jobs)}
        for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            i = futures[fut]
            out[i] = fut.result()
            if progress:
                print(f"[dskc nvcc {done}/{len(jobs)}] {describe(out[i])}", file=sys.stderr, flush=True)
    return out
