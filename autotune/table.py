"""Exhaustive MODEL table of a (sub)space: every config's modelled time, for search-efficiency benches.

    python -m dskc.autotune.table STEM ARCH 'PROBLEM JSON' 'RESTRICT JSON' OUT.json

RESTRICT maps parameters to the values kept (the rest of the space stays whole). Configs that break a constraint
are left out; configs the compiler prunes (spills, shared memory, lost tensor cores) or that fail to build are
recorded with value null and their reason. Compiles go through the build cache in batches, so a rerun is cheap.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from dskc.build.triton_xc import compile_kernels
from dskc.autotune.hardware import hardware
from dskc.autotune.objective import compile_check, default_tensor_cores
from dskc.autotune.roofline import estimate
from dskc.autotune.seeds import default_config
from dskc.autotune.space import load_space, violated


def candidates(space, problem: dict, restrict: dict) -> list[dict]:
    names = space.names
    pools = [tuple(v for v in space.values(n) if n not in restrict or v in restrict[n]) for n in names]
    out = []
    for values in itertools.product(*pools):
        cfg = dict(zip(names, values))
        if violated(space, cfg, problem) is None:
            out.append(cfg)
    return out


def build_table(stem: str, arch: str, problem: dict, restrict: dict, batch: int = 16) -> dict:
    """{"stem", "arch", "problem", "restrict", "timing_mode": "model", "template_hash", "space" (the searched
    params and values), "default" (the per-arch default), "rows": [{"config", "value", "reason"}]}."""
    space = load_space(stem)
    configs = candidates(space, problem, restrict)
    for i in range(0, len(configs), batch):    # warm the cache in batches (one compiler process per batch)
        specs = [s for c in configs[i:i + batch] for s in space.module.compile_specs(problem, c)]
        compile_kernels(specs, arch)
        print(f"compiled {min(i + batch, len(configs))}/{len(configs)}", file=sys.stderr, flush=True)
    expected = default_tensor_cores(space, problem, arch, default_config(space, arch))
    rows = []
    for cfg in configs:
        try:
            reports, reason = compile_check(space, problem, cfg, arch, expected)
        except Exception as exc:  # a failed build is a row with its reason, as in a study
            rows.append({"config": cfg, "value": None, "reason": str(exc)[:200]})
            continue
        value = None if reason else estimate(space, problem, cfg, reports, hardware(arch))["time_s"]
        rows.append({"config": cfg, "value": value, "reason": reason})
    params = [[n, [v for v in space.values(n) if n not in restrict or v in restrict[n]]] for n in space.names]
    return {"stem": stem, "arch": arch, "problem": problem, "restrict": restrict, "timing_mode": "model",
            "template_hash": space.template_hash(), "space": params,
            "default": default_config(space, arch), "rows": rows}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stem, arch, problem, restrict, out = argv
    table = build_table(stem, arch, json.loads(problem), json.loads(restrict))
    Path(out).write_text(json.dumps(table, indent=0) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
