"""Multi-head latent attention of models dskc did not write (transformers' DeepSeek-V2 / V3) on dskc's MLA kernel.

`mla_attend` is the attention core both doors run (the module adapter below, and the torch.compile backend's
`dskc::mla_attend` op): from the rotated query and the latent cache as transformers holds it (the normed latent
[B, 1, L, 512] and the rotated rope key [B, 1, L, 64], past tokens included), wkv_b absorbed (q_nope -> latent space
through w_uk, the latent output -> v through w_uv), `mla_decode` runs the attention (causal over the last S
positions: a prefill, or one decode token with S = 1). The latent pair is packed into the kernel's paged layout
(pages of MLA_PAGE tokens) each call: one copy of the cache per layer and step, the price of reading transformers'
cache instead of dskc's own.

Masks: transformers hands a mask that is None, boolean (True = attend) or additive (0 / -inf). Where it is not the
plain causal mask of the last S queries over L keys (padding, a static cache's unused tail), the attention runs in
PyTorch with that mask (logged once): checking costs one device sync per layer.
"""
from __future__ import annotations

import inspect
import logging

import torch
import torch.nn as nn

from dskc import ops
from dskc.logs import warn_once
from dskc.runtime.table import config as _cfg
from dskc.select.launches import MLA_PAGE

log = logging.getLogger("dskc.runtime")  # where warn_once reports (as before)


def _causal(mask: torch.Tensor | None, s: int, length: int) -> bool:
    """Whether `mask` ([B or 1, 1 or H, S, L], bool or additive) allows exactly keys 0..L-S+i to query i."""
    if mask is None:
        return True
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if allowed.shape[-2:] != (s, length):
        return False
    i = torch.arange(s, device=mask.device)[:, None]
    j = torch.arange(length, device=mask.device)[None, :]
    return bool((allowed == (j <= i + (length - s))).all())


def _attend_torch(q_lat, q_rot, kv, kr, mask, scale):
    """The absorbed attention in fp32 PyTorch, under any mask: q_lat [B, S, H, C], q_rot [B, S, H, R]."""
    scores = (torch.einsum("bshc,blc->bhsl", q_lat.float(), kv[:, 0].float())
              + torch.einsum("bshr,blr->bhsl", q_rot.float(), kr[:, 0].float())) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return torch.einsum("bhsl,blc->bshc", scores.softmax(-1), kv[:, 0].float())


