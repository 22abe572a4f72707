"""GPU architectures dskc targets, parsed from the names users type (sm90a, sm_90a, 90, h100, auto), and everything
dskc knows about them, in one place: which default / tuned tables serve an arch (its family), SM counts for the
tuning-free rules, and which compute capabilities are refused and why.

Families (the key of every DEFAULTS table): sm80 serves sm_80 and, by the stated rule below, sm_89; sm90 serves
sm_90a; sm100 serves sm_100a. sm_89 (Ada) has no wgmma and no tcgen05: it runs the same mma.sync code as sm_80, so
the sm80 tables serve it (its Triton does have e4m3, so the FP8 kernels build there too). sm_103 (B300) and sm_120
(consumer Blackwell) are refused: sm_100a's arch-specific code (tcgen05) does not run on either, and no table was
made for them; dskc never maps them silently onto sm100a.
"""
from __future__ import annotations

import dataclasses

_ALIASES = {"h100": "sm90a", "h200": "sm90a", "h800": "sm90a", "a100": "sm80", "l40s": "sm89", "l4": "sm89",
            "b200": "sm100a", "gb200": "sm100a"}
# compute capability -> (family of its tables, SMs of the reference part the tuning-free rules plan for)
_FAMILIES = {80: ("sm80", 108), 89: ("sm80", 142), 90: ("sm90", 132), 100: ("sm100", 148)}
_REFUSED = {
    103: "sm_103 (B300) runs no sm_100a code (arch-specific tcgen05 builds are per chip) and dskc has no tables "
         "for it yet",
    120: "sm_120 (consumer Blackwell) has neither wgmma nor sm_100a's tcgen05 and dskc has no tables for it",
    121: "sm_121 (consumer Blackwell) has neither wgmma nor sm_100a's tcgen05 and dskc has no tables for it",
}


@dataclasses.dataclass(frozen=True)
class Arch:
    cc: int          # compute capability as an int: 80, 89, 90, 100
    suffix: str = "" # "a" for arch-specific features (wgmma on sm_90a, tcgen05 on sm_100a)

    @property
    def name(self) -> str:
        return f"sm{self.cc}{self.suffix}"

    @property
    def family(self) -> str:
        """Key of the per-arch default and tuned tables: sm80 (sm_80 and sm_89), sm90, sm100."""
        return _FAMILIES[self.cc][0]

    @property
    def sms(self) -> int:
        """SMs of the reference part (H100/H200 132, B200 148, A100 108, L40S 142): what the tile rules plan for."""
        return _FAMILIES[self.cc][1]

    def __str__(self) -> str:
        return self.name


KNOWN = (Arch(80), Arch(89), Arch(90, "a"), Arch(100, "a"))


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
    digits = raw.rstrip("af")
    if not digits.isdigit():
        raise ValueError(f"unknown target arch {name!r}; expected one of {[a.name for a in KNOWN]} or 'auto'")
    return from_cc(int(digits), name)


def from_cc(cc: int, name=None) -> Arch:
    """The Arch of compute capability `cc` (e.g. 90); ValueError naming why for one dskc does not serve."""
    if cc in _REFUSED:
        raise ValueError(f"unsupported target arch {name or cc!r}: {_REFUSED[cc]}; dskc generates code for "
                         f"{[a.name for a in KNOWN]}")
    for arch in KNOWN:
        if arch.cc == cc:
            return arch
    raise ValueError(f"unsupported target arch {name or cc!r}; dskc generates code for {[a.name for a in KNOWN]}")


def detect(device=None) -> Arch:
    """The Arch of a CUDA device (the current one by default)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("target 'auto' needs a CUDA GPU; none is visible. Name a target, e.g. --target sm90a")
    major, minor = torch.cuda.get_device_capability(device)
    return from_cc(major * 10 + minor, f"sm_{major}{minor} (this GPU)")


def family_of_device(device) -> str:
    """Family of the tables that serve kernels on `device`: its arch's on CUDA, sm90's for CPU tensors under the
    interpreter (the sm90 defaults are what the CPU tests exercise). ValueError for another device."""
    from dskc import knobs

    if device.type == "cuda":
        return detect(device).family
    if device.type == "cpu" and knobs.get().triton_interpret:
        return "sm90"
    raise ValueError(f"dskc kernels run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); got {device}")
