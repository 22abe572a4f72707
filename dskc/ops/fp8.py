"""Public FP8 / dense GEMM ops: activation quantisation (plain and fused) and block-scaled / bf16 GEMMs.

Every function checks its inputs (dtype, shape, device, contiguity, alignment) before any launch and raises
TypeError / ValueError naming the problem. Tensors must be CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
`config` (a dict over the stem's SPACE, see dskc.templates.triton.<stem>): a complete one is launched as it is (what
a compiled model passes from its plan), a partial one overrides keys of the base: the tuned export for this GPU and
the problem's bucket, else the stem's tuning-free rule (dskc.ops._config, cached per bucket).
"""
from __future__ import annotations

import math

import torch

from dskc.arch import family_of_device
from dskc.ops import _config as _cfg
from dskc.templates.triton import act_quant as _aq
from dskc.templates.triton import bf16_gemm as _bf16
from dskc.templates.triton import fp8_gemm as _fp8
from dskc.templates.triton._problem import dtype_name as _dt

__all__ = ["act_quant", "rmsnorm_act_quant", "rmsnorm", "silu_mul_act_quant", "fp8_gemm", "bf16_gemm"]

BLOCK = 128
FP8 = torch.float8_e4m3fn
_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _family(device: torch.device) -> str:
    """Key of the DEFAULTS tables for tensors on `device` (ValueError for a device dskc kernels cannot run on)."""
    return family_of_device(device)


def _check_tensor(name: str, t, dtypes, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dim() > 0 and t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:   # a size-1 dim has any stride
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride()})")


def _same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"tensors must share one device, got {devices}")
    _family(first)
    return first


def _check_out(out, shape: tuple, dtypes, device) -> None:
    _check_tensor("out", out, dtypes)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}, the inputs on {device}")


def _rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as a 2-D [rows, K] view (no copy); raises if the leading dims cannot be flattened."""
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension")
    try:
        return x.view(math.prod(x.shape[:-1]), x.shape[-1])   # not view(-1, K): K = 0 leaves -1 undefined
    except RuntimeError as exc:
        raise ValueError(f"{name} with shape {tuple(x.shape)} and stride {x.stride()} cannot be viewed as rows; "
                         f"make it contiguous") from exc


def _empty_quant(x2: torch.Tensor, k: int):
    """(q [rows, k] e4m3, s [rows, ceil(k/128)] fp32) for the rows of x2."""
    q = torch.empty(x2.shape[0], k, dtype=FP8, device=x2.device)
    s = torch.empty(x2.shape[0], -(-k // BLOCK), dtype=torch.float32, device=x2.device)
    return q, s


def act_quant(x: torch.Tensor, block: int = BLOCK, ue8m0: bool = False, config: dict | None = None):
    """Per-token 1x128 e4m3 quantisation: x [..., K] (bf16/fp16/fp32, last dim contiguous) -> (q, s).

    q [..., K] float8_e4m3fn, s [..., ceil(K/128)] fp32 with x ~= q * s per 128-column block;
    s = max(amax, 1e-4) / 448, rounded up to a power of two when `ue8m0`. Only block = 128 is supported.
    Non-finite x: a NaN or +-inf element becomes e4m3 NaN in q (never a finite value; e4m3fn has no inf) and is
    left out of its block's amax, so the block's other elements quantise as without it. The same holds for
    rmsnorm_act_quant and silu_mul_act_quant (where a NaN in a row's sum of squares makes that whole row NaN).
    """
    if block != BLOCK:
        raise ValueError(f"act_quant supports block = {BLOCK} only, got {block}")
    _check_tensor("x", x, _ACT_DTYPES)
    device = _same_device(x=x)
    x2 = _rows("x", x)
    cfg = _cfg.resolve("act_quant", device, config, _aq.Problem(x2.shape[0], x2.shape[1], _dt(x.dtype), "quant",
                                                                int(ue8m0)))
    q, s = _empty_quant(x2, x.shape[-1])
    if x2.numel():
        _aq.launch_act_quant(x2, q, s, ue8m0, cfg)
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def rmsnorm_act_quant(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
                      ue8m0: bool = False, config: dict | None = None, normed: torch.dtype | None = None):
    """RMSNorm then 1x128 e4m3 quantisation, optionally after a residual add (vLLM's fused_add_rms_norm).

    x [..., K] and residual (same shape and dtype) bf16/fp16/fp32; weight [K] of x's dtype.
    h = x + residual (rounded to the dtype); y = h * rsqrt(mean(h^2) + eps) * weight, rounded to x's dtype (what
    the unfused model would feed its Linear), then quantised as in `act_quant`.
    Returns (q, s) without residual, (q, s, h) with it: h is the new residual stream. normed (a float dtype, with a
    residual only): also return y itself in that dtype, (q, s, h, y): a consumer that needs the normed x unquantised
    (a MoE gate beside the FP8 experts) reads it from the same pass.
    """
    _check_norm(x, weight, eps, residual)
    if normed is not None and (residual is None or normed not in _ACT_DTYPES):
        raise ValueError(f"normed must be a float dtype, given with a residual (got {normed})")
    device = _same_device(x=x, weight=weight, residual=residual)
    x2 = _rows("x", x)
    op = ("add_rmsnorm_normed" if normed is not None else "add_rmsnorm") if residual is not None else "rmsnorm"
    cfg = _cfg.resolve("act_quant", device, config, _aq.Problem(x2.shape[0], x2.shape[1], _dt(x.dtype), op,
                                                                int(ue8m0), _y_dtype(normed, x.dtype)))
    r2 = _rows("residual", residual) if residual is not None else None
    q, s = _empty_quant(x2, x.shape[-1])
    h = torch.empty_like(x2) if residual is not None else None
    y = torch.empty(x2.shape, dtype=normed, device=device) if normed is not None else None
    if x2.numel():
        _aq.launch_rmsnorm_quant(x2, r2, weight, eps, q, s, h, ue8m0, cfg, y)
    outs = (q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1]))
    if residual is None:
        return outs
    return outs + (h.view(x.shape),) + ((y.view(x.shape),) if y is not None else ())


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None,
            config: dict | None = None) -> torch.Tensor:
    """RMSNorm alone: x [..., K] bf16/fp16/fp32, weight [K] of x's dtype -> y [..., K] in out_dtype (default x's),
    y = x * rsqrt(mean(x^2) + eps) * weight rounded to x's dtype (as F.rms_norm), stored in out_dtype (e.g. the
    dtype a 16-bit GEMM takes its operands in). act_quant's RMSNorm kernel without the quantisation."""
    _check_norm(x, weight, eps, None)
    out_dtype = out_dtype or x.dtype
    if out_dtype not in _ACT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in _ACT_DTYPES]}, got {out_dtype}")
    device = _same_device(x=x, weight=weight)
    x2 = _rows("x", x)
    cfg = _cfg.resolve("act_quant", device, config, _aq.Problem(x2.shape[0], x2.shape[1], _dt(x.dtype), "norm", 0,
                                                                _y_dtype(out_dtype, x.dtype)))
    y = torch.empty(x2.shape, dtype=out_dtype, device=device)
    if x2.numel():
        _aq.launch_rmsnorm_quant(x2, None, weight, eps, None, None, None, False, cfg, y)
    return y.view(x.shape)


