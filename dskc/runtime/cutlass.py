"""Launch CUTLASS shared libraries built by `dskc.templates.cutlass.build` through ctypes.

`load(build)` returns the launcher for the build's stem. Every launcher checks dtypes, shapes, strides, 16-byte
alignment and the device of its tensors before anything touches a GPU (ValueError/TypeError naming the problem),
then passes data_ptr()s, leading dimensions and torch.cuda.current_stream() to the library's extern "C" entry
point, with a workspace it allocates through torch. A nonzero return code raises RuntimeError with the library's
message. Outputs are allocated when `out` is None; a given `out` must match exactly.

Tensor contracts (all row-major with unit stride along the last dim; K contiguous):
  Fp8GroupedGemm: a [T, K] e4m3, sa [T, K/128] fp32, b [G, N, K] e4m3, sb [G, ceil(N/128), K/128] fp32,
                  offs [G] int32 (cumulative end row of each group, non-decreasing, offs[-1] == T) -> [T, N] bf16
  Fp8Gemm:        a [M, K] e4m3, sa [M, K/128] fp32, b [N, K] e4m3, sb [ceil(N/128), K/128] fp32 -> [M, N] bf16
  Bf16Gemm:       a [M, K] bf16, b [N, K] bf16 -> [M, N] bf16
K must be a multiple of 128 for the FP8 kernels (one scale per 128 of K) and N a multiple of 8 (16-byte rows).
"""
from __future__ import annotations

import ctypes

import torch

_ERR_LEN = 1024
_ALIGN = 16
c_i64, c_int, c_size, c_ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p


def _check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_rows(name: str, t: torch.Tensor) -> None:
    """Unit stride along the last dim, 16-byte aligned base and row stride (what TMA needs)."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dim, got strides {t.stride()}")
    if t.data_ptr() % _ALIGN:
        raise ValueError(f"{name} must start at a {_ALIGN}-byte aligned address (data_ptr {t.data_ptr():#x})")
    for d in range(t.dim() - 1):
        if (t.stride(d) * t.element_size()) % _ALIGN:
            raise ValueError(f"{name}'s stride {t.stride(d)} along dim {d} is not a multiple of {_ALIGN} bytes")


def _check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")


def _check_device(tensors: dict) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    for name, dev in devices.items():
        if dev.type != "cuda":
            raise ValueError(f"{name} is on {dev}; CUTLASS kernels need CUDA tensors")
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}")
    return next(iter(devices.values()))


def _k_blocks(k: int) -> int:
    if k <= 0 or k % 128:
        raise ValueError(f"K must be a positive multiple of 128 for 1x128 / 128x128 block scales, got {k}")
    return k // 128


def _check_n(n: int) -> None:
    if n <= 0 or n % 8:
        raise ValueError(f"N must be a positive multiple of 8 (16-byte bf16 output rows), got {n}")


def _dense_mnk(a, b) -> tuple[int, int, int]:
    """(M, N, K) of a dense GEMM's a [M, K] and b [N, K], checking the ranks, equal K and N's alignment."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"a must be [M, K] and b [N, K]; got {tuple(a.shape)} and {tuple(b.shape)}")
    (m, k), (n, kb) = a.shape, b.shape
    if kb != k:
        raise ValueError(f"a's K ({k}) and b's K ({kb}) differ")
    _check_n(n)
    return m, n, k


class _Library:
    """A loaded .so and its extern "C" entry points (argtypes declared once per load)."""

    def __init__(self, path: str, entries: dict):
        self.path = path
        self.lib = ctypes.CDLL(path)
        for name, argtypes in entries.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = argtypes, c_int
        self.lib.dskc_kernel_config.restype = ctypes.c_char_p

    def config(self) -> str:
        return self.lib.dskc_kernel_config().decode()

    def call(self, name: str, *args) -> None:
        err = ctypes.create_string_buffer(_ERR_LEN)
        code = getattr(self.lib, name)(*args, err, _ERR_LEN)
        if code != 0:
            raise RuntimeError(f"{name} ({self.path}) failed with code {code}: {err.value.decode(errors='replace')}")

    def workspace(self, name: str, device: torch.device, *args) -> torch.Tensor:
        size = c_size(0)
        self.call(name, *args, ctypes.byref(size))
        return torch.empty(max(int(size.value), 1), dtype=torch.uint8, device=device)


