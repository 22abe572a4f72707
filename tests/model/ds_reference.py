"""A direct float64 re-statement of DeepSeek-V3's inference math, for the model tests.

Written independently of dskc.model, straight from the reference's formulas: complex-number RoPE with YaRN,
explicit per-head K/V (no cache, whole sequence at once), a per-token gate loop with explicit sorting.
Input: a state_dict with our (= DeepSeek's) names and a ModelArgs. Where YaRN applies is the config's `yarn` field
(the reference's own rule, max_seq_len > original_seq_len, is what the named configs state); `rope_attn_factor`
(transformers' cos/sin attention factor, 1 in the reference) scales the rotation's magnitude.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dense(sd, name):
    """float64 weight of Linear `name` (dequantized per 128x128 block when a .scale is present)."""
    w = sd[name + ".weight"].to(torch.float64)
    scale = sd.get(name + ".scale")
    if scale is None:
        return w
    s = scale.to(torch.float64)
    rows = torch.arange(w.shape[0]) // 128
    cols = torch.arange(w.shape[1]) // 128
    return w * s[rows][:, cols]


def rmsnorm(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.to(torch.float64)


def freqs_cis(args):
    """Complex [max_seq_len, rope/2] table by the reference's formulas (float64)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    magnitude = 1.0
    if args.yarn:
        magnitude = args.rope_attn_factor

        def corr(rot):
            return dim * math.log(args.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(math.floor(corr(args.beta_fast)), 0), min(math.ceil(corr(args.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    t = torch.arange(args.max_seq_len, dtype=torch.float64)
    return torch.polar(torch.full((args.max_seq_len, dim // 2), magnitude, dtype=torch.float64), torch.outer(t, freqs))


def rope(x, fc):
    """x [b, s, h, d] float64, fc [s, d/2] complex: rotate interleaved pairs."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * fc[None, :, None, :]).flatten(-2)


def mla(sd, p, args, x, fc):
    b, s, _ = x.shape
    h, nope, r, vd = args.n_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
    if args.q_lora_rank:
        q = rmsnorm(x @ dense(sd, p + "wq_a").T, sd[p + "q_norm.weight"]) @ dense(sd, p + "wq_b").T
    else:
        q = x @ dense(sd, p + "wq").T
    q = q.view(b, s, h, nope + r)
    q = torch.cat([q[..., :nope], rope(q[..., nope:], fc)], -1)
    kv = x @ dense(sd, p + "wkv_a").T
    latent, k_pe = kv[..., :args.kv_lora_rank], kv[..., args.kv_lora_rank:]
    k_pe = rope(k_pe[:, :, None, :], fc)
    kvb = (rmsnorm(latent, sd[p + "kv_norm.weight"]) @ dense(sd, p + "wkv_b").T).view(b, s, h, nope + vd)
    k = torch.cat([kvb[..., :nope], k_pe.expand(b, s, h, r)], -1)
    v = kvb[..., nope:]
    scale = (nope + r) ** -0.5
    if args.yarn and args.rope_factor > 1:
        scale *= (0.1 * args.mscale * math.log(args.rope_factor) + 1.0) ** 2
    scores = torch.einsum("bshd,bthd->bhst", q, k) * scale
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhst,bthd->bshd", probs, v).reshape(b, s, h * vd)
    return out @ dense(sd, p + "wo").T


def swiglu(sd, p, x):
    return (F.silu(x @ dense(sd, p + "w1").T) * (x @ dense(sd, p + "w3").T)) @ dense(sd, p + "w2").T


def gate_one(args, scores, bias):
    """Route one token: scores [E] float64 (post softmax/sigmoid), bias [E] or None -> (experts, weights)."""
    sel = scores if bias is None else scores + bias
    per = args.n_routed_experts // args.n_expert_groups
    eligible = list(range(args.n_routed_experts))
    if args.n_expert_groups > 1:
        def group_score(g):
            vals = sorted(sel[g * per:(g + 1) * per].tolist(), reverse=True)
            return vals[0] if bias is None else vals[0] + vals[1]
        groups = sorted(range(args.n_expert_groups), key=lambda g: (-group_score(g), g))[:args.n_limited_groups]
        eligible = [e for e in eligible if e // per in groups]
    chosen = sorted(eligible, key=lambda e: (-float(sel[e]), e))[:args.n_activated_experts]
    w = scores[chosen]
    if args.score_func == "sigmoid":
        w = w / w.sum()
    return chosen, w * args.route_scale


def gate(sd, p, args, x):
    """x [T, dim] float64 -> list of (experts, weights) per token."""
    logits = x @ sd[p + "gate.weight"].to(torch.float64).T
    scores = logits.softmax(-1) if args.score_func == "softmax" else logits.sigmoid()
    bias = sd.get(p + "gate.bias")
    bias = None if bias is None else bias.to(torch.float64)
    return [gate_one(args, scores[t], bias) for t in range(x.shape[0])]


def moe(sd, p, args, x):
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    y = torch.zeros_like(x)
    for t, (experts, weights) in enumerate(gate(sd, p, args, x)):
        for e, w in zip(experts, weights):
            y[t] += w * swiglu(sd, f"{p}experts.{e}.", x[t:t + 1])[0]
    if args.n_shared_experts:
        y = y + swiglu(sd, p + "shared_experts.", x)
    return y.view(shape)


def forward(sd, args, tokens):
    """float64 logits [b, vocab] of the last position for tokens [b, s] starting at position 0."""
    fc = freqs_cis(args)[:tokens.shape[1]]
    h = sd["embed.weight"].to(torch.float64)[tokens]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        h = h + mla(sd, p + "attn.", args, rmsnorm(h, sd[p + "attn_norm.weight"]), fc)
        x = rmsnorm(h, sd[p + "ffn_norm.weight"])
        h = h + (swiglu(sd, p + "ffn.", x) if i < args.n_dense_layers else moe(sd, p + "ffn.", args, x))
    return rmsnorm(h, sd["norm.weight"])[:, -1] @ sd["head.weight"].to(torch.float64).T