def _y_dtype(normed, dtype) -> str:
    return "" if normed is None or normed == dtype else _dt(normed)


def _check_norm(x, weight, eps, residual) -> None:
    _check_tensor("x", x, _ACT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the normalised one)")
    _check_tensor("weight", weight, (x.dtype,), ndim=1)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[0]} elements, x's last dim is {x.shape[-1]}")
    if residual is not None:
        _check_tensor("residual", residual, (x.dtype,))
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def silu_mul_act_quant(gate_up: torch.Tensor, ue8m0: bool = False, config: dict | None = None):
    """SiLU(gate) * up then 1x128 e4m3 quantisation: gate_up [..., 2I] (gate first) -> (q [..., I], s).

    The product is formed in fp32 and quantised as in `act_quant`; s is [..., ceil(I/128)] fp32.
    """
    _check_tensor("gate_up", gate_up, _ACT_DTYPES)
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (gate | up), got shape {tuple(gate_up.shape)}")
    device = _same_device(gate_up=gate_up)
    g2 = _rows("gate_up", gate_up)
    inter = gate_up.shape[-1] // 2
    cfg = _cfg.resolve("act_quant", device, config, _aq.Problem(g2.shape[0], inter, _dt(gate_up.dtype), "silu_mul",
                                                                int(ue8m0)))
    q, s = _empty_quant(g2, inter)
    if g2.numel():
        _aq.launch_silu_mul_quant(g2, q, s, ue8m0, cfg)
    lead = gate_up.shape[:-1]
    return q.view(*lead, inter), s.view(*lead, s.shape[-1])


def _check_aligned(name: str, t: torch.Tensor) -> None:
    if t.data_ptr() % 16 or (t.shape[0] > 1 and (t.stride(0) * t.element_size()) % 16):
        raise ValueError(f"{name} rows must start 16-byte aligned (data_ptr {t.data_ptr()}, stride {t.stride()})")


