"""Find template stems and evaluate their declared spaces and constraints."""
from __future__ import annotations

import functools
import importlib
import itertools
import pkgutil
from types import ModuleType

from dskc.arch import parse

_REQUIRED = ("STEM", "SPACE", "CONSTRAINTS", "DEFAULTS", "Problem", "bind", "problem_names", "compile_specs", "cost")


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


def problem(stem: str, value):
    """The stem's Problem from a Problem or a dict (ValueError naming a missing field)."""
    return get(stem).Problem.of(value)


def default_config(stem: str, arch, problem_=None) -> dict:
    """The tuning-free config of `stem` on `arch`: the arch family's DEFAULTS entry, or with a problem, what the
    stem's `rule(problem, family, base, sms, fits)` makes of it for that problem (tile shapes by waves and
    occupancy, smaller tiles at small M, head blocking; see each stem). The result always meets the stem's
    constraints for the problem (else the base is returned as it is, and the caller's check reports it)."""
    mod = get(stem)
    a = parse(arch)
    if a.family not in mod.DEFAULTS:
        raise KeyError(f"stem {stem!r} has no default config for {a.family}; it has {sorted(mod.DEFAULTS)}")
    base = dict(mod.DEFAULTS[a.family])
    if problem_ is None or not hasattr(mod, "rule"):
        return base
    p = mod.Problem.of(problem_)
    scope = p.as_dict()
    return mod.rule(p, a.family, base, a.sms, lambda cfg: not broken_constraints(mod, cfg, scope))


def broken_constraints(mod: ModuleType, config: dict, problem) -> list[str]:
    """The declared constraints `config` breaks for `problem` (empty when it meets them all)."""
    scope = {**(problem.as_dict() if hasattr(problem, "as_dict") else problem), **config}
    broken = []
    for expr in mod.CONSTRAINTS:
        try:
            ok = bool(eval(expr, {"__builtins__": {}, "min": min, "max": max}, scope))
        except Exception as exc:   # a config lacking a parameter (a hand-edited or foreign export): broken
            ok, expr = False, f"{expr} (cannot evaluate: {exc})"
        if not ok:
            broken.append(expr)
    return broken


def satisfies(mod: ModuleType, config: dict, problem: dict) -> bool:
    return not broken_constraints(mod, config, problem)


def configs(mod: ModuleType, problem: dict):
    """Every config of the space that meets the declared constraints for this problem."""
    names = list(mod.SPACE)
    for values in itertools.product(*(mod.SPACE[n] for n in names)):
        cfg = dict(zip(names, values))
        if satisfies(mod, cfg, problem):
            yield cfg
