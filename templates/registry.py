"""Find template stems and evaluate their declared spaces and constraints."""
from __future__ import annotations

import functools
import importlib
import itertools
import pkgutil
from types import ModuleType

from dskc.arch import parse

_REQUIRED = ("STEM", "SPACE", "CONSTRAINTS", "DEFAULTS", "problem_names", "compile_specs", "cost")


@functools.lru_cache(maxsize=1)
def _index() -> dict[str, str]:
    """STEM -> module name, scanned once per process (lookups sit on kernel-launch paths)."""
    from dskc.templates import triton as pkg
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if all(hasattr(mod, attr) for attr in _REQUIRED):
            found[mod.STEM] = mod.__name__
    return found


def stems() -> list[str]:
    return sorted(_index())


def get(stem: str) -> ModuleType:
    name = _index().get(stem)
    if name is None:
        raise KeyError(f"unknown kernel stem {stem!r}; known stems: {stems()}")
    return importlib.import_module(name)


def default_config(stem: str, arch) -> dict:
    mod = get(stem)
    family = parse(arch).family
    if family not in mod.DEFAULTS:
        raise KeyError(f"stem {stem!r} has no default config for {family}; it has {sorted(mod.DEFAULTS)}")
    return dict(mod.DEFAULTS[family])


def broken_constraints(mod: ModuleType, config: dict, problem: dict) -> list[str]:
    """The declared constraints `config` breaks for `problem` (empty when it meets them all)."""
    scope = {**problem, **config}
    return [expr for expr in mod.CONSTRAINTS
            if not bool(eval(expr, {"__builtins__": {}, "min": min, "max": max}, scope))]


def satisfies(mod: ModuleType, config: dict, problem: dict) -> bool:
    return not broken_constraints(mod, config, problem)


def configs(mod: ModuleType, problem: dict):
    """Every config of the space that meets the declared constraints for this problem."""
    names = list(mod.SPACE)
    for values in itertools.product(*(mod.SPACE[n] for n in names)):
        cfg = dict(zip(names, values))
        if satisfies(mod, cfg, problem):
            yield cfg
