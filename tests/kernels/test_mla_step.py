"""The per-step MLA state (templates/triton/mla_step.py): one launch gives every layer's rope rows, cache slots,
sequence lengths and mla_decode's split schedule.

The schedule is checked field by field against FlashMLA's balancing written in plain PyTorch (the 64-op version
dskc ran in every layer before), on ragged batches larger than one chunk of the kernel, more parts than one chunk,
empty sequences and an empty batch; slots and rope rows against paged_slots; the unsplit schedule against the
reference attention with no combine launched.
"""
import math

import pytest
import torch

from dskc.ops import mla
from dskc.runtime import recorder

OVERHEAD = mla.FIXED_OVERHEAD_TILES


def reference_schedule(seqlens: torch.Tensor, num_parts: int, block_n: int):
    """FlashMLA's schedule in plain PyTorch (what dskc.ops.mla.get_mla_metadata computed before mla_step)."""
    n = (seqlens.to(torch.int64).clamp_min(0) + block_n - 1) // block_n
    cost = n + OVERHEAD
    ends = torch.cumsum(cost, 0)
    starts = ends - cost
    total = ends[-1:] if n.numel() else torch.zeros(1, dtype=torch.int64)
    payload = torch.clamp_min((total + num_parts - 1) // num_parts, 1)
    first_part = (starts + OVERHEAD) // payload
    last_part = (starts + OVERHEAD + n - 1) // payload
    splits = torch.where(n > 0, last_part - first_part + 1, torch.zeros_like(n))
    cum = torch.zeros(n.numel() + 1, dtype=torch.int64)
    cum[1:] = torch.cumsum(splits, 0)
    p = torch.arange(num_parts, dtype=torch.int64)
    lo, hi = p * payload, (p + 1) * payload
    last = max(n.numel() - 1, 0)
    begin_b = torch.searchsorted(ends, lo, right=True)
    end_b = torch.searchsorted(ends, hi - 1, right=True).clamp_max(last)
    empty = begin_b >= n.numel()
    bb, eb = begin_b.clamp_max(last), end_b
    if n.numel():
        begin_tile = (lo - starts[bb] - OVERHEAD).clamp(min=0).minimum(n[bb])
        end_tile = (hi - starts[eb] - OVERHEAD).clamp(min=0).minimum(n[eb])
        begin_split = (p - first_part[bb]).clamp_min(0)
    else:
        begin_tile = end_tile = begin_split = torch.zeros_like(p)
    meta = torch.zeros(num_parts, 8, dtype=torch.int64)
    meta[:, 0] = torch.where(empty, 1, bb)
    meta[:, 1] = begin_tile
    meta[:, 2] = torch.where(empty, 0, eb)
    meta[:, 3] = end_tile
    meta[:, 4] = begin_split
    meta[:, 5] = block_n
    return meta.to(torch.int32), cum.to(torch.int32)


@pytest.mark.parametrize("batch,parts,block_n,config", [
    (1, 1, 32, None), (3, 5, 16, None), (9, 13, 32, None),
    (70, 21, 16, {"BLOCK_B": 16, "BLOCK_P": 16, "num_warps": 1}),     # 5 chunks of sequences, 2 of parts
    (0, 3, 32, None),
])
def test_schedule_equals_flashmla_balancing(batch, parts, block_n, config):
    g = torch.Generator().manual_seed(batch + parts)
    seq = torch.randint(0, 400, (batch,), generator=g, dtype=torch.int32)
    if batch > 2:
        seq[1] = 0
    want_meta, want_cum = reference_schedule(seq, parts, block_n)
    md = mla.get_mla_metadata(seq, 16, 1, block_n=block_n, num_parts=parts, config=config)
    assert md.combine
    assert torch.equal(md.tile_scheduler_metadata, want_meta), (md.tile_scheduler_metadata, want_meta)
    assert torch.equal(md.num_splits, want_cum)


def test_unsplit_schedule_is_one_part_per_sequence_and_decodes_without_a_combine():
    from test_mla_decode import make_case, reference

    q, cache, bt, seq = make_case(3, 1, 4, 16, [70, 0, 44], torch.float16, "bf16", seed=3)
    md = mla.get_mla_metadata(seq, 4, 1, block_n=16, split=False)
    n = [(int(s) + 15) // 16 for s in seq]
    assert not md.combine
    assert md.tile_scheduler_metadata.tolist() == [[b, 0, b, n[b], 0, 16, 0, 0] for b in range(3)]
    assert md.num_splits.tolist() == [0, 1, 1, 2]
    with recorder.record(ops=False) as rec:
        out, lse = mla.mla_decode(q, cache, bt, seq, 0.1, metadata=md,
                                  config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "BLOCK_DV": 128,
                                          "num_warps": 4, "num_stages": 1})
    assert [k for k, _ in rec.launches] == ["mla_decode_split_kernel"]
    ref_out, ref_lse = reference(q, cache, bt, seq, 0.1, False, "bf16")
    assert (out[1] == 0).all() and (lse[1] == -math.inf).all()     # the empty sequence, without a combine
    torch.testing.assert_close(out.double(), ref_out, atol=3e-3, rtol=1e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


def _block_table(batch, pages, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(batch * pages + 5, generator=g)[:batch * pages].to(torch.int32).view(batch, pages)


@pytest.mark.parametrize("split", [True, False])
def test_device_positions_give_slots_rope_rows_and_seqlens(split):
    bt = _block_table(4, 3, seed=1)                       # 4 sequences x 3 pages of 16: 48 positions each
    starts = torch.tensor([0, 17, 47, 30], dtype=torch.int32)
    st = mla.mla_step(bt, 16, 4, 1, 8, starts=starts, split=split, num_parts=3,
                      decode_config={"BLOCK_N": 16})
    want_slots = mla.paged_slots(bt, torch.arange(4), starts, 16)
    assert torch.equal(st.slots, want_slots) and torch.equal(st.rope_rows, starts)
    assert torch.equal(st.seqlens, starts + 1)
    want = reference_schedule(starts + 1, 3, 16) if split else None
    if split:
        assert torch.equal(st.metadata.tile_scheduler_metadata, want[0])
        assert torch.equal(st.metadata.num_splits, want[1])
    else:
        assert st.metadata.tile_scheduler_metadata.shape[0] == 4 and not st.metadata.combine


def test_a_prompt_from_a_host_start_and_positions_past_the_table():
    bt = _block_table(2, 2, seed=2)                       # 2 x 2 pages of 16: 32 positions
    st = mla.mla_step(bt, 16, 2, 5, 20, start=9, rope_base=9, split=False)
    pos = torch.arange(9, 14, dtype=torch.int32).repeat(2)
    seq_ids = torch.arange(2).repeat_interleave(5)
    assert torch.equal(st.slots, mla.paged_slots(bt, seq_ids, pos, 16))
    assert torch.equal(st.rope_rows, pos - 9) and st.seqlens.tolist() == [14, 14]
    with pytest.raises(ValueError, match="positions outside"):
        mla.mla_step(bt, 16, 2, 1, 4, starts=torch.tensor([3, 32], dtype=torch.int32))
    # unchecked (as under CUDA-graph capture): a position past the table gets slot -1, never written
    st = mla.mla_step(bt, 16, 2, 1, 4, starts=torch.tensor([3, 32], dtype=torch.int32), validate=False)
    assert st.slots[1] == -1 and st.slots[0] == mla.paged_slots(bt, torch.tensor([0]), torch.tensor([3]), 16)[0]
    with pytest.raises(ValueError, match="does not fit"):
        mla.mla_step(bt, 16, 2, 4, 8, start=30)
    with pytest.raises(TypeError, match="starts must be int32"):
        mla.mla_step(bt, 16, 2, 1, 4, starts=torch.tensor([3, 4]))
