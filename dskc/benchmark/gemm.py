"""GEMM suite: the dense FP8 1D2D stem on DeepGEMM's shape table and the DeepSeek-V3 layer linears, the bf16 stem
on the DeepSeek-V2-Lite layer linears (bf16 weights; its 10944-wide MLP is not a multiple of 128), next to torch
eager, torch._scaled_mm, torch.compile, DeepGEMM (when importable) and DeepGEMM's published figures; and the
activation quantisation feeding the FP8 GEMMs (stem act_quant) next to the same recipe in PyTorch."""
from __future__ import annotations

import torch

from dskc.benchmark.cases import Case, Impl
from dskc.benchmark.common import (DEEPGEMM_DENSE, DEEPGEMM_SRC, E4M3, H800, Ctx, compile_impl, have,
                                   tuned_impl)


def layer_linears(name: str) -> list[tuple[str, int, int]]:
    """(linear, N, K) of one decoder layer of the named config: attention projections, the dense MLP and the
    shared experts (world size 1). With FP8 weights and a 128-multiple q_lora_rank the compiled block runs wq_a and
    wkv_a as one GEMM over the stacked weights (dskc.runtime.block), so that is the row; otherwise each alone."""
    from dskc.model import get_config

    a = get_config(name)
    qk, h, kv_a = a.qk_nope_head_dim + a.qk_rope_head_dim, a.n_heads, a.kv_lora_rank + a.qk_rope_head_dim
    if a.q_lora_rank and a.dtype == "fp8" and a.q_lora_rank % 128 == 0:
        rows = [("wq_a|wkv_a", a.q_lora_rank + kv_a, a.dim)]
    elif a.q_lora_rank:
        rows = [("wq_a", a.q_lora_rank, a.dim), ("wkv_a", kv_a, a.dim)]
    else:
        rows = [("wq", h * qk, a.dim), ("wkv_a", kv_a, a.dim)]
    rows += [("wq_b", h * qk, a.q_lora_rank)] if a.q_lora_rank else []
    rows += [("wkv_b", h * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank), ("wo", a.dim, h * a.v_head_dim),
             ("mlp.w1", a.inter_dim, a.dim), ("mlp.w2", a.dim, a.inter_dim),
             ("shared.w1", a.n_shared_experts * a.moe_inter_dim, a.dim),
             ("shared.w2", a.dim, a.n_shared_experts * a.moe_inter_dim)]
    return rows


