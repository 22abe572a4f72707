"""MoE suite: the grouped GEMM stem (contiguous and masked layouts) on DeepGEMM's grouped shapes and the
DeepSeek-V3 / V2-Lite expert shapes, and the whole V3 MoE layer (dskc.ops.fused_moe), next to torch._grouped_mm,
torch.compile, DeepGEMM / vLLM when importable and DeepGEMM's published figures."""
from __future__ import annotations

import torch

from dskc.benchmark.cases import Case, Impl
from dskc.benchmark.common import (DEEPGEMM_GROUPED, DEEPGEMM_SRC, E4M3, H800, Ctx, compile_impl, have,
                                   tuned_impl)

V3_ROUTE = dict(top_k=8, n_groups=8, n_limited_groups=4, route_scale=2.5)


def grouped_operands(layout, g, m, n, k, fp8, device):
    """a [g*m, K] (contiguous) or [g, m, K] (masked), b [g, N, K]; fp8 with 1x128 / 128x128 scales, else bf16."""
    rows = (g * m,) if layout == "contiguous" else (g, m)
    a = torch.randn(*rows, k, device=device) * 0.5
    b = torch.randn(g, n, k, device=device) * 0.5
    if not fp8:
        return a.to(torch.bfloat16), None, b.to(torch.bfloat16), None
    sa = torch.rand(*rows, k // 128, device=device) + 0.5
    sb = torch.rand(g, -(-n // 128), k // 128, device=device) + 0.5
    return a.to(E4M3), sa, b.to(E4M3), sb


def _dskc_grouped(layout, g, m, ops, out_dtype, config):
    from dskc.ops import moe

    a, sa, b, sb = ops
    out = torch.empty(*a.shape[:-1], b.shape[1], dtype=out_dtype, device=a.device)
    if layout == "contiguous":
        idx = torch.arange(g, dtype=torch.int32, device=a.device).repeat_interleave(m)
        return lambda: moe.grouped_gemm_contiguous(a, sa, b, sb, idx, out, config=config)
    masked_m = torch.full((g,), m, dtype=torch.int32, device=a.device)
    return lambda: moe.grouped_gemm_masked(a, sa, b, sb, masked_m, m, out, config=config)


def _torch_grouped(layout, g, m, a, b):
    bt = b.transpose(-2, -1)
    if layout == "contiguous":
        offs = torch.arange(1, g + 1, dtype=torch.int32, device=a.device) * m
        return lambda: torch._grouped_mm(a, bt, offs=offs, out_dtype=torch.bfloat16)
    return lambda: torch._grouped_mm(a, bt, out_dtype=torch.bfloat16)


def _deep_gemm_grouped(layout, g, m, ops):
    import deep_gemm

    a, sa, b, sb = ops
    out = torch.empty(*a.shape[:-1], b.shape[1], dtype=torch.bfloat16, device=a.device)
    if layout == "contiguous":
        idx = torch.arange(g, dtype=torch.int32, device=a.device).repeat_interleave(m)
        return lambda: deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), out, idx)
    masked_m = torch.full((g,), m, dtype=torch.int32, device=a.device)
    return lambda: deep_gemm.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), out, masked_m, m)


def _grouped_ref(layout, g, m, ops):
    a, sa, b, sb = ops
    deq_a = (a.double() * sa.double().repeat_interleave(128, -1)).reshape(g, m, -1)
    deq_b = b.double() * sb.double().repeat_interleave(128, -2)[:, :b.shape[1]].repeat_interleave(128, -1)
    ref = torch.einsum("gmk,gnk->gmn", deq_a, deq_b)
    return ref.reshape(g * m, -1) if layout == "contiguous" else ref


