"""The problems a model poses to each kernel stem (`dskc tune --model NAME`): the problems the compiled model's
kernel modules launch, at a set of token counts, read from the compiler's own selection (dskc.select.launches on
the model's lowered regions), so a tuned export matches what `dskc.compile` looks up. TOKENS is the default set of
token counts (decode to prefill), each of which is its own pow2 shape bucket.
"""
from __future__ import annotations

TOKENS = (1, 16, 64, 256, 1024, 4096)


def _launches(args, tokens, runs_on: str = "gpu") -> list:
    """[(stem, Problem)] of every launch of the model `args` describes, at each token count (meta model: nothing
    is allocated)."""
    from dskc.capture.regions import find_regions
    from dskc.compiler import _check_options, _context
    from dskc.lower.passes import Options, lower
    from dskc.model import Transformer
    from dskc.select.launches import launches

    model = Transformer(args, device="meta")
    graph = lower(find_regions(model), Options())
    _check_options(graph, Options())
    ctx = _context(model, graph, runs_on)
    out = []
    for node in graph.nodes:
        if node.attr("absorbed_into"):
            continue
        for t in tokens:
            out.extend((stem, p) for _, stem, p in launches(node, t, ctx))
    return out


def model_problems(stem: str, args, tokens=TOKENS) -> list[dict]:
    """The distinct problems `args` (a ModelArgs) poses to `stem` at `tokens`, as dicts of the stem's Problem
    fields. ValueError for a stem the model never launches."""
    seen, out = set(), []
    for s, p in _launches(args, tuple(tokens)):
        if s == stem and p not in seen:
            seen.add(p)
            out.append(p.as_dict())
    if not out:
        known = sorted({s for s, _ in _launches(args, tuple(tokens)[:1])})
        raise ValueError(f"the model launches no {stem!r} kernel (it launches {known}); pass --problem")
    return out


def model_stems(args) -> list[str]:
    """The stems the model launches (what `dskc tune --model` tunes when no --kernels are named)."""
    return sorted({s for s, _ in _launches(args, (1,))})
