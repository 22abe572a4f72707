"""Launcher argument checks on CPU tensors: every error comes before anything needs a GPU."""
from __future__ import annotations

import re

import pytest
import torch

from dskc.build.nvcc import NvccFailure
from dskc.runtime import cutlass as rt

E4M3 = torch.float8_e4m3fn


def _fp8(*shape):
    return (torch.randn(*shape) * 2).to(E4M3)


def _grouped(t=77, g=3, n=136, k=256):
    a, b = _fp8(t, k), _fp8(g, n, k)
    sa, sb = torch.rand(t, k // 128) + 0.1, torch.rand(g, -(-n // 128), k // 128) + 0.1
    offs = torch.tensor([30, 30, t], dtype=torch.int32)[:g]
    return a, sa, b, sb, offs


def _misaligned(*shape, dtype):
    """A tensor whose data starts 1 element past a 16-byte boundary (same shape, unit-stride rows)."""
    numel = torch.Size(shape).numel()
    buf = torch.randn(numel + 16).to(dtype)
    return buf[1:1 + numel].view(*shape)


def test_grouped_check_accepts_valid_arguments():
    assert rt.Fp8GroupedGemm.check(*_grouped()) == (77, 3, 136, 256)


@pytest.mark.parametrize("mutate,exc,needle", [
    (lambda a: {"a": a["a"].to(torch.float16)}, TypeError, "a must be torch.float8_e4m3fn"),
    (lambda a: {"sa": a["sa"].double()}, TypeError, "sa must be torch.float32"),
    (lambda a: {"offs": a["offs"].long()}, TypeError, "offs must be torch.int32"),
    (lambda a: {"a": "tensor"}, TypeError, "a must be a torch.Tensor"),
    (lambda a: {"b": _fp8(3, 136, 384)}, ValueError, "a's K (256) and b's K (384) differ"),
    (lambda a: {"a": _fp8(77, 200), "b": _fp8(3, 136, 200)}, ValueError, "multiple of 128"),
    (lambda a: {"b": _fp8(3, 100, 256)}, ValueError, "N must be a positive multiple of 8"),
    (lambda a: {"sa": torch.rand(76, 2)}, ValueError, "sa must have shape (77, 2)"),
    (lambda a: {"sb": torch.rand(3, 1, 2)}, ValueError, "sb must have shape (3, 2, 2)"),
    (lambda a: {"offs": torch.tensor([77], dtype=torch.int32)}, ValueError, "offs must have shape (3,)"),
    (lambda a: {"a": _misaligned(77, 256, dtype=E4M3)}, ValueError, "16-byte aligned address"),
    (lambda a: {"b": _fp8(3, 136, 264)[:, :, :256]}, ValueError, "not a multiple of 16 bytes"),
    (lambda a: {"a": _fp8(256, 77).t()}, ValueError, "unit stride along its last dim"),
    (lambda a: {"sa": torch.rand(2, 77).t()}, ValueError, "sa must be contiguous"),
])
def test_grouped_check_rejects(mutate, exc, needle):
    a, sa, b, sb, offs = _grouped()
    args = {"a": a, "sa": sa, "b": b, "sb": sb, "offs": offs}
    args.update(mutate(args))
    with pytest.raises(exc, match=re.escape(needle)):
        rt.Fp8GroupedGemm.check(**args)


def test_grouped_out_is_checked():
    a, sa, b, sb, offs = _grouped()
    with pytest.raises(TypeError, match="out must be torch.bfloat16"):
        rt.Fp8GroupedGemm.check(a, sa, b, sb, offs, out=torch.full((77, 136), float("nan")))
    with pytest.raises(ValueError, match=r"out must have shape \(77, 136\)"):
        rt.Fp8GroupedGemm.check(a, sa, b, sb, offs, out=torch.empty(77, 128, dtype=torch.bfloat16))


def test_grouped_launch_on_cpu_tensors_fails_before_the_gpu(default_builds):
    gemm = rt.load(default_builds["sm90_fp8_grouped_gemm_1d2d"])
    a, sa, b, sb, offs = _grouped()
    with pytest.raises(ValueError, match="a is on cpu; CUTLASS kernels need CUDA tensors"):
        gemm(a, sa, b, sb, offs)
    with pytest.raises(ValueError, match="16-byte aligned"):           # shape/alignment checks come first
        gemm(_misaligned(77, 256, dtype=E4M3), sa, b, sb, offs)


def test_dense_fp8_check():
    a, b = _fp8(65, 384), _fp8(264, 384)
    sa, sb = torch.rand(65, 3) + 0.1, torch.rand(3, 3) + 0.1
    assert rt.Fp8Gemm.check(a, sa, b, sb) == (65, 264, 384)
    with pytest.raises(ValueError, match=r"sb must have shape \(3, 3\)"):
        rt.Fp8Gemm.check(a, sa, b, torch.rand(2, 3))
    with pytest.raises(ValueError, match="a must be \\[M, K\\] and b \\[N, K\\]"):
        rt.Fp8Gemm.check(a, sa, b.unsqueeze(0), sb)
    with pytest.raises(ValueError, match="on cpu"):
        rt._check_device({"a": a})


def test_bf16_check_and_cpu_launch(default_builds):
    gemm = rt.load(default_builds["sm90_bf16_gemm"])
    a, b = torch.randn(33, 72).bfloat16(), torch.randn(40, 72).bfloat16()
    assert rt.Bf16Gemm.check(a, b) == (33, 40, 72)
    with pytest.raises(TypeError, match="b must be torch.bfloat16"):
        gemm(a, b.half())
    with pytest.raises(ValueError, match="K must be a positive multiple of 8"):
        gemm(torch.randn(33, 70).bfloat16(), torch.randn(40, 70).bfloat16())
    with pytest.raises(ValueError, match="b is on cpu"):
        rt._check_device({"b": b})
    with pytest.raises(ValueError, match="a is on cpu; CUTLASS kernels need CUDA tensors"):
        gemm(a, b)


def test_load_rejects_failed_builds():
    with pytest.raises(TypeError, match="cannot load a failed build"):
        rt.load(NvccFailure("sm90_bf16_gemm", (), "sm90a", "nvcc", "error: boom"))