def fp8_operands(m, n, k, device):
    a = (torch.randn(m, k, device=device) * 0.5).to(E4M3)
    sa = torch.rand(m, k // 128, device=device) + 0.5
    b = (torch.randn(n, k, device=device) * 0.5).to(E4M3)
    sb = torch.rand(-(-n // 128), k // 128, device=device) + 0.5
    return a, sa, b, sb


def _fp8_ref(m, n, k, device):
    """Operands plus their float64 product (1D2D dequantisation)."""
    a, sa, b, sb = fp8_operands(m, n, k, device)
    deq_a = a.double() * sa.double().repeat_interleave(128, 1)
    deq_b = b.double() * sb.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
    return (a, sa, b, sb), deq_a @ deq_b.T


def _fp8_impls(ctx: Ctx, m, n, k, ops) -> list[Impl]:
    from dskc.ops import fp8_gemm

    a, sa, b, sb = ops
    dev = ctx.device
    impls = [Impl("dskc-default", lambda: (lambda: fp8_gemm(a, sa, b, sb, config=_default("fp8_gemm_1d2d", ctx))))]
    impls.append(tuned_impl(ctx, "fp8_gemm_1d2d", {"M": m, "N": n, "K": k},
                            lambda cfg: (lambda: fp8_gemm(a, sa, b, sb, config=cfg))))
    a16 = lambda: (a.to(torch.bfloat16), b.to(torch.bfloat16))  # noqa: E731
    impls.append(Impl("torch-bf16", lambda: (lambda x, y: (lambda: torch.matmul(x, y.t())))(*a16()),
                      note="bf16 operands of the same shape"))
    row, col = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
    impls.append(Impl("torch-scaled-mm", lambda: (lambda: torch._scaled_mm(a, b.t(), scale_a=row, scale_b=col,
                                                                           out_dtype=torch.bfloat16))))
    impls.append(compile_impl(ctx, lambda: (lambda x, y: x @ y.t(), a16())))
    if ctx.gpu and have("deep_gemm"):
        impls.append(Impl("deep_gemm", lambda: _deep_gemm_dense(a, sa, b, sb)))
    if (m, n, k) in DEEPGEMM_DENSE:
        impls.append(Impl("published-deepgemm", published=(DEEPGEMM_DENSE[(m, n, k)], H800, DEEPGEMM_SRC)))
    return impls


def _default(stem: str, ctx: Ctx) -> dict:
    from dskc.templates import registry
    return registry.default_config(stem, ctx.arch or "sm90a")


def _deep_gemm_dense(a, sa, b, sb):
    import deep_gemm

    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.bfloat16, device=a.device)
    return lambda: deep_gemm.fp8_gemm_nt((a, sa), (b, sb), out)


def fp8_case(ctx: Ctx, m: int, n: int, k: int, label: str) -> Case:
    ops, ref = _fp8_ref(m, n, k, ctx.device) if ctx.smoke else (fp8_operands(m, n, k, ctx.device), None)
    return Case("gemm", f"fp8 {label} M={m} N={n} K={k}", "fp8_gemm_1d2d", {"M": m, "N": n, "K": k},
                tuple(_fp8_impls(ctx, m, n, k, ops)), flops=2.0 * m * n * k, bytes=float(m * k + n * k + 2 * m * n),
                ceiling="fp8_scaled_mm", ref=(lambda: ref) if ref is not None else None)


def bf16_case(ctx: Ctx, m: int, n: int, k: int, label: str) -> Case:
    from dskc.ops import bf16_gemm

    # The interpreter's bf16 tl.dot is wrong (triton #11584): smoke runs the same kernel on fp16 operands.
    dt = torch.float16 if ctx.smoke else torch.bfloat16
    a = torch.randn(m, k, device=ctx.device, dtype=dt)
    b = torch.randn(n, k, device=ctx.device, dtype=dt) * k ** -0.5
    impls = [Impl("dskc-default", lambda: (lambda: bf16_gemm(a, b, config=_default("bf16_gemm", ctx))),
                  note="fp16 operands in the smoke run" if ctx.smoke else "")]
    impls.append(tuned_impl(ctx, "bf16_gemm", {"M": m, "N": n, "K": k},
                            lambda cfg: (lambda: bf16_gemm(a, b, config=cfg))))
    impls.append(Impl("torch-bf16", lambda: (lambda: torch.matmul(a, b.t()))))
    impls.append(compile_impl(ctx, lambda: (lambda x, y: x @ y.t(), (a, b))))
    ref = (a.double() @ b.double().T) if ctx.smoke else None
    return Case("gemm", f"bf16 {label} M={m} N={n} K={k}", "bf16_gemm", {"M": m, "N": n, "K": k}, tuple(impls),
                flops=2.0 * m * n * k, bytes=2.0 * (m * k + n * k + m * n),
                ref=(lambda: ref) if ref is not None else None)


def torch_act_quant(x):
    """1x128 e4m3 quantisation in PyTorch: (q [M, K] e4m3, s [M, K/128] fp32), amax clamped to 1e-4."""
    m, k = x.shape
    blocks = x.float().view(m, k // 128, 128)
    s = blocks.abs().amax(-1).clamp_min(1e-4) / 448.0
    return (blocks / s[..., None]).to(E4M3).view(m, k), s


def act_quant_case(ctx: Ctx, m: int, k: int, label: str) -> Case:
    """Per-token 1x128 activation quantisation (stem act_quant): memory-bound, GB/s."""
    from dskc.ops import act_quant

    x = torch.randn(m, k, device=ctx.device, dtype=torch.bfloat16)
    impls = [Impl("dskc-default", lambda: (lambda: act_quant(x, config=_default("act_quant", ctx)))),
             tuned_impl(ctx, "act_quant", {"M": m, "K": k}, lambda cfg: (lambda: act_quant(x, config=cfg))),
             Impl("torch-bf16", lambda: (lambda: torch_act_quant(x)), note="amax / scale / cast in eager PyTorch"),
             compile_impl(ctx, lambda: (torch_act_quant, (x,)))]
    ref = torch_act_quant(x)[0] if ctx.smoke else None
    return Case("gemm", f"act_quant {label} M={m} K={k}", "act_quant", {"M": m, "K": k}, tuple(impls),
                bytes=float(m * k * 2 + m * k + m * (k // 128) * 4), primary="gbps",
                ref=(lambda: ref) if ref is not None else None)


def cases(ctx: Ctx):
    """Yield the suite's cases (lazily: operands of one case live while it runs)."""
    if ctx.smoke:
        yield fp8_case(ctx, 3, 72, 128, "smoke")
        yield bf16_case(ctx, 5, 72, 64, "smoke")
        yield act_quant_case(ctx, 5, 256, "smoke")
        return
    for m, n, k in sorted(DEEPGEMM_DENSE):
        yield fp8_case(ctx, m, n, k, "deepgemm-table")
    seen = set(DEEPGEMM_DENSE)
    for m in (64, 4096):
        for lin, n, k in layer_linears("deepseek-v3"):
            if (m, n, k) not in seen:
                seen.add((m, n, k))
                yield fp8_case(ctx, m, n, k, f"deepseek-v3 {lin}")
        for lin, n, k in layer_linears("deepseek-v2-lite"):
            yield bf16_case(ctx, m, n, k, f"deepseek-v2-lite {lin}")
        for k in (7168, 16384):   # V3's hidden size and its attention output width
            yield act_quant_case(ctx, m, k, "deepseek-v3")
