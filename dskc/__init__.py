"""dskc: kernel generation and autotuning for DeepSeek-style MoE + MLA models."""
from __future__ import annotations

__version__ = "0.1.0"
