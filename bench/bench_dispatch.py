"""Host-side cost of one dskc op call with the kernel launch stubbed out, next to a plain torch op's dispatch.

What a decode step pays per kernel before the GPU sees anything: input checks, the config lookup, output
allocation, grid arithmetic. The launch itself (Triton's argument binding and the driver call) is replaced by a
no-op on the JIT class, so the figure is dskc's own overhead. Rows:
- "fp8_gemm", "act_quant", "grouped_gemm": the public op on small CPU tensors (interpreter knob set, launch stubbed);
- "tuned_lookup": the tuned-config lookup a CUDA call of fp8_gemm makes (dskc.ops.fp8._config's base);
- "torch_add": torch.add(a, b, out=c) on the same small tensors, a plain PyTorch dispatch.

Run: `pytest bench/bench_dispatch.py --benchmark-enable` (CPU, no GPU needed; figures are host microseconds).
In the default run (benchmarks disabled) each row runs once, so the bench code cannot rot.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import pytest
import torch
import triton.runtime.jit as jit

from dskc import knobs

pytestmark = pytest.mark.skipif(not knobs.get().triton_interpret and not torch.cuda.is_available(),
                                reason="dskc ops need the interpreter knob or a GPU")


@contextlib.contextmanager
def _launch_stubbed():
    """Every `kernel[grid](...)` is a no-op while inside (the JIT class's __getitem__ is patched)."""
    saved = jit.KernelInterface.__getitem__
    calls = []
    jit.KernelInterface.__getitem__ = lambda self, grid: (lambda *a, **k: calls.append(1))
    try:
        yield calls
    finally:
        jit.KernelInterface.__getitem__ = saved


def _fp8(m, n, k):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, generator=g).to(torch.float8_e4m3fn)
    return a, torch.rand(m, k // 128, generator=g) + 0.5, b, torch.rand(-(-n // 128), k // 128, generator=g) + 0.5


def _calls():
    from dskc import ops

    a, sa, b, sb = _fp8(4, 256, 256)
    out = torch.empty(4, 256, dtype=torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    e, rows = 4, 256
    ga = torch.randn(rows, 256).to(torch.float8_e4m3fn)
    gsa = torch.rand(rows, 2) + 0.5
    gb = torch.randn(e, 256, 256).to(torch.float8_e4m3fn)
    gsb = torch.rand(e, 2, 2) + 0.5
    gout = torch.empty(rows, 256, dtype=torch.bfloat16)
    block_expert = torch.arange(e, dtype=torch.int32).repeat_interleave(rows // 128 // e or 1)[:rows // 128]
    t1, t2, t3 = torch.randn(4, 256), torch.randn(4, 256), torch.empty(4, 256)
    return {
        "fp8_gemm": lambda: ops.fp8_gemm(a, sa, b, sb, out=out),
        "act_quant": lambda: ops.act_quant(x),
        "grouped_gemm": lambda: ops.grouped_gemm(ga, gsa, gb, gsb, gout, block_expert=block_expert, align=128),
        "torch_add": lambda: torch.add(t1, t2, out=t3),
    }


@pytest.mark.parametrize("row", ["fp8_gemm", "act_quant", "grouped_gemm", "torch_add"])
def test_dispatch(benchmark, row):
    fn = _calls()[row]
    with _launch_stubbed() as launches:
        fn()
        benchmark.pedantic(fn, rounds=200, iterations=20, warmup_rounds=5)
    assert row == "torch_add" or launches, "the op launched nothing: the stub measured a no-op path"
    benchmark.extra_info["label"] = "host-side us per call (launch stubbed), CPU"


def test_tuned_lookup(benchmark):
    """The lookup of an exported tuned config for one fp8_gemm problem, as a CUDA launch makes it."""
    from dskc.select import tuned

    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "sm90a" / "fp8_gemm_1d2d.json"
        path.parent.mkdir(parents=True)
        cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "SPLIT_K": 1, "UPCAST": 0,
               "num_warps": 4, "num_stages": 4}
        entries = {f"M={m},N=256,K=256": {"bucket": {"M": m, "N": 256, "K": 256}, "config": cfg,
                                         "meta": {"toolchain": {}, "timing_mode": "model"}}
                   for m in (1, 16, 64, 256, 1024, 4096)}
        path.write_text(json.dumps({"format": 1, "stem": "fp8_gemm_1d2d", "arch": "sm90a",
                                    "buckets": {"M": "pow2", "N": "exact", "K": "exact"}, "entries": entries}))
        with knobs.scope(tuned_dir=Path(root)):
            found = lambda: tuned.lookup("fp8_gemm_1d2d", "sm90a", {"M": 4, "N": 256, "K": 256})  # noqa: E731
            assert found()[0] == cfg
            benchmark.pedantic(found, rounds=200, iterations=20, warmup_rounds=5)


def test_launch_config_resolution(benchmark):
    """What a CUDA call of fp8_gemm now pays for its config: the per-bucket cached resolution (dskc.ops._config),
    the tuned lookup above run once per (stem, arch, bucket). Runs the on-GPU branch on the CPU (no tensor needed)."""
    from dskc.ops import _config
    from dskc.templates.triton.fp8_gemm import Problem

    _config.clear()
    problem = Problem(4, 256, 256)
    found = lambda: _config._resolved("fp8_gemm_1d2d", "sm90a", True, problem.bucket(), ())  # noqa: E731
    assert found()["BLOCK_K"] == 128
    benchmark.pedantic(found, rounds=200, iterations=20, warmup_rounds=5)
