"""Every setting dskc reads from the environment, typed, in one place.

No other module calls os.getenv. Tests change settings with `knobs.scope(name=value)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path


def _flag(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass
class Knobs:
    cache_dir: Path          # DSKC_CACHE_DIR: content-addressed build cache
    log_level: str           # DSKC_LOG: python logging level name for the "dskc" logger
    triton_interpret: bool   # TRITON_INTERPRET: kernels run on the CPU through Triton's interpreter
    compile_timeout_s: float # DSKC_COMPILE_TIMEOUT: a single kernel build (subprocess) gives up after this
    nvcc: str                # DSKC_NVCC: the nvcc used for CUTLASS builds
    jobs: int                # DSKC_JOBS: parallel builds
    tuned_dir: Path | None = None  # DSKC_TUNED_DIR: where the compiler reads tuned configs (default: the
                                   # installed autotune/configs)

    @classmethod
    def from_env(cls) -> "Knobs":
        cache = os.environ.get("DSKC_CACHE_DIR") or str(Path.home() / ".cache" / "dskc")
        return cls(
            cache_dir=Path(cache),
            log_level=os.environ.get("DSKC_LOG", "WARNING").upper(),
            triton_interpret=_flag("TRITON_INTERPRET"),
            compile_timeout_s=float(os.environ.get("DSKC_COMPILE_TIMEOUT", "300")),
            nvcc=os.environ.get("DSKC_NVCC", "nvcc"),
            jobs=int(os.environ.get("DSKC_JOBS", str(max(1, (os.cpu_count() or 1))))),
            tuned_dir=Path(os.environ["DSKC_TUNED_DIR"]) if os.environ.get("DSKC_TUNED_DIR") else None,
        )


_current = Knobs.from_env()


def get() -> Knobs:
    return _current


@contextlib.contextmanager
def scope(**changes):
    """Temporarily override settings: `with knobs.scope(cache_dir=tmp): ...`."""
    global _current
    saved = _current
    _current = dataclasses.replace(saved, **changes)
    try:
        yield _current
    finally:
        _current = saved


def subprocess_env(interpret: bool | None = None) -> dict[str, str]:
    """Environment for a helper subprocess (builds run without the interpreter)."""
    env = dict(os.environ)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if interpret is not None:
        env.pop("TRITON_INTERPRET", None)
        if interpret:
            env["TRITON_INTERPRET"] = "1"
    env["DSKC_CACHE_DIR"] = str(_current.cache_dir)
    return env
