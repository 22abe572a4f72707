"""CUTLASS 3.x stems for Hopper (sm_90a): FP8 block-scaled grouped and dense GEMMs, and a bf16 dense GEMM.

Each stem is a Jinja template `<stem>.cu.jinja` that instantiates CUTLASS kernels through the collective builders
(headers from the nvidia-cutlass wheel) plus a small extern "C" launcher; its search space, constraints and
default live as data in `spaces.py`. Rendering needs nothing but jinja2; building needs nvcc (not a GPU).

Public API (what the compiler's selection and the autotuner call):

    OPS                                   op name -> stem: "fp8_grouped_gemm_1d2d", "fp8_gemm_1d2d", "bf16_gemm"
    stems() -> list[str]
    get(stem) -> CutlassStem              SPACE/CONSTRAINTS/DEFAULTS/problem names/cost of a stem
    candidates(op, arch, problem=None, limit=None) -> list[(stem, config)]
                                          the default first, then every config of the space meeting the
                                          constraints (for `problem` when given); [] where CUTLASS has no code
                                          for `arch` (anything but sm90a), so callers can always ask
    violations(stem, config, problem=None) -> list[str]   why a config is rejected before nvcc ([] when fine)
    render(stem, config) -> str           the CUDA C++ source
    build(stem, config, arch="sm90a", problem=None) -> NvccBuild | NvccFailure
    build_many(items, arch="sm90a", problem=None) -> list[NvccBuild | NvccFailure]   (parallel, cached)

`op` may also be the Triton stem a CUTLASS stem competes with ("grouped_gemm" for FP8 experts). Without timings the
per-arch default kernel stays the Triton stem: CUTLASS candidates are offered next to Triton's, and only a measured
win (the autotuner's database) should select one. A config CUTLASS would reject is reported as an NvccFailure with
stage "space"/"constraints" (caught before nvcc) or "nvcc" (the compiler's message) - never raised.
Launch a build with `dskc.runtime.cutlass.load(build_result)`.
"""
from __future__ import annotations

import itertools
from pathlib import Path

from dskc.arch import parse
from dskc.build.nvcc import NvccBuild, NvccFailure, NvccJob, build_many as _build_jobs
from dskc.templates.cutlass.spaces import STEMS, CutlassStem

HERE = Path(__file__).parent
HEADER = HERE / "dskc_cutlass.cuh"

OPS = {s.op: s.stem for s in STEMS.values()}
_ALIASES = {"grouped_gemm": "fp8_grouped_gemm_1d2d"}   # Triton stem -> the CUTLASS op that can replace it


def stems() -> list[str]:
    return sorted(STEMS)


def get(stem: str) -> CutlassStem:
    if stem not in STEMS:
        raise KeyError(f"unknown CUTLASS stem {stem!r}; known stems: {stems()}")
    return STEMS[stem]


def _satisfies(expr: str, scope: dict) -> bool:
    return bool(eval(expr, {"__builtins__": {}, "min": min, "max": max}, scope))


def violations(stem: str, config: dict, problem: dict | None = None) -> list[str]:
    """Reasons `config` cannot build for `stem` (and `problem`, when given): unknown or missing parameters, values
    outside the space, and failed constraints. Constraints naming problem fields are skipped without a problem."""
    spec = get(stem)
    errors = [f"unknown parameter {k!r}" for k in config if k not in spec.space]
    errors += [f"missing parameter {k!r}" for k in spec.space if k not in config]
    if errors:
        return errors
    errors = [f"{k}={config[k]!r} is not in the space {spec.space[k]}" for k in spec.space
              if config[k] not in spec.space[k]]
    scope = {**(problem or {}), **config}
    for expr in spec.constraints:
        try:
            if not _satisfies(expr, scope):
                errors.append(f"constraint failed: {expr}")
        except NameError:
            if problem is not None:
                errors.append(f"constraint needs a problem field: {expr} (problem has {sorted(problem)})")
    return errors


def default_config(stem: str, arch) -> dict:
    spec = get(stem)
    family = parse(arch).family
    if family not in spec.defaults:
        raise KeyError(f"CUTLASS stem {stem!r} has no default for {family}; it has {sorted(spec.defaults)}")
    return dict(spec.defaults[family])


def candidates(op: str, arch, problem: dict | None = None, limit: int | None = None) -> list[tuple[str, dict]]:
    """(stem, config) pairs implementing `op` on `arch`: the default first, then the rest of the valid space."""
    op = _ALIASES.get(op, op)
    if op not in OPS:
        raise KeyError(f"no CUTLASS stem implements op {op!r}; CUTLASS ops: {sorted(OPS)}")
    spec = STEMS[OPS[op]]
    arch = parse(arch)
    if arch.name not in spec.archs:
        return []
    out = [(spec.stem, default_config(spec.stem, arch))]
    names = list(spec.space)
    for values in itertools.product(*(spec.space[n] for n in names)):
        cfg = dict(zip(names, values))
        if cfg != out[0][1] and not violations(spec.stem, cfg, problem):
            out.append((spec.stem, cfg))
    if problem is not None and violations(spec.stem, out[0][1], problem):
        out.pop(0)
    return out[:limit] if limit is not None else out


def render(stem: str, config: dict) -> str:
    """The stem's CUDA C++ for `config` (checked against the space first: ValueError listing the violations)."""
    import jinja2

    errors = violations(stem, config)
    if errors:
        raise ValueError(f"invalid config for {stem}: {'; '.join(errors)}")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    return env.get_template(f"{stem}.cu.jinja").render(**config)


def _job(stem: str, config: dict, arch, problem: dict | None) -> NvccJob | NvccFailure:
    key = tuple(sorted(config.items()))
    name = parse(arch).name
    if stem not in STEMS:
        return NvccFailure(stem, key, name, "space", f"unknown CUTLASS stem {stem!r}; known stems: {stems()}")
    if name not in STEMS[stem].archs:
        return NvccFailure(stem, key, name, "space", f"{stem} has code only for {STEMS[stem].archs}, not {name}")
    errors = violations(stem, config, problem)
    if errors:
        stage = "constraints" if all(e.startswith("constraint") for e in errors) else "space"
        return NvccFailure(stem, key, name, stage, "; ".join(errors))
    return NvccJob(name=stem, config=key, source=render(stem, config), arch=name, include_dirs=(str(HERE),),
                   depends=(str(HEADER),))


def build_many(items: list[tuple[str, dict]], arch="sm90a", problem: dict | None = None,
               progress: bool = True) -> list[NvccBuild | NvccFailure]:
    """Build each (stem, config) for `arch`, in parallel and cached; a result object per item, in order."""
    prepared = [_job(stem, cfg, arch, problem) for stem, cfg in items]
    jobs = [p for p in prepared if isinstance(p, NvccJob)]
    built = iter(_build_jobs(jobs, progress=progress))
    return [next(built) if isinstance(p, NvccJob) else p for p in prepared]


def build(stem: str, config: dict, arch="sm90a", problem: dict | None = None) -> NvccBuild | NvccFailure:
    """Build one (stem, config); see `build_many`."""
    return build_many([(stem, config)], arch, problem)[0]