def _check_fp8_operands(a, sa, b, sb) -> None:
    for name, t in (("a", a), ("b", b)):
        _check_tensor(name, t, (FP8,), ndim=2)
    for name, t in (("sa", sa), ("sb", sb)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D float32 tensor of scales")
    (M, K), (N, Kb) = a.shape, b.shape
    if K != Kb:
        raise ValueError(f"a is [M, K] = {tuple(a.shape)} but b is [N, K] = {tuple(b.shape)}: K differs")
    if K % BLOCK:
        raise ValueError(f"K = {K} must be a multiple of {BLOCK}")
    if tuple(sa.shape) != (M, K // BLOCK):
        raise ValueError(f"sa must be [M, K/128] = {(M, K // BLOCK)}, got {tuple(sa.shape)}")
    if tuple(sb.shape) != (-(-N // BLOCK), K // BLOCK):
        raise ValueError(f"sb must be [ceil(N/128), K/128] = {(-(-N // BLOCK), K // BLOCK)}, got {tuple(sb.shape)}")
    _check_aligned("a", a)
    _check_aligned("b", b)


def fp8_gemm(a, sa, b, sb, out=None, out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None,
             residual: torch.Tensor | None = None):
    """D[M, N] = (a * sa) @ (b * sb)^T, DeepSeek's "1D2D" block-scaled FP8 GEMM, fp32 accumulation.

    a [M, K] float8_e4m3fn with sa [M, K/128] fp32 (per token per 128 of K); b [N, K] float8_e4m3fn with
    sb [ceil(N/128), K/128] fp32 (per 128x128 block). Any M >= 0 and N; K a multiple of 128. a and b contiguous in
    K with 16-byte aligned rows; scales in any strides (row- or column-major). out (optional) [M, N] of out_dtype
    (bf16, fp16 or fp32), contiguous in N. residual (optional) [M, N] of out's dtype, contiguous in N: added in the
    epilogue, D = round(round(A B^T) + residual) (what the GEMM then a separate add give). Returns out.
    """
    for name, t in (("a", a), ("sa", sa), ("b", b), ("sb", sb)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    device = _same_device(a=a, sa=sa, b=b, sb=sb, out=out)
    _check_fp8_operands(a, sa, b, sb)
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in _OUT_DTYPES]}, got {out_dtype}")
    M, N = a.shape[0], b.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=device)
    _check_out(out, (M, N), _OUT_DTYPES, device)
    if residual is not None:
        _check_tensor("residual", residual, (out.dtype,), ndim=2)
        if tuple(residual.shape) != (M, N) or residual.device != device:
            raise ValueError(f"residual must be [{M}, {N}] on {device}, got {tuple(residual.shape)} on "
                             f"{residual.device}")
    if M and N and a.shape[1]:
        problem = _fp8.Problem(M, N, a.shape[1], _dt(out.dtype), int(residual is not None))
        _fp8.launch(a, sa, b, sb, out, _cfg.resolve("fp8_gemm_1d2d", device, config, problem), problem, residual)
    elif M and N:
        out.copy_(residual) if residual is not None else out.zero_()
    return out


def bf16_gemm(a, b, out=None, config: dict | None = None, out_dtype: torch.dtype | None = None):
    """D[M, N] = a[M, K] @ b[N, K]^T with fp32 accumulation, output in the operands' dtype or out_dtype (fp32: the
    accumulator itself, e.g. an LM head's logits).

    a and b bf16 (or fp16, both the same), contiguous in K, K a multiple of 8 (16-byte aligned rows); any M, N.
    out (optional) [M, N] of the output dtype (the operands' unless out_dtype=torch.float32 is asked), contiguous
    in N. Returns out.
    """
    _check_tensor("a", a, (torch.bfloat16, torch.float16), ndim=2)
    _check_tensor("b", b, (a.dtype,), ndim=2)
    device = _same_device(a=a, b=b, out=out)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a is [M, K] = {tuple(a.shape)} but b is [N, K] = {tuple(b.shape)}: K differs")
    if a.shape[1] % 8:
        raise ValueError(f"K = {a.shape[1]} must be a multiple of 8 (16-byte aligned rows)")
    _check_aligned("a", a)
    _check_aligned("b", b)
    M, N = a.shape[0], b.shape[0]
    out_dtype = out_dtype or a.dtype
    if out_dtype not in (a.dtype, torch.float32):
        raise TypeError(f"out_dtype must be the operands' dtype {a.dtype} or float32, got {out_dtype}")
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=device)
    _check_out(out, (M, N), (out_dtype,), device)
    if M and N and a.shape[1]:
        problem = _bf16.Problem(M, N, a.shape[1], _dt(a.dtype), "" if out_dtype == a.dtype else "fp32")
        _bf16.launch(a, b, out, _cfg.resolve("bf16_gemm", device, config, problem))
    elif M and N:
        out.zero_()
    return out
