"""Ahead-of-time output: every cubin a compiled model needs plus a manifest, written to a directory."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import shutil
from pathlib import Path

from dskc.build.triton_xc import CompileError, toolchain

MANIFEST_VERSION = 2   # 2: each Triton kernel ships Triton's metadata JSON and its launch specialisation


def _copy(src: str | Path, out: Path, stem: str, ext: str) -> tuple[str, str]:
    """Copy src into out/kernels/ under a content name; returns (relative file, sha256)."""
    digest = hashlib.sha256(Path(src).read_bytes()).hexdigest()
    name = f"kernels/{stem}-{digest[:16]}.{ext}"
    shutil.copyfile(src, out / name)
    return name, digest


def write(plan, out_dir: str | Path, model_config: dict | None = None) -> Path:
    """Copy the plan's built kernels into out_dir/kernels/ and write out_dir/manifest.json. Returns the manifest path.

    Refuses a plan with kernels that did not build (they are listed in the error)."""
    out = Path(out_dir)
    failed = [(k, r) for k, rs in plan.reports.items() for r in rs if isinstance(r, CompileError)]
    if failed:
        raise RuntimeError(f"{len(failed)} kernels did not build for {plan.target}; first: {failed[0][1]}")
    if not plan.reports:
        raise RuntimeError("the plan has no built kernels: run dskc.compiler.build(plan) first")
    from dskc.templates import registry

    (out / "kernels").mkdir(parents=True, exist_ok=True)
    kernels = []
    for (stem, problem, config), reports in plan.reports.items():
        specs = registry.get(stem).compile_specs(dict(problem), dict(config))
        for spec, r in zip(specs, reports):
            name, digest = _copy(r.cubin, out, stem, "cubin")
            meta_name, meta_digest = _copy(r.metadata, out, stem, "json")
            kernels.append({"stem": stem, "kernel": r.name, "problem": dict(problem), "config": dict(config),
                            "file": name, "sha256": digest, "metadata": meta_name, "metadata_sha256": meta_digest,
                            "launch": {"module": spec.module, "function": spec.kernel,
                                       "signature": dict(spec.signature), "constexprs": dict(spec.constexprs),
                                       "num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                       "divisible_by_16": list(r.divisible_by_16)},
                            "registers": r.registers, "shared_bytes": r.shared_bytes,
                            "spill_bytes": r.spill_store_bytes + r.spill_load_bytes,
                            "tensor_core_ops": list(r.tensor_core_ops)})
    for (stem, problem, config), lib in getattr(plan, "libraries", {}).items():   # CUTLASS picks (.so)
        name, digest = _copy(lib.library, out, stem, "so")
        kernels.append({"stem": stem, "kernel": lib.name, "backend": "cutlass", "problem": dict(problem),
                        "config": dict(config), "file": name, "sha256": digest,
                        "registers": lib.registers, "shared_bytes": lib.shared_bytes,
                        "spill_bytes": lib.spill_store_bytes + lib.spill_load_bytes,
                        "tensor_core_ops": list(lib.tensor_core_ops)})
    manifest = {
        "version": MANIFEST_VERSION, "target": plan.target.name, "created": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"), "toolchain": dict(toolchain()),
        "model": model_config or {}, "kernels": kernels,
        "regions": [{"region": c.region, "stem": c.stem, "config": dict(c.config), "source": c.source}
                    for c in plan.choices],
        "fallbacks": [{"region": r, "reason": why} for r, why in plan.fallbacks],
    }
    path = out / "manifest.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
    return path


def verify(out_dir: str | Path) -> dict:
    """Read a manifest back and check every shipped file against its hash; raises ValueError naming a bad file
    (or a missing / unreadable manifest, or one written by an incompatible dskc)."""
    out = Path(out_dir)
    path = out / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{out} holds no manifest.json: not a `dskc compile --out` directory")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): corrupt or edited") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path} has manifest version {manifest.get('version')}, this dskc reads "
                         f"{MANIFEST_VERSION}: compile it again with `dskc compile --out`")
    for k in manifest["kernels"]:
        for file_key, sha_key in (("file", "sha256"), ("metadata", "metadata_sha256")):
            if file_key not in k:
                continue
            f = out / k[file_key]
            if not f.is_file():
                raise ValueError(f"{f} is listed in the manifest but missing")
            if hashlib.sha256(f.read_bytes()).hexdigest() != k[sha_key]:
                raise ValueError(f"{k[file_key]} does not match its manifest hash (corrupt or edited)")
    return manifest


def config_dict(args) -> dict:
    return dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args or {})
