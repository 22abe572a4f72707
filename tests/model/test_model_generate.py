"""generate(): batched prompts of different lengths, greedy vs a cache-free loop, eos, sampling, bad input."""
import pytest
import torch

from dskc.model import generate

PROMPTS = [[5, 17, 300, 2, 999, 41, 7], [8, 1000], [64, 65, 66, 67]]


def _greedy_without_cache(model, prompt, n):
    """Re-run the whole sequence from position 0 for every new token (no cache reuse)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0].argmax()))
    return seq[len(prompt):]


def test_greedy_batch_equals_cache_free_loop(make_tiny):
    model = make_tiny(seed=8)
    out = generate(model, PROMPTS, max_new_tokens=4)
    assert [len(o) for o in out] == [4, 4, 4]
    for prompt, new in zip(PROMPTS, out):
        assert new == _greedy_without_cache(model, prompt, 4)


def test_eos_stops_and_is_not_returned(make_tiny):
    model = make_tiny(seed=8)
    free = generate(model, PROMPTS, max_new_tokens=5)
    eos = free[0][2]  # the third token of prompt 0
    out = generate(model, PROMPTS, max_new_tokens=5, eos_id=eos)
    for f, o in zip(free, out):
        assert o == (f[:f.index(eos)] if eos in f else f)
    assert len(out[0]) == free[0].index(eos) <= 2


def test_sampling_is_seeded(make_tiny):
    model = make_tiny(seed=8)
    a = generate(model, PROMPTS, max_new_tokens=4, temperature=1.0, seed=3)
    b = generate(model, PROMPTS, max_new_tokens=4, temperature=1.0, seed=3)
    c = generate(model, PROMPTS, max_new_tokens=4, temperature=1.0, seed=4)
    assert a == b and a != c
    assert all(0 <= t < 1024 for o in a for t in o)
    cold = generate(model, PROMPTS, max_new_tokens=3, temperature=1e-6, seed=3)
    assert cold == generate(model, PROMPTS, max_new_tokens=3)


def test_bad_input_raises(make_tiny):
    model = make_tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 250], max_new_tokens=7)
    with pytest.raises(ValueError, match="max_batch_size"):
        generate(model, [[1]] * 5, max_new_tokens=1)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[1, 2], []], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1, 2]], max_new_tokens=1, temperature=-1.0)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [[1, 5000]], max_new_tokens=1)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [[3, -1, 4]], max_new_tokens=1)