def _paged(kv: torch.Tensor, kr: torch.Tensor, dtype: torch.dtype):
    """(cache [B * pages, MLA_PAGE, 1, C + R], block_table [B, pages]) holding each sequence's L latents."""
    b, _, length, c = kv.shape
    pages = max(1, -(-length // MLA_PAGE))
    cache = torch.zeros(b, pages * MLA_PAGE, c + kr.shape[-1], dtype=dtype, device=kv.device)
    cache[:, :length, :c] = kv[:, 0]
    cache[:, :length, c:] = kr[:, 0]
    table = torch.arange(b * pages, dtype=torch.int32, device=kv.device).view(b, pages)
    return cache.view(b * pages, MLA_PAGE, 1, c + kr.shape[-1]), table


def mla_attend(q: torch.Tensor, kv: torch.Tensor, kr: torch.Tensor, mask: torch.Tensor | None,
               w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float, table=None) -> torch.Tensor:
    """Absorbed MLA: q [B, H, S, nope + R] (rope part rotated), kv [B, 1, L, C] (normed latent), kr [B, 1, L, R]
    (rotated rope key), mask None / [.., S, L]; w_uk [H, nope, C], w_uv [H, v, C] in the kernels' dtype.
    Returns [B, S, H * v] in q's dtype. `table`: config table with slots "decode" / "prefill" (None: the op's)."""
    b, h, s, d = q.shape
    nope, length, kd = w_uk.shape[1], kv.shape[2], w_uk.dtype
    if d - nope != kr.shape[-1] or kv.shape[-1] != w_uk.shape[2]:
        raise ValueError(f"mla_attend: q {tuple(q.shape)}, kv {tuple(kv.shape)}, kr {tuple(kr.shape)} do not match "
                         f"w_uk {tuple(w_uk.shape)}")
    q_lat = torch.einsum("bhsd,hdc->bshc", q[..., :nope].to(kd), w_uk)
    q_rot = q[..., nope:].transpose(1, 2).to(kd)
    if _causal(mask, s, length):
        cache, block_table = _paged(kv, kr, kd)
        seqlens = torch.full((b,), length, dtype=torch.int32, device=q.device)
        qq = torch.cat([q_lat, q_rot], -1).contiguous()
        out, _ = ops.mla_decode(qq, cache, block_table, seqlens, scale, causal=s > 1,
                                config=_cfg(table, "decode" if s == 1 else "prefill", b * s))
    else:
        warn_once(log, "mla-mask", "dskc: an MLA call with a mask other than causal (padding, a static cache) ran its "
                  "attention in PyTorch")
        out = _attend_torch(q_lat, q_rot, kv, kr, mask, scale).to(kd)
    o = torch.einsum("bshc,hdc->bshd", out, w_uv)
    return o.reshape(b, s, -1).to(q.dtype)


# ------------------------------------------------------------------ RoPE as transformers lays it out


def rope_interleave(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb_interleave (DeepSeek-V3, rope_interleave=True)."""
    cos = cos[..., :cos.shape[-1] // 2].unsqueeze(1)
    sin = sin[..., :sin.shape[-1] // 2].unsqueeze(1)
    out = []
    for x in (q, k):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out.append(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))
    return tuple(out)


def rope_half(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (rotate_half)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rot(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def rope_complex(q, k, freqs):
    """transformers' DeepSeek-V2 apply_rotary_emb (complex frequencies [B, S, R/2])."""
    f = freqs.unsqueeze(1).to(q.device)
    out = []
    for x in (q, k):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        out.append(torch.view_as_real(xc * f).flatten(3).type_as(x))
    return tuple(out)


def rotate(layout: str, q, k, position_embeddings):
    if layout == "complex":
        return rope_complex(q, k, position_embeddings)
    cos, sin = position_embeddings
    return (rope_interleave if layout == "interleave" else rope_half)(q, k, cos, sin)


class KernelLatentAttention(nn.Module):
    """transformers' DeepSeek-V2 / V3 attention with its core on `mla_attend`; same call signature and return
    ((output, None)). The projections stay children under their own names (each a region of its own: a kernel
    linear once lowered), the norms run as they are, RoPE as transformers lays it out, and transformers' cache
    (any object with its `update`) is written and read as the original does."""

    def __init__(self, src: nn.Module, node, spec, weights, table=None):
        super().__init__()
        self.node, self.spec, self.table = node, spec, table
        self.layer_idx = getattr(src, "layer_idx", None)
        self.names = {k: v for k, v in spec.names.items() if k != "kv_b"}
        for name in self.names.values():
            setattr(self, name, getattr(src, name))
        self.register_buffer("w_uk", weights.w_uk, persistent=False)
        self.register_buffer("w_uv", weights.w_uv, persistent=False)
        self._signature = inspect.signature(src.forward)

    def _part(self, key):
        return getattr(self, self.names[key])

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        bound = self._signature.bind(hidden_states, *args, **kwargs)
        a = dict(bound.arguments)
        extra = a.pop("kwargs", {}) or {}
        cache = a.get("cache", a.get("past_key_values", extra.get("past_key_values")))
        sp, x = self.spec, hidden_states
        bsz, s = x.shape[:2]
        q = self._part("q")(x) if "q" in self.names else self._part("q_b")(self._part("q_norm")(self._part("q_a")(x)))
        q = q.view(bsz, s, sp.heads, sp.nope + sp.rope_dim).transpose(1, 2)
        q_nope, q_rot = q[..., :sp.nope], q[..., sp.nope:]
        kv, kr = self._part("kv_a")(x).split([sp.kv_lora_rank, sp.rope_dim], dim=-1)
        kv = self._part("kv_norm")(kv).view(bsz, 1, s, sp.kv_lora_rank)
        q_rot, kr = rotate(sp.rope, q_rot, kr.reshape(bsz, 1, s, sp.rope_dim), a.get("position_embeddings"))
        if cache is not None:
            kv, kr = cache.update(kv, kr, self.layer_idx, kwargs=extra)
        out = mla_attend(torch.cat([q_nope, q_rot], -1), kv, kr, a.get("attention_mask"), self.w_uk, self.w_uv,
                         sp.scale, self.table)
        return self._part("o")(out), None
