"""moe_align / moe_gather / moe_combine against plain-PyTorch (stable argsort, bincount) references."""
import pytest
import torch

from dskc import knobs
from dskc.ops import moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not knobs.get().triton_interpret,
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() and not knobs.get().triton_interpret else "cpu"
FP8 = torch.float8_e4m3fn


def routed_ids(T, E, top_k, seed, only=None):
    """[T, top_k] int32 distinct experts per token (as the gate gives); `only` lists the experts allowed."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(E) if only is None else torch.tensor(only)
    rows = [pool[torch.randperm(len(pool), generator=g)[:top_k]] for _ in range(T)]
    return torch.stack(rows).to(torch.int32).to(DEV)


CASES = [  # T, E, top_k, align, only (experts allowed; None = all)
    (1, 8, 2, 16, None),         # a single token
    (37, 8, 3, 16, [1, 5, 6]),   # experts with zero tokens
    (29, 4, 1, 32, [2]),         # every token on one expert
    (40, 6, 6, 8, None),         # top_k = number of experts
    (13, 5, 2, 128, None),       # DeepGEMM's alignment
]


def _check_contiguous(lay, ids, E, align):
    flat = ids.reshape(-1).long().cpu()
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + align - 1) // align * align
    starts = torch.cumsum(padded, 0) - padded
    assert torch.equal(lay.counts.cpu().long(), counts) and torch.equal(lay.starts.cpu().long(), starts)
    order = torch.argsort(flat, stable=True)                      # assignments by expert, token order inside
    rank = torch.arange(len(flat)) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    ref_dest = torch.empty_like(flat)
    ref_dest[order] = starts[flat[order]] + rank
    assert torch.equal(lay.dest.cpu().long(), ref_dest)
    ref_sorted = torch.full((lay.rows,), -1, dtype=torch.long)
    ref_sorted[ref_dest] = torch.arange(len(flat))
    assert torch.equal(lay.sorted_ids.cpu().long(), ref_sorted)
    ref_m = torch.full((lay.rows,), -1, dtype=torch.long)
    ref_m[ref_dest] = flat
    assert torch.equal(lay.m_indices.cpu().long(), ref_m)
    ref_block = torch.full((lay.rows // align,), -1, dtype=torch.long)
    for e in range(E):
        ref_block[starts[e] // align:(starts[e] + padded[e]) // align] = e
    assert torch.equal(lay.block_expert.cpu().long(), ref_block)


@pytest.mark.parametrize("T,E,top_k,align,only", CASES)
def test_align_contiguous(T, E, top_k, align, only):
    ids = routed_ids(T, E, top_k, seed=T + E, only=only)
    lay = moe.moe_align(ids, E, layout="contiguous", align=align)
    assert lay.rows == -(-(T * top_k + E * (align - 1)) // align) * align
    _check_contiguous(lay, ids, E, align)


@pytest.mark.parametrize("config", [None, {"BLOCK_A": 32, "BLOCK_C": 4, "BLOCK_R": 32}])
def test_align_many_chunks(config):
    """240 assignments in 8 chunks of 32 (two scan tiles of 4 chunks): ranks carry across chunks and tiles."""
    ids = routed_ids(40, 6, 6, seed=3) if config else routed_ids(40, 7, 5, seed=4)
    lay = moe.moe_align(ids, ids.shape[1] if config else 7, align=16, config=config)
    _check_contiguous(lay, ids, ids.shape[1] if config else 7, 16)
    masked = moe.moe_align(ids, 7 if not config else 6, layout="masked", config=config)
    assert torch.equal(masked.counts.cpu(), lay.counts.cpu())


@pytest.mark.parametrize("E", [257, 300])
def test_align_past_256_experts_at_the_default_config(E):
    """DeepSeek-V3's 256 routed + 1 shared expert (and more) at the tuning-free config: the rule narrows the
    [block, E] tiles (the base config broke the stem's constraints there and the launch was refused)."""
    ids = routed_ids(11, E, 9, seed=E)
    _check_contiguous(moe.moe_align(ids, E, layout="contiguous", align=16), ids, E, 16)
    masked = moe.moe_align(ids, E, layout="masked")
    assert torch.equal(masked.counts.cpu().long(), torch.bincount(ids.reshape(-1).long().cpu(), minlength=E))


@pytest.mark.parametrize("T,E,top_k,align,only", CASES[:4])
def test_align_masked(T, E, top_k, align, only):
    ids = routed_ids(T, E, top_k, seed=T * E, only=only)
    lay = moe.moe_align(ids, E, layout="masked", config={"BLOCK_A": 32, "BLOCK_C": 4})
    flat = ids.reshape(-1).long().cpu()
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(lay.counts.cpu().long(), counts) and lay.rows == E * T
    seen = [0] * E
    ref_dest = []
    for a in flat.tolist():
        ref_dest.append(a * T + seen[a])
        seen[a] += 1
    assert lay.dest.cpu().tolist() == ref_dest
    ref_sorted = torch.full((E * T,), -1, dtype=torch.long)
    ref_sorted[torch.tensor(ref_dest)] = torch.arange(len(flat))
    assert torch.equal(lay.sorted_ids.cpu().long(), ref_sorted)


def _quant_ref(x):
    g = x.float().view(x.shape[0], -1, 128)
    s = g.abs().amax(-1).clamp(min=1e-4) / 448.0
    return (g / s[..., None]).to(FP8).view(x.shape), s


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_gather(quant, layout):
    T, E, top_k, D = 21, 6, 2, 256
    torch.manual_seed(3)
    x = torch.randn(T, D, device=DEV).half()
    w = torch.rand(T, top_k, device=DEV) + 0.1
    ids = routed_ids(T, E, top_k, seed=5, only=[0, 2, 3, 5])
    lay = moe.moe_align(ids, E, layout=layout, align=16)
    a, sa, rw = moe.moe_gather(x, lay, w, quant=quant)
    src = lay.sorted_ids.cpu().long()
    valid = src >= 0
    tok = src[valid] // top_k
    assert torch.equal(rw.cpu()[valid], w.cpu().reshape(-1)[src[valid]])
    if quant:
        q_ref, s_ref = _quant_ref(x.cpu()[tok])
        torch.testing.assert_close(sa.cpu()[valid], s_ref, rtol=1e-6, atol=0)
        # Same e4m3 codes; the interpreter truncates e4m3 SUBNORMALS (|q| < 2^-6) where torch and the GPU round
        # to nearest, so those may differ by one subnormal step (2^-9).
        torch.testing.assert_close(a.cpu()[valid].float(), q_ref.float(), rtol=0, atol=2.0 ** -9)
        deq = a.cpu()[valid].float().view(-1, 2, 128) * sa.cpu()[valid][..., None]
        rel = (deq.reshape(-1, D) - x.cpu()[tok].float()).norm() / x.cpu()[tok].float().norm()
        assert rel < 0.05
    else:
        assert torch.equal(a.cpu()[valid], x.cpu()[tok])


@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("T,top_k", [(1, 3), (26, 2)])
def test_combine(with_shared, T, top_k):
    E, N = 5, 200
    torch.manual_seed(T)
    ids = routed_ids(T, E, top_k, seed=7)
    lay = moe.moe_align(ids, E, align=8)
    y = torch.randn(lay.rows, N, device=DEV).half()
    shared = torch.randn(T, N, device=DEV).half() if with_shared else None
    out = moe.moe_combine(y, lay, shared=shared, out_dtype=torch.float32)
    ref = y.cpu().double()[lay.dest.cpu().long()].view(T, top_k, N).sum(1)
    if with_shared:
        ref += shared.cpu().double()
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-6, atol=1e-5)


def test_bad_input_raises_before_launch():
    ids = routed_ids(4, 8, 2, seed=1)
    with pytest.raises(TypeError, match="dtype"):
        moe.moe_align(ids.long(), 8)
    with pytest.raises(ValueError, match="layout"):
        moe.moe_align(ids, 8, layout="blocked")
    with pytest.raises(ValueError, match="power of two"):
        moe.moe_align(ids, 8, align=48)
    lay = moe.moe_align(ids, 8, align=16)
    x = torch.randn(4, 192, device=DEV).half()
    with pytest.raises(ValueError, match="D % 128"):
        moe.moe_gather(x, lay, torch.rand(4, 2, device=DEV), quant=True)
    with pytest.raises(ValueError, match="shape"):
        moe.moe_gather(x, lay, torch.rand(4, 3, device=DEV), quant=False)
    with pytest.raises(ValueError, match="tokens"):
        moe.moe_gather(x[:3], lay, torch.rand(3, 2, device=DEV), quant=False)
    with pytest.raises(ValueError, match="rows"):
        moe.moe_combine(torch.randn(lay.rows - 1, 64, device=DEV), lay)
