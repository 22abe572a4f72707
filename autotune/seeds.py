"""Seeds for a study: the per-arch default first (so the untuned default always competes), then known-good configs
from the autotune data, then configs imported from vLLM/SGLang fused-MoE tuning files.

vLLM/SGLang files are JSON keyed by batch size M: {"64": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128,
"BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 3}, ...}. Their keys map onto a stem's space
through the data's "vllm_names" (default: BLOCK_SIZE_X -> BLOCK_X, GROUP_SIZE_M -> GROUP_M, the rest unchanged).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from dskc.arch import parse
from dskc.autotune.space import TuneSpace, encode, violated

log = logging.getLogger("dskc.autotune")
_VLLM_DEFAULT_NAMES = {"BLOCK_SIZE_M": "BLOCK_M", "BLOCK_SIZE_N": "BLOCK_N", "BLOCK_SIZE_K": "BLOCK_K",
                       "GROUP_SIZE_M": "GROUP_M", "num_warps": "num_warps", "num_stages": "num_stages"}


def default_config(space: TuneSpace, arch, problem: dict | None = None) -> dict:
    """The config the compiler runs untuned: for a registered stem and a problem, its tuning-free rule's choice
    (dskc.templates.registry.default_config); otherwise the arch family's DEFAULTS entry."""
    family = parse(arch).family
    if family not in space.module.DEFAULTS:
        raise KeyError(f"stem {space.stem!r} has no default config for {family}; it has {sorted(space.module.DEFAULTS)}")
    if problem is not None and hasattr(space.module, "Problem") and hasattr(space.module, "rule"):
        from dskc.templates import registry
        return registry.default_config(space.stem, arch, problem)
    return dict(space.module.DEFAULTS[family])


def seed_configs(space: TuneSpace, arch, problem: dict, imported: list) -> list[tuple[str, dict]]:
    """[(label, optuna params)] of the seeds that lie in the space and meet the constraints, deduplicated.

    A seed outside the space or breaking a constraint is logged and skipped (a default that does so is a template
    bug; the study then has no 'default' baseline and the final table says so).
    """
    family = parse(arch).family
    candidates = [("default", default_config(space, arch, problem))]
    candidates += [(f"known_good[{i}]", c) for i, c in enumerate(space.data.get("known_good", {}).get(family, []))]
    candidates += [(f"imported[{i}]", c) for i, c in enumerate(imported)]
    out, seen = [], []
    for label, config in candidates:
        try:
            params = encode(space, config)
        except ValueError as exc:
            log.warning("seed %s of %s skipped: %s", label, space.stem, exc)
            continue
        broken = violated(space, config, problem)
        if broken is not None:
            log.warning("seed %s of %s skipped for %s: breaks %s", label, space.stem, problem, broken)
            continue
        if params not in seen:
            seen.append(params)
            out.append((label, params))
    return out


def read_vllm_file(path: str | Path, space: TuneSpace) -> dict[int, dict]:
    """{M: config over the stem's space} from a vLLM/SGLang fused-MoE config file. ValueError on a bad file.

    Keys of the file that the space does not have are dropped; space parameters the file lacks take the per-arch
    default's value (the caller fills them with `complete`).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read vLLM/SGLang config file {path}: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a JSON object keyed by batch size M")
    names = {**_VLLM_DEFAULT_NAMES, **space.data.get("vllm_names", {})}
    out = {}
    for m, entry in raw.items():
        if not str(m).isdigit() or not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {m!r} is not 'M': {{...}}")
        out[int(m)] = {names[k]: v for k, v in entry.items() if k in names and names[k] in space.names}
    return out


def imported_for(path: str | Path, space: TuneSpace, arch, m: int) -> list[dict]:
    """Configs from a vLLM/SGLang file for a study with batch size m: the nearest-M entry first, then the rest."""
    table = read_vllm_file(path, space)
    base = default_config(space, arch)
    order = sorted(table, key=lambda k: (abs(k - m), k))
    return [{**base, **table[k]} for k in order]
