"""Gate semantics against the direct per-token reference (ds_reference.gate_one) and constructed cases."""
import pytest
import torch

import ds_reference as ref
from dskc.model import ModelArgs
from dskc.model.moe import Gate


def _args(**kw):
    base = dict(dim=16, inter_dim=32, moe_inter_dim=16, n_layers=2, n_heads=2, n_routed_experts=16,
                n_activated_experts=4, n_expert_groups=4, n_limited_groups=2, vocab_size=64, max_seq_len=32)
    base.update(kw)
    return ModelArgs(**base)


CASES = {
    "sigmoid+bias+groups": dict(score_func="sigmoid", gate_bias=True, route_scale=2.5),
    "softmax+groups": dict(score_func="softmax", gate_bias=False, route_scale=16.0),
    "softmax+one-group": dict(score_func="softmax", n_expert_groups=1, n_limited_groups=1, n_activated_experts=6),
    "sigmoid+bias+one-group": dict(score_func="sigmoid", gate_bias=True, n_expert_groups=1, n_limited_groups=1),
}


def _gate(args, seed):
    gen = torch.Generator().manual_seed(seed)
    gate = Gate(args, dtype=torch.float32)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen))
        if gate.bias is not None:
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=gen) * 0.3)
    return gate


@pytest.mark.parametrize("case", sorted(CASES))
def test_gate_matches_reference(case):
    args = _args(**CASES[case])
    gate = _gate(args, seed=1)
    x = torch.randn(53, args.dim, generator=torch.Generator().manual_seed(2))
    weights, indices = gate(x)
    assert weights.shape == indices.shape == (53, args.n_activated_experts)
    sd = {"gate.weight": gate.weight}
    if gate.bias is not None:
        sd["gate.bias"] = gate.bias
    for t, (experts, w) in enumerate(ref.gate(sd, "", args, x.double())):
        assert indices[t].tolist() == experts, f"token {t}"
        torch.testing.assert_close(weights[t].double(), w, atol=1e-6, rtol=1e-6)
    if args.score_func == "sigmoid":
        torch.testing.assert_close(weights.sum(-1), torch.full((53,), args.route_scale))


def _controlled_gate(args, logits):
    """A gate whose logits for x = identity row 0 are exactly `logits` (dim == n_experts)."""
    gate = Gate(args, dtype=torch.float64)
    with torch.no_grad():
        gate.weight.copy_(torch.diag(torch.ones(args.n_routed_experts, dtype=torch.float64)))
        if gate.bias is not None:
            gate.bias.zero_()
    x = logits[None].double()
    return gate, x


LOGITS = torch.tensor([5.0, -1.0, -2.0, -3.0,     # group 0: one strong expert
                       4.0, 3.9, -2.1, -3.1,      # group 1: two strong experts
                       4.5, -1.1, -2.2, -3.2,     # group 2: one strong expert
                       -5.0, -5.1, -5.2, -5.3])   # group 3: weak


def test_group_limiting_changes_the_choice():
    unlimited = _args(gate_bias=False, score_func="sigmoid", n_expert_groups=1, n_limited_groups=1)
    by_max = _args(gate_bias=False, score_func="sigmoid")
    by_top2 = _args(gate_bias=True, score_func="sigmoid")
    chosen = {}
    for name, args in [("unlimited", unlimited), ("max", by_max), ("top2", by_top2)]:
        gate, x = _controlled_gate(args, LOGITS)
        chosen[name] = sorted(gate(x)[1][0].tolist())
    assert chosen["unlimited"] == [0, 4, 5, 8]  # the global top 4 spans groups 0, 1, 2
    assert chosen["max"] == [0, 1, 8, 9]        # group max keeps groups 0 and 2
    assert chosen["top2"] == [0, 1, 4, 5]       # top-2 sum keeps groups 1 and 0


def test_bias_selects_but_does_not_weight():
    args = _args(gate_bias=True, score_func="sigmoid", n_expert_groups=1, n_limited_groups=1, route_scale=1.0)
    gate, x = _controlled_gate(args, LOGITS)
    with torch.no_grad():
        gate.bias[15] = 10.0  # the weakest expert is forced in by its bias alone
    weights, indices = gate(x)
    assert sorted(indices[0].tolist()) == [0, 4, 8, 15]
    scores = LOGITS.double().sigmoid()
    want = scores[indices[0]] / scores[indices[0]].sum()  # unbiased scores, normalised
    torch.testing.assert_close(weights[0], want, atol=1e-6, rtol=1e-6)
    assert weights[0][indices[0].tolist().index(15)] < 0.01


def test_softmax_weights_are_not_normalised():
    args = _args(gate_bias=False, score_func="softmax", n_expert_groups=1, n_limited_groups=1, route_scale=3.0)
    gate, x = _controlled_gate(args, LOGITS)
    weights, indices = gate(x)
    torch.testing.assert_close(weights[0], LOGITS.double().softmax(-1)[indices[0]] * 3.0, atol=1e-6, rtol=1e-6)
    assert weights[0].sum() < 3.0