def _stream_and_sms(device: torch.device) -> tuple[int, int]:
    stream = torch.cuda.current_stream(device).cuda_stream
    return stream, torch.cuda.get_device_properties(device).multi_processor_count


def _output(out: torch.Tensor | None, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.bfloat16, device=like.device)
    _check_dtype("out", out, torch.bfloat16)
    _check_shape("out", out, shape)
    _check_rows("out", out)
    return out


class Fp8GroupedGemm:
    """MoE experts, contiguous layout: out[rows of g] = (a * sa)[rows of g] @ ((b * sb)[g])^T; see module doc."""
    _RUN = [c_ptr, c_i64, c_ptr, c_ptr, c_i64, c_i64, c_ptr, c_ptr, c_i64, c_ptr, c_int, c_int, c_int,
            c_ptr, c_size, c_int, c_ptr, ctypes.c_char_p, c_int]
    _WS = [c_int, c_int, ctypes.POINTER(c_size), ctypes.c_char_p, c_int]

    def __init__(self, library: str):
        self._lib = _Library(library, {"dskc_fp8_grouped_gemm_run": self._RUN,
                                       "dskc_fp8_grouped_gemm_workspace_bytes": self._WS})

    @staticmethod
    def check(a, sa, b, sb, offs, out=None) -> tuple:
        """Validate the arguments; returns (T, G, N, K). Raises TypeError/ValueError before any GPU work."""
        for name, t, dt in (("a", a, torch.float8_e4m3fn), ("sa", sa, torch.float32), ("b", b, torch.float8_e4m3fn),
                            ("sb", sb, torch.float32), ("offs", offs, torch.int32)):
            _check_dtype(name, t, dt)
        if a.dim() != 2 or b.dim() != 3:
            raise ValueError(f"a must be [T, K] and b [G, N, K]; got {tuple(a.shape)} and {tuple(b.shape)}")
        (t_rows, k), (g, n, kb) = a.shape, b.shape
        if kb != k:
            raise ValueError(f"a's K ({k}) and b's K ({kb}) differ")
        _check_n(n)
        k_blocks = _k_blocks(k)
        _check_shape("sa", sa, (t_rows, k_blocks))
        _check_shape("sb", sb, (g, -(-n // 128), k_blocks))
        _check_shape("offs", offs, (g,))
        for name, t in (("a", a), ("b", b)):
            _check_rows(name, t)
        for name, t in (("sa", sa), ("sb", sb), ("offs", offs)):
            _check_contiguous(name, t)
        if out is not None:
            _output(out, (t_rows, n), a)
        return t_rows, g, n, k

    def __call__(self, a, sa, b, sb, offs, out=None) -> torch.Tensor:
        t_rows, g, n, k = self.check(a, sa, b, sb, offs, out)
        device = _check_device({"a": a, "sa": sa, "b": b, "sb": sb, "offs": offs,
                                **({"out": out} if out is not None else {})})
        out = _output(out, (t_rows, n), a)
        if t_rows == 0 or g == 0:
            return out
        stream, sms = _stream_and_sms(device)
        ws = self._lib.workspace("dskc_fp8_grouped_gemm_workspace_bytes", device, g, sms)
        self._lib.call("dskc_fp8_grouped_gemm_run", a.data_ptr(), a.stride(0), sa.data_ptr(), b.data_ptr(),
                       b.stride(1), b.stride(0), sb.data_ptr(), out.data_ptr(), out.stride(0), offs.data_ptr(),
                       g, n, k, ws.data_ptr(), ws.numel(), sms, stream)
        return out


class Fp8Gemm:
    """Dense DeepSeek FP8 GEMM ("1D2D"): out = (a * sa) @ (b * sb)^T; see module doc."""
    _RUN = [c_ptr, c_i64, c_ptr, c_ptr, c_i64, c_ptr, c_ptr, c_i64, c_int, c_int, c_int, c_ptr, c_size, c_int,
            c_ptr, ctypes.c_char_p, c_int]
    _WS = [c_int, c_int, c_int, c_int, ctypes.POINTER(c_size), ctypes.c_char_p, c_int]

    def __init__(self, library: str):
        self._lib = _Library(library, {"dskc_fp8_gemm_run": self._RUN, "dskc_fp8_gemm_workspace_bytes": self._WS})

    @staticmethod
    def check(a, sa, b, sb, out=None) -> tuple:
        """Validate the arguments; returns (M, N, K). Raises TypeError/ValueError before any GPU work."""
        for name, t, dt in (("a", a, torch.float8_e4m3fn), ("sa", sa, torch.float32), ("b", b, torch.float8_e4m3fn),
                            ("sb", sb, torch.float32)):
            _check_dtype(name, t, dt)
        m, n, k = _dense_mnk(a, b)
        k_blocks = _k_blocks(k)
        _check_shape("sa", sa, (m, k_blocks))
        _check_shape("sb", sb, (-(-n // 128), k_blocks))
        for name, t in (("a", a), ("b", b)):
            _check_rows(name, t)
        for name, t in (("sa", sa), ("sb", sb)):
            _check_contiguous(name, t)
        if out is not None:
            _output(out, (m, n), a)
        return m, n, k

    def __call__(self, a, sa, b, sb, out=None) -> torch.Tensor:
        m, n, k = self.check(a, sa, b, sb, out)
        device = _check_device({"a": a, "sa": sa, "b": b, "sb": sb, **({"out": out} if out is not None else {})})
        out = _output(out, (m, n), a)
        if m == 0:
            return out
        stream, sms = _stream_and_sms(device)
        ws = self._lib.workspace("dskc_fp8_gemm_workspace_bytes", device, m, n, k, sms)
        self._lib.call("dskc_fp8_gemm_run", a.data_ptr(), a.stride(0), sa.data_ptr(), b.data_ptr(), b.stride(0),
                       sb.data_ptr(), out.data_ptr(), out.stride(0), m, n, k, ws.data_ptr(), ws.numel(), sms, stream)
        return out


class Bf16Gemm:
    """Dense bf16 GEMM: out = a @ b^T (a Linear layer's weight layout); see module doc."""
    _RUN = [c_ptr, c_i64, c_ptr, c_i64, c_ptr, c_i64, c_int, c_int, c_int, c_ptr, c_size, c_int, c_ptr,
            ctypes.c_char_p, c_int]
    _WS = [c_int, c_int, c_int, c_int, ctypes.POINTER(c_size), ctypes.c_char_p, c_int]

    def __init__(self, library: str):
        self._lib = _Library(library, {"dskc_bf16_gemm_run": self._RUN, "dskc_bf16_gemm_workspace_bytes": self._WS})

    @staticmethod
    def check(a, b, out=None) -> tuple:
        """Validate the arguments; returns (M, N, K). Raises TypeError/ValueError before any GPU work."""
        _check_dtype("a", a, torch.bfloat16)
        _check_dtype("b", b, torch.bfloat16)
        m, n, k = _dense_mnk(a, b)
        if k <= 0 or k % 8:
            raise ValueError(f"K must be a positive multiple of 8 (16-byte bf16 rows), got {k}")
        for name, t in (("a", a), ("b", b)):
            _check_rows(name, t)
        if out is not None:
            _output(out, (m, n), a)
        return m, n, k

    def __call__(self, a, b, out=None) -> torch.Tensor:
        m, n, k = self.check(a, b, out)
        device = _check_device({"a": a, "b": b, **({"out": out} if out is not None else {})})
        out = _output(out, (m, n), a)
        if m == 0:
            return out
        stream, sms = _stream_and_sms(device)
        ws = self._lib.workspace("dskc_bf16_gemm_workspace_bytes", device, m, n, k, sms)
        self._lib.call("dskc_bf16_gemm_run", a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), out.data_ptr(),
                       out.stride(0), m, n, k, ws.data_ptr(), ws.numel(), sms, stream)
        return out


LAUNCHERS = {"sm90_fp8_grouped_gemm_1d2d": Fp8GroupedGemm, "sm90_fp8_gemm_1d2d": Fp8Gemm,
             "sm90_bf16_gemm": Bf16Gemm}


def load(build):
    """The launcher for a successful build result (an NvccBuild); TypeError for a failed one."""
    if not getattr(build, "ok", False):
        raise TypeError(f"cannot load a failed build: {getattr(build, 'message', build)!r}")
    if build.name not in LAUNCHERS:
        raise KeyError(f"no launcher for stem {build.name!r}; known: {sorted(LAUNCHERS)}")
    return LAUNCHERS[build.name](build.library)
