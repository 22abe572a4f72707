"""Selection: for each IR node, the kernels that serve it (a table, as data) and each kernel's config for the
target arch: the autotuner's exported entry for this (arch, shape bucket) when one exists, else the stem's
tuning-free per-arch default. `source` says which, for `dskc explain`.

Backends: where a CUTLASS stem can serve a kernel on the target (FP8 / bf16 dense GEMMs and FP8 grouped GEMMs,
sm90a only; see dskc.select.backends), the Choice lists it in `alternatives`, and it replaces the Triton kernel only
when a MEASURED decision says it is faster for that shape bucket and the runtime has a CUTLASS path for the
region (RUNTIME_CUTLASS). `why` says which backend and why, for `dskc explain`.
"""
from __future__ import annotations

import dataclasses

from dskc.arch import Arch
from dskc.ir.graph import Node, Op


@dataclasses.dataclass(frozen=True)
class Choice:
    region: str
    stem: str
    problem: tuple          # sorted (name, value) pairs
    config: tuple           # sorted (name, value) pairs
    source: str             # "default:sm90" | "tuned:<file>" | "measured:<file>" (a CUTLASS pick)
    backend: str = "triton"
    why: str = ""           # why this backend ("" where CUTLASS has no kernel for the node on the target)
    alternatives: tuple = ()  # CUTLASS stems that could serve this kernel on the target
    triton: tuple = ()      # for a CUTLASS pick: (stem, config, source) of the Triton kernel it replaces (used
                            # when the CUTLASS build fails)


def _linear(n: Node, m: int) -> list[tuple[str, dict]]:
    N, K = n.shape
    if n.op is Op.FP8_LINEAR:
        return [("act_quant", {"M": m, "K": K}), ("fp8_gemm_1d2d", {"M": m, "N": N, "K": K})]
    return [("bf16_gemm", {"M": m, "N": N, "K": K})]


def _mlp(n: Node, m: int) -> list[tuple[str, dict]]:
    inter, dim = n.shape
    if n.dtype == "fp8":
        return [("act_quant", {"M": m, "K": dim}), ("fp8_gemm_1d2d", {"M": m, "N": 2 * inter, "K": dim}),
                ("fp8_gemm_1d2d", {"M": m, "N": dim, "K": inter})]
    return [("bf16_gemm", {"M": m, "N": 2 * inter, "K": dim}), ("bf16_gemm", {"M": m, "N": dim, "K": inter})]


def _moe(n: Node, m: int) -> list[tuple[str, dict]]:
    _, dim, inter = n.shape
    e, k = n.attr("n_experts"), n.attr("top_k")
    dt = "fp8" if n.dtype == "fp8" else "bf16"
    rows = max(1, m * k // e)
    route = {"T": m, "E": e, "top_k": k, "n_groups": n.attr("n_groups"), "n_limited_groups": n.attr("topk_groups"),
             "sigmoid": int(n.attr("score_func") == "sigmoid"), "has_bias": int(bool(n.attr("gate_bias")))}
    return [("moe_route", route),
            ("moe_permute", {"T": m, "E": e, "top_k": k, "D": dim, "align": 128, "masked": 0}),
            ("grouped_gemm", {"E": e, "M": rows, "N": 2 * inter, "K": dim, "dtype": dt, "layout": "contiguous",
                              "epilogue": "swiglu_quant" if dt == "fp8" else "swiglu"}),
            ("grouped_gemm", {"E": e, "M": rows, "N": dim, "K": inter, "dtype": dt, "layout": "contiguous",
                              "epilogue": "weight"})]


def _block(n: Node, m: int) -> list[tuple[str, dict]]:
    """What a block runs itself once fuse_block_norms fused its attn_norm: the norm + act_quant (the rmsnorm kernel
    of the act_quant stem) and the GEMM(s) of MLA's input projections (fused_into the block, so not listed there).
    A fused ffn_norm's kernel is the MLP's act_quant, listed with the MLP (as q_norm's is with wq_b)."""
    if not n.attr("attn_norm"):
        return []
    dim = n.shape[1]
    return [("act_quant", {"M": m, "K": dim})] + [("fp8_gemm_1d2d", {"M": m, "N": w, "K": dim})
                                                  for w in n.attr("attn_gemm_n")]


def _mla(n: Node, m: int) -> list[tuple[str, dict]]:
    h = n.attr("heads")
    # decode (one query per sequence) and prefill (the runtime runs a prompt as causal s_q > 1 over the cache)
    return [("mla_rope", {"tokens": m, "h_q": h, "kv_fp8": 0}),
            ("mla_decode", {"batch": m, "s_q": 1, "h_q": h, "seqlen": 4096, "page_size": 64, "kv_fp8": 0}),
            ("mla_decode", {"batch": 1, "s_q": m, "h_q": h, "seqlen": 4096, "page_size": 64, "kv_fp8": 0})]


CANDIDATES = {Op.LINEAR: _linear, Op.FP8_LINEAR: _linear, Op.MLP: _mlp, Op.MOE: _moe, Op.MLA: _mla,
              Op.BLOCK: _block}
# regions whose runtime module can launch a CUTLASS GEMM (dskc.runtime.modules.KernelLinear); the MLP and MoE
# modules fuse epilogues into their Triton kernels and have no CUTLASS path yet
RUNTIME_CUTLASS = frozenset({Op.LINEAR, Op.FP8_LINEAR})


def choose(node: Node, arch: Arch, m_hint: int = 64, runs_on: str = "gpu") -> list[Choice]:
    """The kernels (with configs) that serve `node` on `arch`; [] for regions left to eager PyTorch.

    runs_on: "gpu" (the target GPU) or "cpu" (Triton's interpreter, where CUTLASS is never selected).
    """
    from dskc.select import tuned
    from dskc.templates import registry

    make = CANDIDATES.get(node.op)
    if make is None or node.attr("fused_into"):   # a fused node runs inside the kernels of the node it names
        return []
    out = []
    for stem, problem in make(node, m_hint):
        cfg, source = tuned.lookup(stem, arch, problem)
        if cfg is None:
            cfg, source = registry.default_config(stem, arch), f"default:{arch.family}"
        choice = Choice(node.name, stem, tuple(sorted(problem.items())), tuple(sorted(cfg.items())), source)
        out.append(_backend(choice, node, arch, runs_on))
    return out


def _backend(c: Choice, node: Node, arch: Arch, runs_on: str) -> Choice:
    """`c` with its CUTLASS alternatives and backend decision (a CUTLASS Choice only on a measured win)."""
    from dskc.select import backends
    from dskc.templates import cutlass

    problem = dict(c.problem)
    decision = backends.decide(c.stem, problem, arch, runs_on=runs_on)
    if decision is None:
        return c
    alts = (cutlass.OPS[backends.cutlass_op(c.stem, problem)],)
    if decision.backend == "triton":
        return dataclasses.replace(c, why=decision.why, alternatives=alts)
    if node.op not in RUNTIME_CUTLASS:
        return dataclasses.replace(c, alternatives=alts, why=f"Triton: no CUTLASS path in the {node.op.value} "
                                   f"runtime module (CUTLASS {decision.why})")
    return Choice(c.region, decision.stem, c.problem, decision.config, decision.source, "cutlass", decision.why,
                  alts, (c.stem, c.config, c.source))
