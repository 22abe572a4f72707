"""dskc: kernel generation and autotuning for DeepSeek-style MoE + MLA models.

`dskc.compile(model, target=...)` and `dskc.load(model, out_dir)` are dskc.compiler's, imported on first use so that
`import dskc` stays light (the compiler pulls in Triton).
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["compile", "load", "__version__"]


def __getattr__(name: str):
    if name in ("compile", "load"):
        from dskc import compiler
        return getattr(compiler, name)
    raise AttributeError(f"module 'dskc' has no attribute {name!r}")
