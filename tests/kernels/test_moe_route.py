"""moe_route against DeepSeek-V3's Gate written in float64 PyTorch (torch.topk), plus ties and input checks."""
import pytest
import torch

from dskc import knobs
from dskc.ops import moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not knobs.get().triton_interpret,
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() and not knobs.get().triton_interpret else "cpu"


def gate_reference(logits, bias, top_k, n_groups, n_limited, score_func, route_scale):
    """The model's Gate after the projection, in float64 (REFERENCE.md section 1)."""
    logits = logits.double()
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    original = scores
    if bias is not None:
        scores = scores + bias.double()
    if n_groups > 1:
        grouped = scores.view(scores.shape[0], n_groups, -1)
        group_scores = grouped.amax(-1) if bias is None else grouped.topk(2, dim=-1)[0].sum(-1)
        keep = group_scores.topk(n_limited, dim=-1)[1]
        mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        scores = grouped.masked_fill(mask[:, :, None], float("-inf")).flatten(1)
    ids = scores.topk(top_k, dim=-1)[1]
    weights = original.gather(1, ids)
    if score_func == "sigmoid":
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * route_scale, ids


CASES = [  # T, E, top_k, n_groups, n_limited, score_func, bias, route_scale
    (1, 8, 2, 1, 1, "softmax", False, 1.0),
    (37, 16, 4, 4, 2, "sigmoid", True, 2.5),       # group-limited with bias: top-2 group sums
    (5, 8, 8, 1, 1, "sigmoid", True, 1.0),         # top_k = number of experts
    (19, 12, 1, 3, 1, "softmax", False, 16.0),     # E not a power of two, top_k = 1, group max
    (23, 64, 6, 8, 3, "sigmoid", True, 2.5),
    (40, 20, 3, 5, 2, "sigmoid", False, 1.0),      # sigmoid, groups without bias
    (17, 32, 8, 4, 2, "softmax", True, 1.0),       # selection only among the two kept groups
]


@pytest.mark.parametrize("T,E,top_k,n_groups,n_limited,score_func,has_bias,route_scale", CASES)
def test_route_matches_gate(T, E, top_k, n_groups, n_limited, score_func, has_bias, route_scale):
    g = torch.Generator().manual_seed(T * 1000 + E)
    logits = (torch.randn(T, E, generator=g) * 2).to(DEV)
    bias = (torch.randn(E, generator=g) * 0.5).to(DEV) if has_bias else None
    w, ids = moe.moe_route(logits, bias, top_k=top_k, n_groups=n_groups, n_limited_groups=n_limited,
                           score_func=score_func, route_scale=route_scale)
    ref_w, ref_ids = gate_reference(logits.cpu(), None if bias is None else bias.cpu(), top_k, n_groups, n_limited,
                                    score_func, route_scale)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.cpu().long(), ref_ids)
    torch.testing.assert_close(w.cpu().double(), ref_w, atol=1e-5 * route_scale, rtol=1e-5)


@pytest.mark.parametrize("score_func,renorm", [("softmax", True), ("sigmoid", False)])
def test_route_renorm_overrides_the_score_functions_default(score_func, renorm):
    """renorm=True (transformers' norm_topk_prob, Mixtral) renormalises softmax top-k weights; renorm=False keeps a
    sigmoid router's raw scores (DeepSeek-V3 with norm_topk_prob=False). Ids never change."""
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(13, 16, generator=g) * 2).to(DEV)
    bias = (torch.randn(16, generator=g) * 0.5).to(DEV) if score_func == "sigmoid" else None
    kw = dict(top_k=4, n_groups=4, n_limited_groups=2, score_func=score_func, route_scale=1.5)
    w, ids = moe.moe_route(logits, bias, renorm=renorm, **kw)
    _, ref_ids = gate_reference(logits.cpu(), None if bias is None else bias.cpu(), 4, 4, 2, score_func, 1.5)
    raw = logits.cpu().double()
    raw = raw.sigmoid() if score_func == "sigmoid" else raw.softmax(-1)
    ref_w = raw.gather(1, ref_ids)
    if renorm:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert torch.equal(ids.cpu().long(), ref_ids)
    torch.testing.assert_close(w.cpu().double(), ref_w * 1.5, atol=1e-5, rtol=1e-5)


def test_route_groups_limit_choice():
    """With 4 groups and 1 kept, every token's experts come from one group, even when others hold good experts."""
    torch.manual_seed(1)
    logits = torch.randn(29, 16, device=DEV)
    _, ids = moe.moe_route(logits, None, top_k=3, n_groups=4, n_limited_groups=1, score_func="softmax")
    groups = ids.cpu() // 4
    assert (groups == groups[:, :1]).all()
    _, free = moe.moe_route(logits, None, top_k=3, n_groups=1, n_limited_groups=1, score_func="softmax")
    assert not torch.equal(free.cpu(), ids.cpu())  # the limit changed some choices on these inputs


def test_route_ties_take_lowest_index():
    """Exact ties: the lowest expert index first, like a stable descending sort (documented in moe_route.py)."""
    torch.manual_seed(2)
    base = torch.randn(11, 4)
    logits = base.repeat(1, 3).to(DEV)          # every value appears three times: experts j, j+4, j+8
    w, ids = moe.moe_route(logits, None, top_k=5, score_func="sigmoid")
    order = torch.sort(logits.cpu(), dim=-1, descending=True, stable=True)[1][:, :5]
    assert torch.equal(ids.cpu().long(), order)
    assert torch.isfinite(w).all()


def _logits(T=4, E=8):
    return torch.randn(T, E, device=DEV)


@pytest.mark.parametrize("kwargs,logits,match", [
    (dict(top_k=9), _logits(), "top_k"),
    (dict(top_k=0), _logits(), "top_k"),
    (dict(top_k=2, n_groups=3), _logits(), "divide"),
    (dict(top_k=2, n_groups=4, n_limited_groups=5), _logits(), "n_limited_groups"),
    (dict(top_k=5, n_groups=4, n_limited_groups=2), _logits(), "top_k"),
    (dict(top_k=2, score_func="relu"), _logits(), "score_func"),
    (dict(top_k=2), _logits().half(), "dtype"),
    (dict(top_k=2), _logits()[0], "2-D"),
    (dict(top_k=2), _logits(8, 4).t(), "contiguous"),
])
def test_route_rejects_bad_input(kwargs, logits, match):
    with pytest.raises((ValueError, TypeError), match=match):
        moe.moe_route(logits, None, **kwargs)


def test_route_rejects_bad_bias():
    with pytest.raises(ValueError, match="shape"):
        moe.moe_route(_logits(), torch.randn(7, device=DEV), top_k=2)
    with pytest.raises(ValueError, match="2 experts per group"):
        moe.moe_route(_logits(), torch.randn(8, device=DEV), top_k=2, n_groups=8, n_limited_groups=2)
