"""The config an op launches with: one resolution per (stem, arch, problem bucket, overrides), cached.

`resolve(stem, device, config, problem)`:
- a complete `config` (every parameter of the stem's SPACE: what a compiled model's kernel modules pass, from the
  plan's per-bucket table) is used as it is, after the stem's constraints are checked once for its bucket;
- otherwise the base is the autotuner's exported entry for this GPU's arch and the problem's bucket (CUDA tensors
  only; dskc.select.tuned), else the stem's tuning-free rule for the problem (registry.default_config), and the
  keys of a partial `config` override it.
The result is cached per (stem, arch, problem bucket, config), so a launch does no file I/O, JSON parsing or
constraint evaluation after the first call of its bucket. An export written while a process runs is seen by new
processes (or after `clear()`).
"""
from __future__ import annotations

import functools

from dskc import arch as _arch


def _arch_name(device) -> str:
    """The arch whose tables serve `device` ("sm90a" for CPU tensors under the interpreter)."""
    family = _arch.family_of_device(device)
    return _arch.detect(device).name if device.type == "cuda" else {"sm90": "sm90a"}[family]


def resolve(stem: str, device, config: dict | None, problem) -> dict:
    """The validated config for one launch of `stem` on `problem` (see the module docstring). The dict is shared
    between calls of the same bucket: do not modify it. ValueError for unknown keys or broken constraints."""
    items = tuple(sorted(config.items())) if config else ()
    return _resolved(stem, _arch_name(device), device.type == "cuda", problem.bucket(), items)


@functools.lru_cache(maxsize=4096)
def _resolved(stem: str, arch: str, on_gpu: bool, bucket, items: tuple) -> dict:
    from dskc.templates import registry

    mod = registry.get(stem)
    given = dict(items)
    unknown = sorted(set(given) - set(mod.SPACE))
    if unknown:
        raise ValueError(f"config keys {unknown} are not in {stem!r}'s space {list(mod.SPACE)}")
    if set(given) == set(mod.SPACE):
        cfg = given
    else:
        base = None
        if on_gpu:
            from dskc.select import tuned
            base, _ = tuned.lookup(stem, arch, bucket.as_dict())
        cfg = {**(base or registry.default_config(stem, arch, bucket)), **given}
    broken = registry.broken_constraints(mod, cfg, bucket)
    if broken:
        raise ValueError(f"config {cfg} breaks {stem!r}'s constraints {broken} for problem {bucket.as_dict()}")
    return cfg


def clear() -> None:
    """Forget every resolved config (e.g. after writing a new tuned export in this process)."""
    _resolved.cache_clear()
