"""When the ops may read device values to check them (one host sync per call): unless told not to, or while a
CUDA graph is being captured (a sync there would fail the capture, and the captured graph replays without checks;
the kernels mask such values instead, see docs/reliability.md)."""
from __future__ import annotations

import torch


def should_validate(validate: bool | None, device: torch.device) -> bool:
    """`validate` if given; else True except on a CUDA stream that is capturing a graph."""
    if validate is not None:
        return bool(validate)
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
