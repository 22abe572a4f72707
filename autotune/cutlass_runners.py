"""GPU runners for the CUTLASS stems (autotune/gpu.py runner contract), used by autotune/backends.py on a GPU.

Each builds the (stem, config) library (nvcc, served from the cache the parent already filled), loads it through
dskc.runtime.cutlass and returns launch / output / reference / min_cos for random inputs of the CUTLASS problem
(dense: M, N, K; grouped: G groups, M total rows split evenly, N, K). Outputs are poisoned with NaN first.
Needs a CUDA GPU and nvcc; never imported on the CPU test tier.
"""
from __future__ import annotations

import torch


def _library(stem: str, problem: dict, config: dict):
    from dskc.runtime import cutlass as rt
    from dskc.templates import cutlass
    built = cutlass.build(stem, config, "sm90a", problem)
    if not built.ok:
        raise RuntimeError(f"{stem} does not build: {built.stage}: {built.message[:300]}")
    return rt.load(built)


def _fp8(shape, gen, device) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * 0.5).to(torch.float8_e4m3fn).to(device)


def _scales(shape, gen, device) -> torch.Tensor:
    return (torch.rand(*shape, generator=gen) + 0.5).to(device)


def _dequant_b(b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    n = b.shape[-2]
    return b.float() * sb.repeat_interleave(128, dim=-2)[..., :n, :].repeat_interleave(128, dim=-1)


def fp8_gemm(problem: dict, config: dict, device: str, routing=None) -> dict:
    m, n, k = problem["M"], problem["N"], problem["K"]
    gen = torch.Generator().manual_seed(0)
    a, b = _fp8((m, k), gen, device), _fp8((n, k), gen, device)
    sa, sb = _scales((m, k // 128), gen, device), _scales((-(-n // 128), k // 128), gen, device)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
    fn = _library("sm90_fp8_gemm_1d2d", problem, config)
    return {"launch": lambda: fn(a, sa, b, sb, out=out), "output": lambda: out, "min_cos": 0.999,
            "reference": lambda: (a.float() * sa.repeat_interleave(128, dim=1)) @ _dequant_b(b, sb).T}


def bf16_gemm(problem: dict, config: dict, device: str, routing=None) -> dict:
    m, n, k = problem["M"], problem["N"], problem["K"]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
    b = torch.randn(n, k, generator=gen).to(device, torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
    fn = _library("sm90_bf16_gemm", problem, config)
    return {"launch": lambda: fn(a, b, out=out), "output": lambda: out, "min_cos": 0.999,
            "reference": lambda: a.float() @ b.float().T}


def fp8_grouped_gemm(problem: dict, config: dict, device: str, routing=None) -> dict:
    g, rows, n, k = problem["G"], problem["M"], problem["N"], problem["K"]
    gen = torch.Generator().manual_seed(0)
    a, b = _fp8((rows, k), gen, device), _fp8((g, n, k), gen, device)
    sa, sb = _scales((rows, k // 128), gen, device), _scales((g, -(-n // 128), k // 128), gen, device)
    ends = [(i + 1) * rows // g for i in range(g)]
    offs = torch.tensor(ends, dtype=torch.int32, device=device)
    out = torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device=device)
    fn = _library("sm90_fp8_grouped_gemm_1d2d", problem, config)

    def reference():
        a32, b32, start, parts = a.float() * sa.repeat_interleave(128, dim=1), _dequant_b(b, sb), 0, []
        for i, end in enumerate(ends):
            parts.append(a32[start:end] @ b32[i].T)
            start = end
        return torch.cat(parts)

    return {"launch": lambda: fn(a, sa, b, sb, offs, out=out), "output": lambda: out, "reference": reference,
            "min_cos": 0.999}
