"""dskc.ops: the public kernel API. Each function states its contract and checks its inputs before launching.

The MoE kernels live in `dskc.ops.moe` (its grouped GEMM in `dskc.ops.grouped`), the FP8 GEMM and activation
quantisation in `dskc.ops.fp8`, the MLA kernels in `dskc.ops.mla` (its per-step state in `dskc.ops.mla_state`); this module re-exports their public names.
"""
from __future__ import annotations

import importlib

_SUBMODULES = ("fp8", "moe", "grouped", "mla", "mla_state")


def __getattr__(name):
    for sub in _SUBMODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{sub}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{sub}":
                continue
            raise
        if name in getattr(mod, "__all__", ()):
            return getattr(mod, name)
    raise AttributeError(f"dskc.ops has no {name!r}")
