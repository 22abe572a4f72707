"""The problems a model poses to each kernel stem (`dskc tune --model NAME`): layer shapes from ModelArgs times a
set of token counts. One small function per stem family; TOKENS is the default set of token counts (decode to
prefill), each of which is its own pow2 shape bucket.
"""
from __future__ import annotations

TOKENS = (1, 16, 64, 256, 1024, 4096)


def linear_shapes(args) -> list[tuple[int, int]]:
    """(N, K) of every distinct dense Linear of the model (attention projections, dense MLP, shared experts)."""
    qk = args.qk_nope_head_dim + args.qk_rope_head_dim
    shapes = [(args.kv_lora_rank + args.qk_rope_head_dim, args.dim),
              (args.n_heads * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank),
              (args.dim, args.n_heads * args.v_head_dim)]
    if args.q_lora_rank:
        shapes += [(args.q_lora_rank, args.dim), (args.n_heads * qk, args.q_lora_rank)]
    else:
        shapes += [(args.n_heads * qk, args.dim)]
    if args.n_dense_layers:
        shapes += [(args.inter_dim, args.dim), (args.dim, args.inter_dim)]
    if args.n_shared_experts:
        shared = args.n_shared_experts * args.moe_inter_dim
        shapes += [(shared, args.dim), (args.dim, shared)]
    return sorted(set(shapes))


def _gemm(args, tokens):
    return [{"M": m, "N": n, "K": k} for n, k in linear_shapes(args) for m in tokens]


def _grouped(args, tokens):
    dtype = "fp8" if args.dtype == "fp8" else "fp16"
    out = []
    for t in tokens:
        rows = t * args.n_activated_experts
        out.append({"E": args.n_routed_experts, "M": rows, "N": args.moe_inter_dim, "K": args.dim, "dtype": dtype,
                    "layout": "contiguous", "epilogue": "swiglu"})
        out.append({"E": args.n_routed_experts, "M": rows, "N": args.dim, "K": args.moe_inter_dim, "dtype": dtype,
                    "layout": "contiguous", "epilogue": "weight"})
    return out


def _route(args, tokens):
    return [{"T": t, "E": args.n_routed_experts, "top_k": args.n_activated_experts, "n_groups": args.n_expert_groups,
             "n_limited_groups": args.n_limited_groups, "sigmoid": int(args.score_func == "sigmoid"),
             "has_bias": int(bool(args.gate_bias) or args.dim == 7168)} for t in tokens]


def _mla(args, tokens):
    return [{"batch": min(t, 128), "s_q": 1, "h_q": args.n_heads, "seqlen": 4096, "page_size": 64,
             "kv_fp8": int(args.dtype == "fp8")} for t in tokens if t <= 256]


def _act_quant(args, tokens):
    widths = sorted({k for _, k in linear_shapes(args)} | {args.moe_inter_dim})
    return [{"M": m, "K": k} for k in widths if k % 128 == 0 for m in tokens]


BY_STEM = {"act_quant": _act_quant, "fp8_gemm_1d2d": _gemm, "bf16_gemm": _gemm, "grouped_gemm": _grouped, "moe_route": _route,
           "mla_decode": _mla}


def model_problems(stem: str, args, tokens=TOKENS) -> list[dict]:
    """The problems `args` (a ModelArgs) poses to `stem`. ValueError for a stem with no mapping here."""
    if stem not in BY_STEM:
        raise ValueError(f"no model-problem mapping for kernel {stem!r} (known: {sorted(BY_STEM)}); pass --problem")
    return BY_STEM[stem](args, tuple(tokens))
