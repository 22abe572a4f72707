"""Run a `dskc compile --out DIR` build on a GPU without compiling: the shipped cubins serve Triton's launches.

Every Triton kernel in the manifest carries Triton's metadata JSON and the specialisation it was built with
(signature, constexprs, num_warps / num_stages, which arguments it assumes 16-divisible). `install` gives each JIT
function named there a `compile` hook: Triton calls `fn.compile(src, target=..., options=...)` when its in-memory
cache misses (it sets `fn.compile` when it first binds the function to a device, so the hook is put in place right
after that, through the device cache's factory), and the hook returns a shipped kernel when one is valid for the
launch:

- same target (backend and compute capability) and the same num_warps / num_stages;
- every constexpr equal, every argument type equal (an int the JIT specialised to the constant 1 is passed to the
  cubin as the runtime int it was built for);
- every argument the cubin assumes 16-divisible is 16-divisible in this launch (the cubin may be less specialised
  than a fresh JIT build would be: still correct);
- the cubin and metadata still match their manifest hashes when they are loaded (a file edited after `verify`
  compiles here instead; Triton gets a private copy of the checked bytes).

Anything else compiles as usual and is counted (`stats`), so `dskc run --from DIR` says how many kernels came from
DIR and how many were compiled. Triton's metadata and launchers are version-specific: when the Triton that built DIR
is not the one here, nothing is served (every launch compiles, counted) and the reason is logged once.
Under TRITON_INTERPRET (a CPU) there is nothing to compile; `install` reports that and serves nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
from pathlib import Path

log = logging.getLogger("dskc.runtime.aot")
_INT_TYPES = ("i1", "i8", "i16", "i32", "i64", "u1", "u8", "u16", "u32", "u64")


@dataclasses.dataclass
class Stats:
    served: int = 0      # launches specialisations answered by a shipped cubin
    compiled: int = 0    # specialisations Triton had to compile here
    misses: list = dataclasses.field(default_factory=list)   # (function, why) of each compiled one


def mismatch(entry: dict, src, target, options: dict, cc: int) -> str | None:
    """Why the shipped kernel `entry` (a manifest "launch" record) cannot serve the JIT's (src, target, options)
    launch, or None when it can. src.constants and src.attrs are keyed by parameter position."""
    if getattr(target, "backend", None) != "cuda" or getattr(target, "arch", None) != cc:
        return f"target {target} is not the manifest's sm_{cc}"
    for opt in ("num_warps", "num_stages"):
        if options.get(opt) != entry[opt]:
            return f"{opt} {options.get(opt)} != {entry[opt]}"
    position = {name: i for i, name in enumerate(src.fn.arg_names)}
    if set(position) != set(entry["signature"]):
        return f"{src.fn.__name__}'s parameters are not the ones it was built with (source changed?)"
    for name, want in entry["signature"].items():
        got, value = src.signature.get(name), src.constants.get((position[name],))
        if want == "constexpr":
            if got != "constexpr" or value != entry["constexprs"][name]:
                return f"constexpr {name}={value!r} != {entry['constexprs'][name]!r}"
        elif got != want and not (got == "constexpr" and want in _INT_TYPES and isinstance(value, int)
                                  and not isinstance(value, bool)):
            return f"argument {name} is {got}, the cubin takes {want}"
    for name in entry["divisible_by_16"]:
        if ["tt.divisibility", 16] not in [list(a) for a in src.attrs.get((position[name],), ())]:
            return f"argument {name} is not 16-divisible here"
    return None


class _Hook:
    """`fn.compile` replacement for one JIT function: a shipped kernel when one fits, else Triton's compile."""

    def __init__(self, fn, entries: list, root: Path, cc: int, serve: bool, stats: Stats, original):
        self.fn, self.entries, self.root, self.cc, self.serve = fn, entries, root, cc, serve
        self.stats, self.original, self._loaded = stats, original, {}

    def kernel_for(self, src, target, options: dict):
        """The CompiledKernel a shipped cubin gives this launch, or (None, why)."""
        whys = []
        for i, e in enumerate(self.entries):
            why = mismatch(e["launch"], src, target, options, self.cc)
            if why is None and i not in self._loaded:
                kernel, why = self._compiled_kernel(e)
                if kernel is not None:
                    self._loaded[i] = kernel
            if why is None:
                return self._loaded[i], None
            whys.append(why)
        return None, "; ".join(sorted(set(whys))) or "no shipped kernel"

    def _compiled_kernel(self, e: dict):
        """(CompiledKernel, None) from a private copy of the shipped files whose bytes match the manifest's
        hashes, or (None, why) when a file changed since the directory was verified: the launch then compiles
        here (counted, logged) instead of running a cubin nobody checked."""
        import tempfile

        from triton.compiler import ASTSource
        from triton.compiler.compiler import CompiledKernel

        launch = e["launch"]
        attrs = {(self.fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in launch["divisible_by_16"]}
        sig = {name: launch["signature"][name] for name in self.fn.arg_names}
        src = ASTSource(fn=self.fn, signature=sig, constexprs=dict(launch["constexprs"]),
                        attrs=attrs)
        with tempfile.TemporaryDirectory(prefix="dskc-aot-") as private:
            group = {}
            for rel, digest, name in ((e["metadata"], e["metadata_sha256"], "kernel.json"),
                                      (e["file"], e["sha256"], "kernel.cubin")):
                data = (self.root / rel).read_bytes()
                if hashlib.sha256(data).hexdigest() != digest:
                    return None, f"{rel} changed since {self.root} was verified (it does not match its hash)"
                group[name] = str(Path(private) / name)
                Path(group[name]).write_bytes(data)
            return CompiledKernel(src, group, e["sha256"]), None     # reads both files now; checked bytes only

    def __call__(self, src, target=None, options=None, **kwargs):
        if self.serve:
            kernel, why = self.kernel_for(src, target, options or {})
            if kernel is not None:
                self.stats.served += 1
                return kernel
        else:
            why = "not served (see the install log)"
        self.stats.compiled += 1
        self.stats.misses.append((self.fn.__name__, why))
        log.warning("dskc: %s is compiled here, no shipped kernel fits: %s", self.fn.__name__, why)
        return self.original(src, target=target, options=options, **kwargs)


class Installed:
    """What `install` did; `uninstall()` gives the JIT functions back their own compile."""

    def __init__(self, hooks: list, stats: Stats, serving: bool, reason: str):
        self.hooks, self.stats, self.serving, self.reason = hooks, stats, serving, reason

    def uninstall(self) -> None:
        for h in self.hooks:
            h.fn.device_caches.default_factory = h.factory
            if hasattr(h.fn, "compile"):
                h.fn.compile = h.original
        self.hooks = []


def _hook_in(fn, hook: _Hook) -> None:
    """Make `hook` the JIT function's compile, now if Triton already bound it to a device, else right after it
    does (Triton's create_binder sets fn.compile to triton.compile)."""
    factory = fn.device_caches.default_factory
    hook.factory = factory

    def bind_then_hook():
        entry = factory()
        fn.compile = hook
        return entry

    fn.device_caches.default_factory = bind_then_hook
    if fn.device_caches:
        fn.compile = hook


def install(out_dir: str | Path, manifest: dict | None = None) -> Installed:
    """Hook every Triton kernel function the manifest in `out_dir` ships (verified by hash first)."""
    from dskc.arch import parse
    from dskc.build import aot
    from dskc.build.triton_xc import toolchain

    root = Path(out_dir)
    manifest = manifest or aot.verify(root)
    cc = parse(manifest["target"]).cc
    built_with, here = manifest.get("toolchain", {}), dict(toolchain())
    serving, reason = True, f"cubins for {manifest['target']} serve matching launches"
    if built_with != here:
        serving, reason = False, f"built with {built_with}, this machine has {here}: every kernel compiles here"
    by_fn: dict = {}
    for e in manifest["kernels"]:
        if e.get("backend", "triton") == "triton":
            by_fn.setdefault((e["launch"]["module"], e["launch"]["function"]), []).append(e)
    from triton.compiler import compile as triton_compile

    stats, hooks = Stats(), []
    for (module, function), entries in by_fn.items():
        fn = getattr(importlib.import_module(module), function)
        if not hasattr(fn, "device_caches"):   # TRITON_INTERPRET: an InterpretedFunction never compiles
            return Installed([], stats, False, "the Triton interpreter runs the kernels here: no cubin is used")
        hook = _Hook(fn, entries, root, cc, serving, stats, triton_compile)
        _hook_in(fn, hook)
        hooks.append(hook)
    if not serving:
        log.warning("dskc: %s: %s", root, reason)
    return Installed(hooks, stats, serving, reason)
