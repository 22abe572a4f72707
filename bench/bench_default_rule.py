"""The tuning-free GEMM rule's choices on DeepGEMM's dense shape table, with the wave utilisation it predicts.

`python bench/bench_default_rule.py [--target sm90a]` prints, per (M, N, K) of DeepGEMM's README table
(REFERENCE.md section 3), the config `registry.default_config("fp8_gemm_1d2d", target, problem)` picks (tile, warps,
split-K), the programs it launches, the waves over the target's SMs and the SM utilisation over those waves
(1.0 = every SM busy in every wave), next to the old fixed default (128 x 128 for every shape) and DeepGEMM's
published H800 TFLOPS. These are the rule's own predictions (arithmetic on the grid), not timings; the GPU bench
(bench_fp8_gemm.py) measures the kernels. Under pytest the table is built once and checked for sanity.
"""
from __future__ import annotations

import argparse

from dskc.arch import parse
from dskc.benchmark.common import DEEPGEMM_DENSE
from dskc.templates import registry
from dskc.templates.triton._gemm_common import waves

STEM = "fp8_gemm_1d2d"


def rows(target: str = "sm90a") -> list[dict]:
    arch = parse(target)
    fixed = registry.default_config(STEM, arch)
    out = []
    for (m, n, k), tflops in sorted(DEEPGEMM_DENSE.items()):
        cfg = registry.default_config(STEM, arch, {"M": m, "N": n, "K": k})
        w, util = waves(m, n, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"], arch.sms)
        fw, futil = waves(m, n, fixed["BLOCK_M"], fixed["BLOCK_N"], fixed["SPLIT_K"], arch.sms)
        out.append({"M": m, "N": n, "K": k, "tile": f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}", "warps": cfg["num_warps"],
                    "split_k": cfg["SPLIT_K"], "waves": w, "util": util, "fixed_waves": fw, "fixed_util": futil,
                    "deepgemm_tflops": tflops})
    return out


def table(target: str = "sm90a") -> str:
    head = (f"{'M':>5} {'N':>6} {'K':>6}  {'rule tile':>9} {'warps':>5} {'splitK':>6} {'waves':>5} {'util':>5}   "
            f"{'128x128 waves':>13} {'util':>5}   {'DeepGEMM H800 TFLOPS':>20}")
    lines = [f"tuning-free rule for {STEM} on {parse(target)} ({parse(target).sms} SMs): predicted, not timed", head]
    for r in rows(target):
        lines.append(f"{r['M']:>5} {r['N']:>6} {r['K']:>6}  {r['tile']:>9} {r['warps']:>5} {r['split_k']:>6} "
                     f"{r['waves']:>5} {r['util']:>5.2f}   {r['fixed_waves']:>13} {r['fixed_util']:>5.2f}   "
                     f"{r['deepgemm_tflops']:>20}")
    return "\n".join(lines)


def test_rule_table(benchmark):
    """The table builds; the rule never predicts a worse SM utilisation than the fixed 128 x 128 default."""
    out = benchmark.pedantic(rows, rounds=1, iterations=1)
    assert len(out) == len(DEEPGEMM_DENSE)
    for r in out:
        assert 0 < r["util"] <= 1 and r["util"] >= r["fixed_util"] - 1e-9, r
    benchmark.extra_info["label"] = "rule predictions (grid arithmetic), not timings"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="sm90a")
    print(table(p.parse_args().target))
