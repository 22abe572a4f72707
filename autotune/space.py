"""A stem's search space as the autotuner sees it: the stem's SPACE/CONSTRAINTS plus autotune data.

The stem module (templates/triton/<stem>.py) declares SPACE, CONSTRAINTS and DEFAULTS. The autotune side lives in
`autotune/spaces/<stem>.json` (all fields optional):

    {"buckets":  {"M": "pow2"},               # test stems only (a registered stem's Problem.BUCKETS rule):
                                              # problem field -> "pow2" (round up to a power of two) | "exact"
     "tiles":    {"M": "BLOCK_M"},            # problem field -> config block size (grid + padding, MODEL only);
                                              # default: BLOCK_<field> when the space has it, K excepted
     "batch":    ["E"],                       # problem fields that multiply the grid (MODEL only)
     "encoding": "ordinal",                   # numeric spaces are searched by index (ordered) or "categorical"
     "known_good": {"sm90": [{...}, ...]},    # seeds enqueued after the per-arch default
     "vllm_names": {"BLOCK_SIZE_M": "BLOCK_M", ...}}   # how vLLM/SGLang config keys map onto this space

A stem module may carry the same dict as `AUTOTUNE` (used by test stems); the JSON file wins field by field.
A registered stem's problem is its `Problem` dataclass (dskc.templates.triton.<stem>): its fields and BUCKETS are the
ones selection and the runtime's config tables use, so an export matches the compiled model's problems. For a test
stem without one, fields not named in "buckets" are bucketed "pow2" when called M (token counts), else "exact".
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
from pathlib import Path
from types import ModuleType

from dskc.templates import registry

SPACES_DIR = Path(__file__).parent / "spaces"
_BUCKET_KINDS = ("pow2", "exact")


@dataclasses.dataclass(frozen=True, eq=False)
class TuneSpace:
    stem: str
    module: ModuleType
    params: tuple            # ((name, values tuple), ...) in SPACE order
    constraints: tuple
    data: dict               # the merged autotune data (see module docstring)

    @property
    def names(self) -> tuple:
        return tuple(n for n, _ in self.params)

    def values(self, name: str) -> tuple:
        return dict(self.params)[name]

    def ordinal(self, name: str) -> bool:
        vals = self.values(name)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        return self.data.get("encoding", "ordinal") == "ordinal" and numeric and list(vals) == sorted(vals)

    def template_hash(self) -> str:
        return hashlib.sha256(inspect.getsource(self.module).encode()).hexdigest()[:16]


def resolve_module(stem: str | ModuleType) -> ModuleType:
    """A registered stem name, an importable module that holds a stem (tests), or a module. KeyError if unknown."""
    if isinstance(stem, ModuleType):
        return stem
    if not isinstance(stem, str) or not stem:
        raise TypeError(f"kernel stem must be a name or a module, got {stem!r}")
    known = registry.stems()
    if stem in known:
        return registry.get(stem)
    try:
        mod = importlib.import_module(stem)
    except ImportError:
        mod = None
    if mod is None or not hasattr(mod, "STEM"):
        raise KeyError(f"unknown kernel stem {stem!r}; known stems: {known} (or an importable module with a STEM)")
    return mod


def load_space(stem: str | ModuleType) -> TuneSpace:
    """The TuneSpace of a stem. Raises KeyError (unknown stem), ValueError (malformed space or autotune data)."""
    mod = resolve_module(stem)
    missing = [a for a in ("STEM", "SPACE", "CONSTRAINTS", "DEFAULTS", "problem_names", "compile_specs", "cost")
               if not hasattr(mod, a)]
    if missing:
        raise ValueError(f"module {mod.__name__} does not follow the template contract: lacks {missing}")
    if not mod.SPACE or any(not isinstance(v, (tuple, list)) or not v for v in mod.SPACE.values()):
        raise ValueError(f"stem {mod.STEM!r}: SPACE must map each parameter to a non-empty tuple of values")
    data = dict(getattr(mod, "AUTOTUNE", {}))
    path = SPACES_DIR / f"{mod.STEM}.json"
    if path.exists():
        try:
            data.update(json.loads(path.read_text()))
        except ValueError as exc:
            raise ValueError(f"autotune data {path} is not valid JSON: {exc}") from exc
    for field, kind in data.get("buckets", {}).items():
        if kind not in _BUCKET_KINDS:
            raise ValueError(f"{path}: bucket kind {kind!r} for {field!r}; expected one of {_BUCKET_KINDS}")
    params = tuple((n, tuple(v)) for n, v in mod.SPACE.items())
    return TuneSpace(mod.STEM, mod, params, tuple(mod.CONSTRAINTS), data)


def check_problem(space: TuneSpace, problem: dict) -> dict:
    """The problem restricted to the stem's fields (a registered stem's Problem fills the fields it has defaults
    for); ValueError naming missing fields."""
    prob_type = getattr(space.module, "Problem", None)
    if prob_type is not None:
        return prob_type.of(problem).as_dict()
    names = tuple(space.module.problem_names())
    missing = [n for n in names if n not in problem]
    if missing:
        raise ValueError(f"problem for {space.stem!r} lacks {missing}; it needs {list(names)}")
    return {n: problem[n] for n in names}


def bucket_kinds(space: TuneSpace) -> dict:
    """problem field -> "pow2" | "exact": the stem Problem's BUCKETS (the same buckets selection and the runtime
    tables use); a test stem without a Problem declares them in its data (default: M pow2, the rest exact)."""
    prob_type = getattr(space.module, "Problem", None)
    if prob_type is not None:
        return {n: prob_type.BUCKETS.get(n, "exact") for n in prob_type.names()}
    declared = space.data.get("buckets", {})
    return {n: declared.get(n, "pow2" if n == "M" else "exact") for n in space.module.problem_names()}


def bucket(space: TuneSpace, problem: dict) -> dict:
    """The shape bucket a problem falls in: pow2 fields rounded up to a power of two, the rest as they are."""
    prob = check_problem(space, problem)
    out = {}
    for name, kind in bucket_kinds(space).items():
        v = prob[name]
        if kind == "pow2" and isinstance(v, int) and v > 0:
            v = 1 << (v - 1).bit_length()
        out[name] = v
    return out


def violated(space: TuneSpace, config: dict, problem: dict) -> str | None:
    """The first declared constraint the config breaks for this problem, or None when it meets them all."""
    scope = {**problem, **config}
    for expr in space.constraints:
        try:
            ok = bool(eval(expr, {"__builtins__": {}, "min": min, "max": max}, scope))
        except Exception as exc:  # a constraint naming an unknown field is a template bug: say which
            raise ValueError(f"stem {space.stem!r}: constraint {expr!r} cannot be evaluated: {exc}") from exc
        if not ok:
            return expr
    return None


def feasible_configs(space: TuneSpace, problem: dict) -> list[dict]:
    """Every config of the space that meets the constraints for this problem (declared constraints only)."""
    return list(registry.configs(space.module, check_problem(space, problem)))


def suggest(trial, space: TuneSpace) -> dict:
    """Ask an Optuna trial for one config; ordinal params are suggested by index so samplers see the order."""
    config = {}
    for name, values in space.params:
        if space.ordinal(name):
            config[name] = values[trial.suggest_int(name, 0, len(values) - 1)]
        else:
            config[name] = trial.suggest_categorical(name, list(values))
    return config


def encode(space: TuneSpace, config: dict) -> dict:
    """Optuna params for a config (the inverse of `suggest`); ValueError if a value is outside the space."""
    params = {}
    for name, values in space.params:
        if name not in config:
            raise ValueError(f"config for {space.stem!r} lacks {name!r}: {config}")
        if config[name] not in values:
            raise ValueError(f"{space.stem!r}: {name}={config[name]!r} is not in the space {values}")
        params[name] = values.index(config[name]) if space.ordinal(name) else config[name]
    return params


def decode(space: TuneSpace, params: dict) -> dict:
    """The config an Optuna params dict stands for."""
    return {n: (v[params[n]] if space.ordinal(n) else params[n]) for n, v in space.params}
