"""Batched generation with the Transformer's KV cache (greedy or temperature sampling)."""
from __future__ import annotations

import torch

from .model import Transformer


def sample(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax when temperature == 0, else a draw from softmax(logits / temperature) (exponential race:
    argmax(p / E) with E ~ Exp(1), as the reference's sampler)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)
    race = torch.empty(probs.shape, dtype=torch.float32).exponential_(1, generator=gen).to(probs.device)
    return (probs / race).argmax(dim=-1)


def _check(model, prompts, max_new_tokens, temperature) -> None:
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a Transformer, got {type(model).__name__}")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if any(not isinstance(p, (list, tuple)) or not p for p in prompts):
        raise ValueError("every prompt must be a non-empty list of token ids")
    vocab = model.args.vocab_size
    bad = [t for p in prompts for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids must be ints in [0, {vocab}), got {bad[:5]}")
    if len(prompts) > model.args.max_batch_size:
        raise ValueError(f"{len(prompts)} prompts > max_batch_size ({model.args.max_batch_size})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) > max_seq_len "
                         f"({model.args.max_seq_len})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None,
             temperature: float = 0.0, seed: int | None = None) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens; returns the new tokens per prompt.

    A prompt stops at eos_id (which is not included in its output) or after max_new_tokens tokens. Prompts of
    different lengths share one cache: decoding starts at the shortest prompt's end, and longer prompts feed
    their own tokens until theirs ends (the reference's scheme). seed makes temperature sampling repeatable.
    """
    _check(model, prompts, max_new_tokens, temperature)
    device = model.rope.device
    lens = torch.tensor([len(p) for p in prompts])
    total = int(lens.max()) + max_new_tokens
    tokens = torch.full((len(prompts), total), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    tokens = tokens.to(device)
    is_prompt = tokens != -1
    stop_at = (lens + max_new_tokens).to(device)  # first position past each row's budget
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    prev = 0
    for cur in range(int(lens.min()), total):
        logits = model(tokens[:, prev:cur], prev)
        nxt = torch.where(is_prompt[:, cur], tokens[:, cur], sample(logits, temperature, gen))
        tokens[:, cur] = nxt
        new = ~is_prompt[:, cur]
        if eos_id is not None:
            done |= new & (nxt == eos_id)
        done |= cur + 1 >= stop_at
        prev = cur
        if bool(done.all()):
            break
    return _collect(tokens.cpu(), prompts, max_new_tokens, eos_id)


def _collect(tokens: torch.Tensor, prompts, max_new_tokens: int, eos_id: int | None) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        new = tokens[i, len(p):len(p) + max_new_tokens].tolist()
        new = [t for t in new if t != -1]  # positions never reached (all rows finished early)
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id)]
        out.append(new)
    return out
