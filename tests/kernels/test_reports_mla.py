"""What the compiler makes of the MLA stems' default configs on sm_90a / sm_100a, without a GPU."""
import os
import subprocess
import sys
import tempfile

import pytest

from dskc.build.report import kernel_report

DECODE_COMPUTE_BOUND = dict(batch=64, s_q=1, h_q=128, seqlen=4096, page_size=64, kv_fp8=0)
DECODE_FP8_MTP = dict(batch=64, s_q=2, h_q=64, seqlen=4096, page_size=64, kv_fp8=1)
PREFILL = dict(batch=4, seqlen=4096, heads=16, d_qk=192, d_v=128, kv_fp8=0)

# The JIT launcher specializes 16-byte aligned pointer arguments (tt.divisibility 16) and so vectorizes the
# gathers; dskc.build.triton_xc does not yet pass that attribute, so spills are measured here with it.
_ALIGNED_BUILD = r"""
import json, os, sys, subprocess, tempfile, importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dskc.build._xc_worker import _ptxas_verbose
from dskc.build.triton_xc import parse_spills
from dskc.templates import registry
stem, problem = sys.argv[1], json.loads(sys.argv[2])
mod = registry.get(stem)
out = []
for spec in mod.compile_specs(problem, registry.default_config(stem, "sm90a")):
    sig = dict(spec.signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if sig[n].startswith("*")}
    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs),
                        target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    out.append([spec.kernel, *parse_spills(_ptxas_verbose(ck.asm["ptx"], "sm_90a", tempfile.mkdtemp()))])
print(json.dumps(out))
"""


def aligned_spills(stem, problem):
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _ALIGNED_BUILD, stem, json.dumps(problem)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_decode_sm90a_uses_wgmma_when_compute_bound():
    split, combine = kernel_report("mla_decode", DECODE_COMPUTE_BOUND, "sm90a")
    assert split.name.startswith("mla_decode_split_kernel")
    assert "HGMMA" in split.tensor_core_ops
    assert not combine.spills
    assert split.shared_bytes <= 232448


def test_decode_fp8_cache_sm90a_builds_with_wgmma():
    split, _ = kernel_report("mla_decode", DECODE_FP8_MTP, "sm90a")
    assert "HGMMA" in split.tensor_core_ops


def test_decode_compiles_for_sm100a():
    split, combine = kernel_report("mla_decode", DECODE_COMPUTE_BOUND, "sm100a")
    assert any(op.startswith("UTC") for op in split.tensor_core_ops)


def test_prefill_and_rope_sm90a():
    (prefill,) = kernel_report("mla_prefill", PREFILL, "sm90a")
    assert "HGMMA" in prefill.tensor_core_ops
    (rope,) = kernel_report("mla_rope", dict(tokens=4096, h_q=16, kv_fp8=1), "sm90a")
    assert not rope.spills


@pytest.mark.parametrize("stem,problem", [("mla_decode", DECODE_COMPUTE_BOUND), ("mla_decode", DECODE_FP8_MTP),
                                          ("mla_prefill", PREFILL)])
def test_default_configs_do_not_spill_with_aligned_pointers(stem, problem):
    for kernel, stores, loads in aligned_spills(stem, problem):
        assert (stores, loads) == (0, 0), f"{kernel} spills {stores} / {loads} bytes"


@pytest.mark.parametrize("stem,problem", [
    ("mla_decode", dict(batch=1, s_q=1, h_q=1, seqlen=1, page_size=16, kv_fp8=0)),
    ("mla_decode", DECODE_FP8_MTP), ("mla_prefill", PREFILL), ("mla_rope", dict(tokens=1, h_q=1, kv_fp8=0))])
def test_defaults_meet_their_constraints(stem, problem):
    from dskc.templates import registry
    mod = registry.get(stem)
    for arch in ("sm80", "sm90a", "sm100a"):
        cfg = registry.default_config(stem, arch)
        assert set(cfg) == set(mod.SPACE) and all(cfg[k] in mod.SPACE[k] for k in cfg)
        assert registry.satisfies(mod, cfg, problem)
    assert next(registry.configs(mod, problem), None) is not None
    flops, nbytes = mod.cost(problem)
    assert flops > 0 and nbytes > 0