def grouped_case(ctx: Ctx, layout, g, m, n, k, label) -> Case:
    shape = {"layout": layout, "E": g, "M_per_group": m, "N": n, "K": k}
    ops = grouped_operands(layout, g, m, n, k, True, ctx.device)
    # fp16 output in the smoke run: the interpreter's bf16 stores are fine, but fp16 keeps the check tight.
    out_dtype = torch.float16 if ctx.smoke else torch.bfloat16
    problem = {"E": g, "M": g * m, "N": n, "K": k, "dtype": "fp8", "layout": layout, "epilogue": "none"}
    impls = [Impl("dskc-default", lambda: _dskc_grouped(layout, g, m, ops, out_dtype, None)),
             tuned_impl(ctx, "grouped_gemm", problem, lambda cfg: _dskc_grouped(layout, g, m, ops, out_dtype, cfg))]
    if not ctx.smoke:
        bops = grouped_operands(layout, g, m, n, k, False, ctx.device)
        impls.append(Impl("dskc-bf16", lambda: _dskc_grouped(layout, g, m, bops, torch.bfloat16, None)))
    a16, b16 = ops[0].to(torch.bfloat16), ops[2].to(torch.bfloat16)
    impls.append(Impl("torch-grouped-mm", lambda: _torch_grouped(layout, g, m, a16, b16), note="bf16 operands"))
    impls.append(compile_impl(ctx, lambda: (_grouped_fn(layout, g, m, a16.device), (a16, b16))))
    if ctx.gpu and have("deep_gemm"):
        impls.append(Impl("deep_gemm", lambda: _deep_gemm_grouped(layout, g, m, ops)))
    key = (layout, g, m, n, k)
    if key in DEEPGEMM_GROUPED:
        impls.append(Impl("published-deepgemm", published=(DEEPGEMM_GROUPED[key], H800, DEEPGEMM_SRC)))
    ref = _grouped_ref(layout, g, m, ops) if ctx.smoke else None
    return Case("moe", f"grouped {layout} {label} E={g} M={m} N={n} K={k}", "grouped_gemm", shape, tuple(impls),
                flops=2.0 * g * m * n * k, bytes=float(g * m * k + g * n * k + 2 * g * m * n),
                ceiling="fp8_scaled_mm", ref=(lambda: ref) if ref is not None else None)


def _grouped_fn(layout, g, m, device):
    offs = torch.arange(1, g + 1, dtype=torch.int32, device=device) * m if layout == "contiguous" else None
    return lambda a, b: torch._grouped_mm(a, b.transpose(-2, -1), offs=offs, out_dtype=torch.bfloat16)


def torch_route(logits, bias, *, top_k, n_groups, n_limited_groups, route_scale):
    """The V3 sigmoid gate on logits in PyTorch: (weights [T, top_k] fp32, ids [T, top_k] int64)."""
    scores = logits.sigmoid()
    sel = (scores + bias).view(logits.shape[0], n_groups, -1)
    keep = sel.topk(2, -1)[0].sum(-1).topk(n_limited_groups, -1)[1]
    drop = torch.ones(sel.shape[:2], dtype=torch.bool, device=logits.device).scatter_(1, keep, False)
    ids = sel.masked_fill(drop[:, :, None], float("-inf")).flatten(1).topk(top_k, -1)[1]
    w = scores.gather(1, ids)
    return w / w.sum(-1, keepdim=True) * route_scale, ids


def torch_moe(x, gate_weight, gate_bias, w13, w2, shared, *, top_k, n_groups, n_limited_groups, route_scale):
    """The V3 MoE block (sigmoid gate) in PyTorch: sort by expert, two torch._grouped_mm, index_add (bf16)."""
    w, ids = torch_route(x.float() @ gate_weight.float().t(), gate_bias, top_k=top_k, n_groups=n_groups,
                         n_limited_groups=n_limited_groups, route_scale=route_scale)
    order = ids.flatten().argsort(stable=True)
    offs = torch.bincount(ids.flatten(), minlength=w13.shape[0]).cumsum(0).to(torch.int32)
    tok = order // top_k
    h = torch._grouped_mm(x[tok], w13.transpose(-2, -1), offs=offs)
    inter = w13.shape[1] // 2
    y = torch._grouped_mm((torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).contiguous(),
                          w2.transpose(-2, -1), offs=offs)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y.float() * w.flatten()[order, None])
    s = shared
    out += (torch.nn.functional.silu(x @ s["w1"].t()) * (x @ s["w3"].t())) @ s["w2"].t()
    return out.to(x.dtype)


