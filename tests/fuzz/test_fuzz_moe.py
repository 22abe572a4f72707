"""Property-based tests of dskc.ops' MoE routing and permutation: moe_route, moe_align, moe_gather, moe_combine.
References: DeepSeek-V3's gate in float64 (stable sorts: exact ties to the lowest index), the layouts rebuilt in
plain Python, gathers and sums in the kernels' own order (bit-exact where the arithmetic is the same)."""
import pytest
import torch
from hypothesis import strategies as st

from _fuzz import (DEV, FLOATS, INTERP, SEEDS, TIERS, assert_bits_equal, e4m3_step, fault_or_none, generator,
                   needs_kernels, quant_1x128, run, sizes, sometimes)
from dskc.ops import moe
from dskc.templates.triton import moe_permute

pytestmark = [needs_kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


# ---------------------------------------------------------------- moe_route

@st.composite
def route_cases(draw, max_t: int = 40):
    fault = draw(fault_or_none(["top_k 0", "top_k > E", "groups", "limited", "bias shape", "logits dtype",
                                "score_func", "logits 1-D"], tenths=2))
    e = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64, 256]))
    n_groups = draw(st.sampled_from([d for d in range(1, e + 1) if e % d == 0]))
    n_limited = draw(st.integers(1, n_groups))
    kmax = n_limited * (e // n_groups)
    top_k = draw(st.one_of(st.just(1), st.just(kmax), st.integers(1, kmax)))
    t = draw(sizes(lo=0, hi=max_t))
    has_bias = draw(st.booleans())
    score_func = draw(st.sampled_from(["softmax", "sigmoid"]))
    mode = draw(st.sampled_from(["normal", "normal", "ties", "huge", "non-finite tokens"]))
    g = generator(draw(SEEDS))
    if mode == "ties":   # few distinct values: exact ties between experts
        logits = torch.randint(-3, 4, (t, e), generator=g).float() / 4
        bias = torch.randint(-2, 3, (e,), generator=g).float() / 8
    else:
        logits = torch.randn(t, e, generator=g) * (30.0 if mode == "huge" else 2.0)
        bias = torch.randn(e, generator=g) * 0.3
    if mode == "non-finite tokens" and t:
        bad = torch.randint(0, t, (max(1, t // 4),), generator=g)
        kind = torch.tensor([float("nan"), float("inf"), float("-inf")])
        cols = torch.rand(len(bad), e, generator=g) < 0.5
        logits[bad] = torch.where(cols, kind[torch.randint(0, 3, (len(bad), 1), generator=g)], logits[bad])
        if draw(sometimes(3)):
            logits[bad[0]] = float("nan")                         # a whole row of NaN
    kw = dict(top_k=top_k, n_groups=n_groups, n_limited_groups=n_limited, score_func=score_func,
              route_scale=draw(st.sampled_from([1.0, 2.5, 16.0])))
    expect = ValueError if has_bias and n_groups > 1 and e // n_groups < 2 else None
    if fault is not None:
        expect = TypeError if fault in ("logits dtype", "bias shape") else ValueError
        if fault == "top_k 0":
            kw["top_k"] = 0
        elif fault == "top_k > E":
            kw["top_k"] = e + 1
        elif fault == "groups":
            kw["n_groups"] = e + 1
        elif fault == "limited":
            kw["n_limited_groups"] = n_groups + 1
        elif fault == "bias shape":
            has_bias, bias, expect = True, torch.randn(e + 1), ValueError
        elif fault == "logits dtype":
            logits = logits.double()
        elif fault == "score_func":
            kw["score_func"] = "relu"
        else:
            logits = logits.reshape(-1)
    return logits.to(DEV), (bias.to(DEV) if has_bias else None), kw, expect


def gate64(logits, bias, top_k, n_groups, n_limited_groups, score_func, route_scale):
    """Float64 gate: (selection scores, scores, group scores, reference kept groups, reference ids); ties to the
    lowest index (stable sorts)."""
    x = logits.double()
    scores = x.sigmoid() if score_func == "sigmoid" else x.softmax(-1)
    sel = scores + (bias.double() if bias is not None else 0)
    grouped = sel.view(sel.shape[0], n_groups, -1)
    gscore = grouped.amax(-1) if bias is None or n_groups == 1 else grouped.topk(2, -1)[0].sum(-1)
    keep = torch.sort(gscore, dim=-1, descending=True, stable=True)[1][:, :n_limited_groups]
    drop = torch.ones_like(gscore, dtype=torch.bool).scatter_(1, keep, False)
    limited = grouped.masked_fill(drop[:, :, None], float("-inf")).flatten(1)
    ids = torch.sort(limited, dim=-1, descending=True, stable=True)[1][:, :top_k]
    return sel, scores, gscore, keep, ids


def check_moe_route(fz, case):
    logits, bias, kw, expect = case
    if expect is not None:
        with fz.refused(expect):
            moe.moe_route(logits, bias, **kw)
        return
    fz.in_contract()
    w, ids = moe.moe_route(logits, bias, **kw)
    t, e = logits.shape
    k = kw["top_k"]
    assert w.shape == (t, k) and ids.shape == (t, k) and w.dtype == torch.float32 and ids.dtype == torch.int32
    ids, w, logits = ids.cpu().long(), w.cpu().double(), logits.cpu()
    assert bool(((ids >= 0) & (ids < e)).all()), "ids outside [0, E)"
    assert bool((ids.sort(-1)[0].diff(dim=-1) != 0).all()), "ids repeated within a token"
    gs = e // kw["n_groups"]
    assert bool(((ids // gs).sort(-1)[0].diff(dim=-1) != 0).sum(-1).le(kw["n_limited_groups"] - 1).all()), \
        "picks from more than n_limited_groups groups"
    clean = torch.isfinite(logits).all(-1)
    if not bool(clean.any()):
        return
    bias = None if bias is None else bias.cpu()
    sel, scores, gscore, keep, ref_ids = gate64(logits[clean], bias, **kw)
    mine = ids[clean]
    ref_w = scores.gather(1, mine)
    if kw["score_func"] == "sigmoid":
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    torch.testing.assert_close(w[clean], ref_w * kw["route_scale"], rtol=1e-5, atol=1e-6 * kw["route_scale"])
    # the kept groups: the kernel's may differ from the reference's only between near-tied group scores
    floor = gscore.gather(1, keep).amin(-1, keepdim=True)
    assert bool((gscore.gather(1, mine // gs) >= floor - 1e-6).all()), "a pick from a group that is not kept"
    same_groups = (torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, mine // gs, True)
                   <= torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, keep, True)).all(-1)
    picked, best = sel.gather(1, mine), sel.gather(1, ref_ids)
    assert bool((((picked - best).abs() <= 1e-6).all(-1) | ~same_groups).all()), \
        "a pick is worse than the reference's (beyond rounding)"
    _check_exact_ties(logits[clean], bias, mine, gs)


def _check_exact_ties(logits, bias, ids, gs):
    """Experts of one group with bit-identical logits (and bias): the lower index is picked, and first."""
    t, e = logits.shape
    same = logits[:, :, None] == logits[:, None, :]
    if bias is not None:
        same &= (bias[:, None] == bias[None, :])[None]
    col = torch.arange(e)
    same &= ((col[:, None] // gs == col[None, :] // gs) & (col[None, :] < col[:, None]))[None]   # [t, i, j<i]
    pos = torch.full((t, e), e + 1).scatter_(1, ids, torch.arange(ids.shape[1]).expand_as(ids).contiguous())
    picked = pos <= e
    bad = same & picked[:, :, None] & ~(pos[:, None, :] < pos[:, :, None])
    assert not bool(bad.any()), f"exact tie not given to the lower index: {bad.nonzero()[:3].tolist()}"


@pytest.mark.parametrize("examples", TIERS)
def test_moe_route(examples, fuzz):
    run(check_moe_route, examples, fuzz, case=route_cases())


# ---------------------------------------------------------------- moe_align

def _config(draw, e):
    """A moe_permute config within its SPACE and CONSTRAINTS (None: the default)."""
    if not draw(st.booleans()):
        return None
    w = draw(st.sampled_from(moe_permute.SPACE["num_warps"]))
    fit = [b for b in (32, 64, 128, 256) if b * max(e, 16) <= 2048 * w]
    cfg = dict(moe_permute.DEFAULTS["sm90"], num_warps=w)
    for name in ("BLOCK_A", "BLOCK_C", "BLOCK_R"):
        options = [b for b in moe_permute.SPACE[name] if b * max(e, 16) <= 2048 * w]
        cfg[name] = draw(st.sampled_from(options or fit or [32]))
    cfg["GATHER_ROWS"] = draw(st.sampled_from(moe_permute.SPACE["GATHER_ROWS"]))
    cfg["COMBINE_T"] = draw(st.sampled_from(moe_permute.SPACE["COMBINE_T"]))
    cfg["BLOCK_N"] = draw(st.sampled_from(moe_permute.SPACE["BLOCK_N"]))
    return cfg


@st.composite
def assignments(draw, max_t=30, max_e=20):
    """(ids [T, k] int32, E): distinct experts per token, all tokens on one expert, empty experts, or repeats."""
    e = draw(st.one_of(st.sampled_from([1, 2, 3, 8, 16]), st.integers(1, max_e)))
    t = draw(sizes(lo=0, hi=max_t))
    k = draw(st.integers(1, min(e, 4)))
    g = generator(draw(SEEDS))
    mode = draw(st.sampled_from(["distinct", "one expert", "empty experts", "repeats"]))
    if mode == "repeats":
        ids = torch.randint(0, e, (t, k), generator=g)
    else:
        pool = e if mode != "empty experts" else max(k, e // 3)
        ids = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k)
        if mode == "one expert" and t:
            ids = torch.where(ids == 0, ids[:, :1], ids)
            ids[:, 0] = 0
        ids = ids.long()
    return ids.to(torch.int32), e


def align_reference(ids, e, layout, align, max_m):
    """The layout moe_align documents, in plain Python (ids outside [0, E) dropped)."""
    flat = ids.flatten().long().tolist()
    t = ids.shape[0]
    counts = [0] * e
    for x in flat:
        if 0 <= x < e:
            counts[x] += 1
    masked = layout == "masked"
    max_m = max(t, 1) if max_m is None else max_m
    padded = [-(-c // align) * align for c in counts]
    starts = [i * max_m for i in range(e)] if masked else [sum(padded[:i]) for i in range(e)]
    rows = e * max_m if masked else moe_permute.row_space(len(flat), e, align)
    dest, sorted_ids, rank = [], [-1] * rows, [0] * e
    for a, x in enumerate(flat):
        if not 0 <= x < e or (masked and rank[x] >= max_m):
            dest.append(-1)
            if 0 <= x < e:
                rank[x] += 1
            continue
        dest.append(starts[x] + rank[x])
        sorted_ids[starts[x] + rank[x]] = a
        rank[x] += 1
    m_idx = [-1] * rows
    for x in range(e):
        for r in range(min(counts[x], max_m) if masked else counts[x]):
            m_idx[starts[x] + r] = x
    block = None if masked else [m_idx[b * align] for b in range(rows // align)]
    return dict(dest=dest, sorted_ids=sorted_ids, m_indices=m_idx, block_expert=block, counts=counts, starts=starts)


@st.composite
def align_cases(draw):
    fault = draw(fault_or_none(["ids outside", "ids outside, unchecked", "ids outside, unchecked", "ids dtype",
                                "ids 1-D", "align 3", "layout", "no experts", "max_m 0"], tenths=3))
    ids, e = draw(assignments())
    layout = draw(st.sampled_from(["contiguous", "masked"]))
    align = draw(st.sampled_from([a for a in (1, 2, 4, 8, 16, 32, 64, 128) if a * e <= 512]))
    max_m = draw(st.one_of(st.none(), st.integers(1, ids.shape[0] + 2))) if layout == "masked" else None
    config = _config(draw, e)
    kw = dict(layout=layout, align=align, max_m=max_m, config=config)
    expect = ValueError
    if fault in ("ids outside", "ids outside, unchecked"):
        g = generator(draw(SEEDS))
        if ids.numel():
            bad = torch.tensor([-1, e, e + 7, 2 ** 30, -(2 ** 31)], dtype=torch.int32)
            pos = torch.rand(ids.shape, generator=g) < 0.3
            pos.view(-1)[0] = True
            ids = torch.where(pos, bad[torch.randint(0, 5, ids.shape, generator=g)], ids)
        else:
            expect = None
        expect = (ValueError, "expert ids") if expect else None
        if fault.endswith("unchecked"):
            kw["validate"], expect = False, None
    elif fault == "ids dtype":
        ids, expect = ids.long(), TypeError
    elif fault == "ids 1-D":
        ids = ids.flatten()
    elif fault == "align 3":
        kw["align"] = 3
    elif fault == "layout":
        kw["layout"] = "sorted"
    elif fault == "no experts":
        e = 0
    elif fault == "max_m 0":
        if layout == "masked":
            kw["max_m"] = 0
        else:
            expect = None
    else:
        expect = None
    return ids.to(DEV), e, kw, expect


def check_moe_align(fz, case):
    ids, e, kw, expect = case
    if expect is not None:
        with fz.refused(expect):
            moe.moe_align(ids, e, **kw)
        return
    (fz.confined if kw.get("validate") is False else fz.in_contract)()
    lay = moe.moe_align(ids, e, **kw)
    ref = align_reference(ids.cpu(), e, kw["layout"], kw["align"], kw["max_m"])
    for name, want in ref.items():
        got = getattr(lay, name)
        if want is None:
            assert got is None, name
            continue
        assert got.cpu().tolist() == want, f"{name}: {got.cpu().tolist()[:16]} vs {want[:16]}"


@pytest.mark.parametrize("examples", TIERS)
def test_moe_align(examples, fuzz):
    run(check_moe_align, examples, fuzz, case=align_cases())


# ---------------------------------------------------------------- moe_gather / moe_combine

@st.composite
def layouts(draw, max_t=10, max_e=6):
    """A small layout from moe_align and its routing weights (rows kept few: the interpreter runs every program,
    and a program costs milliseconds there whatever its size)."""
    ids, e = draw(assignments(max_t=max_t, max_e=max_e))
    layout = draw(st.sampled_from(["contiguous", "masked"]))
    align = draw(st.sampled_from([1, 2, 4, 8]))
    lay = moe.moe_align(ids.to(DEV), e, layout=layout, align=align)
    g = generator(draw(SEEDS))
    weights = torch.rand(ids.shape, generator=g).to(DEV)
    cfg = _config(draw, e)
    if cfg is not None and draw(sometimes(8)):
        cfg.update(GATHER_ROWS=8, COMBINE_T=8)     # the largest tiles: fewer interpreted programs
    return lay, weights, cfg


@st.composite
def gather_cases(draw):
    fault = draw(fault_or_none(["D % 128", "weights shape", "other tokens", "x dtype", "x 3-D"], tenths=2))
    lay, weights, cfg = draw(layouts())
    t = lay.dest.shape[0] // lay.top_k
    quant = draw(st.booleans())
    d = 128 * draw(st.integers(1, 2)) if quant else draw(sizes(lo=1, hi=300))
    dtype = draw(st.sampled_from(FLOATS))
    g = generator(draw(SEEDS))
    x = (torch.randn(t, d, generator=g) * draw(st.sampled_from([1e-6, 1.0, 300.0]))).to(dtype)
    if draw(sometimes(2)) and x.numel():
        x.view(-1)[torch.randint(0, x.numel(), (2,), generator=g)] = float("nan")
    expect = None
    if fault == "D % 128":
        x, quant, expect = torch.randn(t, 200, generator=g).to(dtype), True, ValueError
    elif fault == "weights shape":
        weights, expect = torch.rand(t + 1, lay.top_k, device=weights.device), ValueError
    elif fault == "other tokens":
        x, weights, expect = torch.randn(t + 1, d).to(dtype), torch.rand(t + 1, lay.top_k, device=weights.device), \
            ValueError
    elif fault == "x dtype":
        x, expect = torch.randint(0, 3, (t, d), dtype=torch.int32), TypeError
    elif fault == "x 3-D":
        x, expect = x[None], ValueError
    return x.to(DEV), lay, weights, quant, cfg, expect


def check_moe_gather(fz, case):
    x, lay, weights, quant, cfg, expect = case
    if expect is not None:
        with fz.refused(expect):
            moe.moe_gather(x, lay, weights, quant=quant, config=cfg)
        return
    fz.in_contract()
    a, sa, rw = moe.moe_gather(x, lay, weights, quant=quant, config=cfg)
    src = lay.sorted_ids.cpu().long()
    rows = (src >= 0).nonzero().flatten()
    tok = src[rows] // lay.top_k
    assert_bits_equal(rw.cpu()[rows], weights.cpu().flatten()[src[rows]], "row weights")
    if not quant:
        assert a.dtype == x.dtype
        assert_bits_equal(a.cpu()[rows], x.cpu()[tok], "gathered rows")
        return
    ref_q, ref_s = quant_1x128(x.cpu().float()[tok])
    s = sa.cpu()[rows]
    assert bool(((s - ref_s).abs() <= 2 * ref_s * 2.0 ** -23).all()), "scales beyond 2 ulp of amax / 448"
    got, want = a.cpu()[rows].double(), ref_q.double()
    assert torch.equal(got.isnan(), want.isnan()), "NaN must appear exactly where x is not finite"
    ok = (got - want).abs() <= e4m3_step(want) * 1.01
    assert bool((ok | want.isnan()).all()), "e4m3 values more than one step from the recipe's"


@pytest.mark.parametrize("examples", TIERS)
def test_moe_gather(examples, fuzz):
    run(check_moe_gather, examples, fuzz, case=gather_cases())


@st.composite
def combine_cases(draw):
    fault = draw(fault_or_none(["rows", "shared shape", "y dtype"], tenths=2))
    lay, _, cfg = draw(layouts())
    t = lay.dest.shape[0] // lay.top_k
    n = draw(sizes(lo=1, hi=300))
    dtype, out_dtype = draw(st.sampled_from(FLOATS)), draw(st.sampled_from([None, *FLOATS]))
    g = generator(draw(SEEDS))
    y = torch.randn(lay.rows, n, generator=g).to(dtype)
    y[lay.sorted_ids.cpu() < 0] = float("nan")       # padding rows: never read
    if lay.kind == "masked" and draw(st.booleans()):
        y = y.view(lay.n_experts, lay.max_m, n)
    shared = torch.randn(t, n, generator=g).to(draw(st.sampled_from(FLOATS))) if draw(st.booleans()) else None
    expect = None
    if fault == "rows":
        y, expect = torch.randn(lay.rows + 1, n).to(dtype), ValueError
    elif fault == "shared shape":
        shared, expect = torch.randn(t + 1, n), ValueError
    elif fault == "y dtype":
        y, expect = y.double(), TypeError
    return y.to(DEV), lay, None if shared is None else shared.to(DEV), out_dtype, cfg, expect


def check_moe_combine(fz, case):
    y, lay, shared, out_dtype, cfg, expect = case
    if expect is not None:
        with fz.refused(expect):
            moe.moe_combine(y, lay, shared=shared, out_dtype=out_dtype, config=cfg)
        return
    fz.in_contract()
    out = moe.moe_combine(y, lay, shared=shared, out_dtype=out_dtype, config=cfg)
    y2 = y.cpu().reshape(-1, y.shape[-1]).float()
    dest = lay.dest.cpu().long().view(-1, lay.top_k)
    acc = torch.zeros(dest.shape[0], y2.shape[1])
    for j in range(lay.top_k):                      # the kernel's order: j = 0, 1, ..., then the shared expert
        d = dest[:, j]
        acc += torch.where((d >= 0)[:, None], y2[d.clamp(min=0)], 0.0)
    if shared is not None:
        acc += shared.cpu().float()
    want_dtype = out_dtype or y.dtype
    assert out.dtype == want_dtype and bool(torch.isfinite(out).all()), "a padding row leaked into the sum"
    if want_dtype == torch.bfloat16 and INTERP:     # the interpreter's fp32 -> bf16 cast truncates
        ulp = torch.exp2(torch.floor(torch.log2(acc.abs().clamp(min=2.0 ** -126))) - 7)
        assert bool(((out.cpu().double() - acc.double()).abs() <= ulp).all())
    else:
        assert_bits_equal(out.cpu(), acc.to(want_dtype), "combined rows")


@pytest.mark.parametrize("examples", TIERS)
def test_moe_combine(examples, fuzz):
    run(check_moe_combine, examples, fuzz, case=combine_cases())
