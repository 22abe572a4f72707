"""Input checks and the config resolution shared by the MoE kernels' launchers (dskc.ops.moe, dskc.ops.grouped)."""
from __future__ import annotations

import torch

from dskc import knobs

FP8 = torch.float8_e4m3fn
_HALF = (torch.bfloat16, torch.float16)


def _fail(msg: str, exc=ValueError):
    raise exc(msg)


def _tensor(name: str, t, dtypes=None, ndim=None, shape=None, strided=False):
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if dtypes is not None and t.dtype not in dtypes:
        _fail(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}", TypeError)
    if ndim is not None and t.dim() != ndim:
        _fail(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        _fail(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not strided and not t.is_contiguous():
        _fail(f"{name} must be contiguous (call .contiguous())")


def _devices(**named):
    """All tensors on one device, and a device the kernels can run on."""
    tensors = {k: v for k, v in named.items() if v is not None}
    devs = {str(v.device) for v in tensors.values()}
    if len(devs) > 1:
        _fail(f"tensors are on different devices: {', '.join(f'{k}={v.device}' for k, v in tensors.items())}")
    dev = next(iter(tensors.values())).device
    if dev.type != "cuda" and not knobs.get().triton_interpret:
        _fail(f"dskc MoE kernels need CUDA tensors (got {dev}); CPU tensors run only under TRITON_INTERPRET=1")


def _need_e4m3(t: torch.Tensor, what: str):
    """e4m3 tensors in Triton kernels need sm_89+; sm_80's compiler rejects the type (kernel_report, sm80)."""
    if t.device.type == "cuda" and torch.cuda.get_device_capability(t.device) < (8, 9):
        _fail(f"{what} uses e4m3 (fp8) kernels, which need sm_89 or newer; this GPU is "
              f"sm_{''.join(map(str, torch.cuda.get_device_capability(t.device)))}: use bf16 weights")


def _config(mod, config, problem, device) -> dict:
    """The config of stem module `mod` for `problem` on `device` (dskc.ops._config.resolve: a complete config as
    given, else the tuned entry / tuning-free rule with `config`'s keys on top; cached per problem bucket)."""
    from dskc.ops import _config as _cfg
    return _cfg.resolve(mod.STEM, device, config, problem)
