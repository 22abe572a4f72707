"""Ahead-of-time output: every cubin a compiled model needs plus a manifest, written to a directory."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import shutil
from pathlib import Path

from dskc.build.triton_xc import CompileError, toolchain

MANIFEST_VERSION = 1


def write(plan, out_dir: str | Path, model_config: dict | None = None) -> Path:
    """Copy the plan's built kernels into out_dir/kernels/ and write out_dir/manifest.json. Returns the manifest path.

    Refuses a plan with kernels that did not build (they are listed in the error)."""
    out = Path(out_dir)
    failed = [(k, r) for k, rs in plan.reports.items() for r in rs if isinstance(r, CompileError)]
    if failed:
        raise RuntimeError(f"{len(failed)} kernels did not build for {plan.target}; first: {failed[0][1]}")
    if not plan.reports:
        raise RuntimeError("the plan has no built kernels: run dskc.compiler.build(plan) first")
    (out / "kernels").mkdir(parents=True, exist_ok=True)
    kernels = []
    for (stem, problem, config), reports in plan.reports.items():
        for r in reports:
            digest = hashlib.sha256(Path(r.cubin).read_bytes()).hexdigest()
            name = f"{stem}-{digest[:16]}.cubin"
            shutil.copyfile(r.cubin, out / "kernels" / name)
            kernels.append({"stem": stem, "kernel": r.name, "problem": dict(problem), "config": dict(config),
                            "file": f"kernels/{name}", "sha256": digest, "registers": r.registers,
                            "shared_bytes": r.shared_bytes, "spill_bytes": r.spill_store_bytes + r.spill_load_bytes,
                            "tensor_core_ops": list(r.tensor_core_ops)})
    for (stem, problem, config), lib in getattr(plan, "libraries", {}).items():   # CUTLASS picks (.so)
        digest = hashlib.sha256(Path(lib.library).read_bytes()).hexdigest()
        name = f"{stem}-{digest[:16]}.so"
        shutil.copyfile(lib.library, out / "kernels" / name)
        kernels.append({"stem": stem, "kernel": lib.name, "backend": "cutlass", "problem": dict(problem),
                        "config": dict(config), "file": f"kernels/{name}", "sha256": digest,
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
    """Read a manifest back and check every cubin against its hash; raises ValueError naming a bad file."""
    out = Path(out_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    for k in manifest["kernels"]:
        data = (out / k["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != k["sha256"]:
            raise ValueError(f"{k['file']} does not match its manifest hash (corrupt or edited)")
    return manifest


def config_dict(args) -> dict:
    return dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args or {})
