"""GPU architectures dskc targets, parsed from the names users type (sm90a, sm_90a, 90, h100, auto)."""
from __future__ import annotations

import dataclasses

_ALIASES = {"h100": "sm90a", "h200": "sm90a", "h800": "sm90a", "a100": "sm80", "b200": "sm100a", "gb200": "sm100a"}


@dataclasses.dataclass(frozen=True)
class Arch:
    cc: int          # compute capability as an int: 80, 90, 100
    suffix: str = "" # "a" for arch-specific features (wgmma on sm_90a, tcgen05 on sm_100a)

    @property
    def name(self) -> str:
        return f"sm{self.cc}{self.suffix}"

    @property
    def family(self) -> str:
        """Key of the per-arch default tables: sm80, sm90, sm100."""
        return f"sm{self.cc}"

    def __str__(self) -> str:
        return self.name


KNOWN = (Arch(80), Arch(90, "a"), Arch(100, "a"))


def parse(name: str | int | Arch) -> Arch:
    """Parse an arch name; 'auto' means the current GPU (error without one)."""
    if isinstance(name, Arch):
        return name
    raw = str(name).strip().lower().replace("_", "")
    raw = _ALIASES.get(raw, raw)
    if raw == "auto":
        return detect()
    if raw.startswith("sm"):
        raw = raw[2:]
    digits = raw.rstrip("a")
    if not digits.isdigit():
        raise ValueError(f"unknown target arch {name!r}; expected one of {[a.name for a in KNOWN]} or 'auto'")
    cc = int(digits)
    for arch in KNOWN:
        if arch.cc == cc:
            return arch
    raise ValueError(f"unsupported target arch {name!r}; dskc generates code for {[a.name for a in KNOWN]}")


def detect() -> Arch:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("target 'auto' needs a CUDA GPU; none is visible. Name a target, e.g. --target sm90a")
    major, minor = torch.cuda.get_device_capability()
    return parse(major * 10 + minor if major < 10 else major * 10)
