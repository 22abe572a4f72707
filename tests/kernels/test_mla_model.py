"""The decode kernel swapped into the tiny model's absorbed attention reproduces the model's decode-step logits."""
import torch

from dskc.model import Transformer, get_config, init_random
from dskc.model.mla import MLA
from dskc.ops import mla

PAGE = 16


def paged_absorb(self, q_nope, q_pe, kv, k_pe, start_pos, mask):
    """MLA._absorb for one decode step, with the attention core on mla_decode over a paged copy of the cache."""
    bsz, seqlen = kv.shape[:2]
    assert seqlen == 1 and mask is None
    end = start_pos + seqlen
    wkv_b = self.wkv_b.dense_weight().view(self.n_local_heads, self.nope + self.v_dim, self.kv_lora_rank)
    q_latent = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :self.nope])
    self.kv_cache[:bsz, start_pos:end] = self.kv_norm(kv)
    self.pe_cache[:bsz, start_pos:end] = k_pe.squeeze(2)
    tokens = torch.cat([self.kv_cache[:bsz, :end], self.pe_cache[:bsz, :end]], -1)   # [bsz, end, 576]
    pages = -(-end // PAGE)
    padded = torch.zeros(bsz, pages * PAGE, 576, dtype=tokens.dtype)
    padded[:, :end] = tokens
    order = torch.randperm(bsz * pages, generator=torch.Generator().manual_seed(end))  # pages out of order
    cache = torch.empty(bsz * pages, PAGE, 1, 576, dtype=tokens.dtype)
    cache[order] = padded.view(bsz * pages, PAGE, 1, 576)
    block_table = order.view(bsz, pages).to(torch.int32)
    seqlens = torch.full((bsz,), end, dtype=torch.int32)
    q = torch.cat([q_latent, q_pe], -1).contiguous()
    out_latent, _ = mla.mla_decode(q, cache, block_table, seqlens, self.softmax_scale,
                                   config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, BLOCK_DV=256, num_warps=4,
                                               num_stages=1))
    return torch.einsum("bshc,hdc->bshd", out_latent, wkv_b[:, self.nope:])


def test_decode_step_logits_match_model(monkeypatch):
    args = get_config("tiny")
    assert args.kv_lora_rank == 512 and args.qk_rope_head_dim == 64
    model = init_random(Transformer(args, attn_impl="absorb", dtype=torch.float32), seed=3)
    prompt = torch.randint(0, args.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    nxt = torch.randint(0, args.vocab_size, (2, 1), generator=torch.Generator().manual_seed(2))
    model(prompt, 0)
    saved = [(m.kv_cache.clone(), m.pe_cache.clone()) for m in model.modules() if isinstance(m, MLA)]
    ref = model(nxt, prompt.shape[1])
    for m, (kv, pe) in zip([m for m in model.modules() if isinstance(m, MLA)], saved):
        m.kv_cache.copy_(kv)
        m.pe_cache.copy_(pe)
    calls = []

    def counted(self, *a):
        calls.append(1)
        return paged_absorb(self, *a)
    monkeypatch.setattr(MLA, "_absorb", counted)
    got = model(nxt, prompt.shape[1])
    assert len(calls) == args.n_layers       # every layer's attention core really ran on the kernel
    assert got.shape == ref.shape and not got.isnan().any()
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
