"""Ahead-of-time output: every cubin a compiled model needs plus a manifest, written to a directory."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from pathlib import Path

from dskc.build import cache
from dskc.build.triton_xc import CompileError, toolchain

MANIFEST_VERSION = 3   # 2: each Triton kernel ships Triton's metadata JSON and its launch specialisation;
                       # 3: the plan's token buckets, regions per (slot, bucket), each distinct kernel once


def _copy(src: str | Path, out: Path, stem: str, ext: str) -> tuple[str, str]:
    """Copy a build cache file into out/kernels/ under a content name; returns (relative file, sha256). The bytes
    are checked against the cache entry's manifest as they are read, and the same bytes are hashed and written
    (a cache file changed since its build is an error, never shipped)."""
    data = cache.read_verified(Path(src).parent, Path(src).name)
    digest = hashlib.sha256(data).hexdigest()
    name = f"kernels/{stem}-{digest[:16]}.{ext}"
    (out / name).write_bytes(data)
    return name, digest


def _triton_kernels(plan, out: Path) -> list:
    """One manifest entry per distinct Triton kernel the plan's choices launch (what the runtime's hook serves)."""
    from dskc.templates import registry

    kernels, seen = [], set()
    for (stem, problem, config), reports in plan.reports.items():
        specs = registry.get(stem).compile_specs(dict(problem), dict(config))
        for spec, r in zip(specs, reports):
            if spec in seen:
                continue
            seen.add(spec)
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
    return kernels


def write(plan, out_dir: str | Path, model_config: dict | None = None) -> Path:
    """Copy the plan's built kernels into out_dir/kernels/ and write out_dir/manifest.json. Returns the manifest path.

    Every distinct kernel (stem, constexprs, warps, stages) the plan's per-bucket tables launch is shipped once; the
    manifest records the plan's token buckets so that `load` rebuilds the same tables. Refuses a plan with kernels
    that did not build (they are listed in the error)."""
    out = Path(out_dir)
    failed = [(k, r) for k, rs in plan.reports.items() for r in rs if isinstance(r, CompileError)]
    if failed:
        raise RuntimeError(f"{len(failed)} kernels did not build for {plan.target}; first: {failed[0][1]}")
    if not plan.reports:
        raise RuntimeError("the plan has no built kernels: run dskc.compiler.build(plan) first")
    (out / "kernels").mkdir(parents=True, exist_ok=True)
    kernels = _triton_kernels(plan, out)
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
        "model": model_config or {}, "tokens": list(getattr(plan, "tokens", ())), "kernels": kernels,
        "regions": [{"region": c.region, "slot": c.slot, "tokens": c.tokens, "stem": c.stem, "config": dict(c.config),
                     "source": c.source} for c in plan.choices],
        "fallbacks": [{"region": r, "reason": why} for r, why in plan.fallbacks],
    }
    path = out / "manifest.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
    return path


def verify(out_dir: str | Path) -> dict:
    """Read a manifest back and check every shipped file against its hash; raises ValueError naming a bad file
    (or a missing / unreadable / malformed manifest, one written by an incompatible dskc, or a file it names
    outside DIR/kernels)."""
    out = Path(out_dir)
    path = out / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{out} holds no manifest.json: not a `dskc compile --out` directory")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): corrupt or edited") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise ValueError(f"{path} has manifest version {version}, this dskc reads "
                         f"{MANIFEST_VERSION}: compile it again with `dskc compile --out`")
    kernels = manifest.get("kernels")
    if not isinstance(kernels, list) or not all(isinstance(k, dict) for k in kernels):
        raise ValueError(f"{path} is malformed: 'kernels' is not a list of kernel records")
    for i, k in enumerate(kernels):
        for file_key, sha_key in _files_of(k, i, path):
            _check_file(out, k[file_key], k[sha_key], f"{path} kernel {i}")
    return manifest


def _files_of(k: dict, i: int, path: Path) -> list[tuple[str, str]]:
    """The (file, hash) fields a kernel record must carry: a Triton kernel its cubin, metadata and launch record,
    a CUTLASS one its library."""
    pairs = [("file", "sha256")]
    need = ["file", "sha256"]
    if k.get("backend", "triton") == "triton":
        pairs.append(("metadata", "metadata_sha256"))
        need += ["metadata", "metadata_sha256", "launch"]
    missing = [f for f in need if f not in k]
    if missing:
        raise ValueError(f"{path} is malformed: kernel {i} ({k.get('kernel', '?')}) lacks {missing}")
    return pairs


def _check_file(out: Path, rel, digest, where: str) -> None:
    if not isinstance(rel, str) or not isinstance(digest, str):
        raise ValueError(f"{where}: file {rel!r} / hash {digest!r} are not strings")
    f = (out / rel).resolve()
    if not f.is_relative_to((out / "kernels").resolve()):
        raise ValueError(f"{where}: {rel!r} lies outside {out / 'kernels'}; refusing it")
    if not f.is_file():
        raise ValueError(f"{out / rel} is listed in the manifest but missing")
    if hashlib.sha256(f.read_bytes()).hexdigest() != digest:
        raise ValueError(f"{rel} does not match its manifest hash (corrupt or edited)")


def config_dict(args) -> dict:
    return dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args or {})
