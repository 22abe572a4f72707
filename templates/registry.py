"""Find template stems and evaluate their declared spaces and constraints."""
from __future__ import annotations

import importlib
import itertools
import pkgutil
from types import ModuleType

from dskc.arch import parse

_REQUIRED = ("STEM", "SPACE", "CONSTRAINTS", "DEFAULTS", "problem_names", "compile_specs", "cost")


def stems() -> list[str]:
    from dskc.templates import triton as pkg
    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if all(hasattr(mod, attr) for attr in _REQUIRED):
            found.append(mod.STEM)
    return sorted(found)


def get(stem: str) -> ModuleType:
    from dskc.templates import triton as pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if getattr(mod, "STEM", None) == stem and all(hasattr(mod, a) for a in _REQUIRED):
            return mod
    raise KeyError(f"unknown kernel stem {stem!r}; known stems: {stems()}")


def default_config(stem: str, arch) -> dict:
    mod = get(stem)
    family = parse(arch).family
    if family not in mod.DEFAULTS:
        raise KeyError(f"stem {stem!r} has no default config for {family}; it has {sorted(mod.DEFAULTS)}")
    return dict(mod.DEFAULTS[family])


def satisfies(mod: ModuleType, config: dict, problem: dict) -> bool:
    scope = {**problem, **config}
    return all(bool(eval(expr, {"__builtins__": {}, "min": min, "max": max}, scope)) for expr in mod.CONSTRAINTS)


def configs(mod: ModuleType, problem: dict):
    """Every config of the space that meets the declared constraints for this problem."""
    names = list(mod.SPACE)
    for values in itertools.product(*(mod.SPACE[n] for n in names)):
        cfg = dict(zip(names, values))
        if satisfies(mod, cfg, problem):
            yield cfg