def moe_layer(E, D, I, fp8, device, dtype=torch.bfloat16):
    """Random V3-shaped MoE weights: (gate_weight, gate_bias, w13, w13_scale, w2, w2_scale, shared)."""
    def weight(*shape):
        w = torch.randn(*shape, device=device, dtype=dtype) * shape[-1] ** -0.5
        if not fp8:
            return w, None
        lead, n, k = shape[:-2], shape[-2], shape[-1]
        return (w * shape[-1] ** 0.5).to(E4M3), torch.full((*lead, n // 128, k // 128), k ** -0.5, device=device)
    (w13, s13), (w2, s2) = weight(E, 2 * I, D), weight(E, D, I)
    shared = {}
    for name, shape in (("w1", (I, D)), ("w3", (I, D)), ("w2", (D, I))):
        shared[name], scale = weight(*shape)
        if fp8:
            shared[name + "_scale"] = scale
    gate = torch.randn(E, D, device=device) * D ** -0.5
    return gate, torch.randn(E, device=device) * 0.1, w13, s13, w2, s2, shared


def _vllm_moe(x, gate, bias, w13, w2, route):
    from vllm.model_executor.layers.fused_moe import fused_experts

    w, ids = torch_route(x.float() @ gate.float().t(), bias, **route)
    return lambda: fused_experts(x, w13, w2, w, ids.to(torch.int32))


def layer_case(ctx: Ctx, tokens: int, layers: dict, dims: tuple, route: dict) -> Case:
    """The whole MoE layer at `tokens` tokens: dskc fused_moe (fp8 and bf16 weights) vs torch_moe (bf16)."""
    from dskc.ops import moe

    E, D, I = dims
    x = torch.randn(tokens, D, device=ctx.device, dtype=torch.bfloat16)
    gate, bias, w13, s13, w2, s2, shared = layers["bf16"]

    def dskc(fp8, config=None):
        g, bi, a13, b13, a2, b2, sh = layers["fp8" if fp8 else "bf16"]
        xx = x
        if ctx.smoke:  # the interpreter's bf16 tl.dot is wrong (triton #11584): run the same kernels in fp16
            xx, a13, a2, sh = x.half(), a13.half(), a2.half(), {k: v.half() for k, v in sh.items()}
        return lambda: moe.fused_moe(xx, g, bi, a13, b13, a2, b2, shared=sh, score_func="sigmoid", config=config,
                                     **route)
    impls = [Impl("dskc-default", lambda: dskc("fp8" in layers, {"align": 16} if ctx.smoke else None),
                  note="fp16 weights through the interpreter" if ctx.smoke else "fp8 weights")]
    if "fp8" in layers:
        impls.append(Impl("dskc-bf16", lambda: dskc(False)))
    impls.append(Impl("dskc-tuned", skip="fused_moe takes per-stem configs; the grouped GEMM rows carry the "
                                         "tuned comparison"))
    impls.append(Impl("torch-grouped-mm", lambda: (lambda: torch_moe(x, gate, bias, w13, w2, shared, **route)),
                      note="torch_moe: argsort + two torch._grouped_mm + index_add, bf16"))
    impls.append(compile_impl(ctx, lambda: (lambda t: torch_moe(t, gate, bias, w13, w2, shared, **route), (x,))))
    if ctx.gpu and have("vllm"):
        impls.append(Impl("vllm", lambda: _vllm_moe(x, gate, bias, w13, w2, route),
                          note="routed experts only (no shared expert), bf16"))
    ref = torch_moe(x, gate, bias, w13, w2, shared, **route) if ctx.smoke else None
    flops = 2.0 * tokens * (route["top_k"] + 1) * 3 * D * I
    return Case("moe", f"moe layer E={E} D={D} I={I} tokens={tokens}", "fused_moe",
                {"E": E, "D": D, "I": I, "tokens": tokens, "top_k": route["top_k"]}, tuple(impls), flops=flops,
                ceiling="fp8_scaled_mm", ref=(lambda: ref) if ref is not None else None)


def route_case(ctx: Ctx, tokens: int, experts: int, route: dict) -> Case:
    """Group-limited top-k routing on precomputed logits (stem moe_route)."""
    from dskc.ops import moe

    logits = torch.randn(tokens, experts, device=ctx.device)
    bias = torch.randn(experts, device=ctx.device) * 0.1
    impls = [Impl("dskc-default", lambda: (lambda: moe.moe_route(logits, bias, score_func="sigmoid", **route))),
             tuned_impl(ctx, "moe_route", {"T": tokens, "E": experts, "top_k": route["top_k"],
                                           "n_groups": route["n_groups"], "n_limited_groups": route["n_limited_groups"],
                                           "sigmoid": True, "has_bias": True},
                        lambda cfg: (lambda: moe.moe_route(logits, bias, score_func="sigmoid", config=cfg, **route))),
             Impl("torch-bf16", lambda: (lambda: torch_route(logits, bias, **route)), note="fp32 eager PyTorch"),
             compile_impl(ctx, lambda: (lambda lg, b: torch_route(lg, b, **route), (logits, bias)))]
    ref = torch_route(logits.double(), bias.double(), **route)[0] if ctx.smoke else None
    return Case("moe", f"route E={experts} top_k={route['top_k']} tokens={tokens}", "moe_route",
                {"T": tokens, "E": experts, **route}, tuple(impls),
                bytes=float(tokens * experts * 4 + experts * 4 + tokens * route["top_k"] * 8), primary="gbps",
                ref=(lambda: ref) if ref is not None else None)


def cases(ctx: Ctx):
    """Yield the suite's cases; the V3 layer weights (fp8 11 GB + bf16 23 GB) live while its cases run."""
    if ctx.smoke:
        yield grouped_case(ctx, "contiguous", 2, 64, 72, 128, "smoke")
        yield grouped_case(ctx, "masked", 2, 24, 72, 128, "smoke")
        route = dict(top_k=4, n_groups=4, n_limited_groups=2, route_scale=2.5)
        layers = {"bf16": moe_layer(16, 128, 128, False, "cpu")}
        yield layer_case(ctx, 9, layers, (16, 128, 128), route)
        yield route_case(ctx, 9, 16, route)
        return
    for tokens in (128, 4096):
        yield route_case(ctx, tokens, 256, V3_ROUTE)
    for key in sorted(DEEPGEMM_GROUPED):
        yield grouped_case(ctx, *key, "deepgemm-table")
    # Expert GEMMs of one layer at 4096 tokens, balanced routing: rows per expert = tokens * top_k / E.
    for name, (e, top_k, d, inter) in {"deepseek-v3": (256, 8, 7168, 2048),
                                       "deepseek-v2-lite": (64, 6, 2048, 1408)}.items():
        m = 4096 * top_k // e
        yield grouped_case(ctx, "contiguous", e, m, 2 * inter, d, f"{name} w13")
        yield grouped_case(ctx, "contiguous", e, m, d, inter, f"{name} w2")
        yield grouped_case(ctx, "masked", e, 64, 2 * inter, d, f"{name} w13 decode")
    layers = {"fp8": moe_layer(256, 7168, 2048, True, "cuda"), "bf16": moe_layer(256, 7168, 2048, False, "cuda")}
    for tokens in (1, 128, 4096):
        yield layer_case(ctx, tokens, layers, (256, 7168, 2048), V3_ROUTE)
