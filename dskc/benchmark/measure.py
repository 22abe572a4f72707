"""Timing, the environment record and the hardware ceilings measured in the same run as the benches.

On a GPU, times are CUDA-event medians after warm-up; on the CPU (smoke mode) they are wall-clock times of
interpreted kernels and only show that the bench code runs: they are never kernel performance.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import platform
import re
import signal
import subprocess
import threading
import time

import torch


def cuda_time_ms(fn, warmup: int = 3, samples: int = 15, max_s: float = 3.0) -> float:
    """Median milliseconds of one call of `fn` on the current CUDA device (CUDA events, calls batched so that one
    sample lasts ~1 ms or more; fewer samples, at least 3, for calls so slow that `samples` would pass max_s)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, min(100, int(1e-3 / once)))
    samples = max(min(samples, 3), min(samples, int(max_s / once)))
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[len(times) // 2]


class TimeLimit(BaseException):
    """A bench row ran past its time bound. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    in the code being measured (torch.compile's autotuning catches broadly) can swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise TimeLimit in the block once `seconds` of wall time pass (SIGALRM; it lands between Python bytecodes,
    so a C call finishes first). No bound for None or off the main thread. An interval timer set outside (e.g. by
    pytest-timeout) still bounds the block and is re-armed with its remaining time afterwards."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer, _ = signal.getitimer(signal.ITIMER_REAL)
    bound = min(seconds, outer) if outer > 0 else seconds

    def fire(signum, frame):
        raise TimeLimit(f"ran past its bound of {bound:.1f} s")
    previous = signal.signal(signal.SIGALRM, fire)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, max(bound, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


def cpu_time_ms(fn, warmup: int = 0, samples: int = 1) -> float:
    """Median wall-clock milliseconds of `fn` on the CPU (smoke mode: interpreted kernels, one call by default)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def time_ms(fn, device: str, **kw) -> float:
    """cuda_time_ms or cpu_time_ms by device ("cuda" | "cpu")."""
    if device == "cuda":
        return cuda_time_ms(fn, **kw)
    if device == "cpu":
        return cpu_time_ms(fn, **kw)
    raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    """GPU name, driver, toolchain versions and the git commit of this run (None where unknown)."""
    import triton

    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if gpu else None
    return {"device": device, "gpu": gpu, "driver": driver, "cuda": torch.version.cuda, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "dskc": _version("dskc"),
            "platform": f"{platform.system()} {platform.machine()}",
            "git_commit": _run(["git", "rev-parse", "--short", "HEAD"])}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def gpu_slug(name: str) -> str:
    """Folder name for a GPU: "NVIDIA H200" -> "nvidia-h200"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"GPU name {name!r} gives an empty folder name")
    return slug


def ceilings(device: str) -> dict:
    """Compute and bandwidth ceilings of this device, measured now: a large bf16 matmul (TFLOP/s), a large
    device-to-device copy (GB/s, bytes read + written), and on sm_89+ an fp8 torch._scaled_mm (TFLOP/s)."""
    gpu = device == "cuda"
    n = 8192 if gpu else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device, **({} if gpu else {"warmup": 1, "samples": 3}))
    out = {"bf16_matmul": {"name": f"bf16 matmul {n}^3 (torch)", "kind": "compute", "ms": ms,
                           "value": 2.0 * n ** 3 / ms / 1e9, "unit": "TFLOP/s", "detail": f"M=N=K={n}"}}
    numel = (1 << 30) if gpu else (1 << 22)
    src = torch.empty(numel, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, **({} if gpu else {"warmup": 1, "samples": 3}))
    out["copy"] = {"name": "device copy", "kind": "bandwidth", "ms": ms, "value": 2.0 * numel * 2 / ms / 1e6,
                   "unit": "GB/s", "detail": f"{numel * 2} bytes read + {numel * 2} written"}
    if gpu and torch.cuda.get_device_capability() >= (8, 9):
        out["fp8_scaled_mm"] = _fp8_ceiling(n)
    return out


def _fp8_ceiling(n: int) -> dict:
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    ms = cuda_time_ms(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    return {"name": f"fp8 torch._scaled_mm {n}^3", "kind": "compute", "ms": ms, "value": 2.0 * n ** 3 / ms / 1e9,
            "unit": "TFLOP/s", "detail": f"M=N=K={n}, per-tensor scales"}
