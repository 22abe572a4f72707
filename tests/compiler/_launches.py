"""What a compiled model launches, for the plan-governs-launch and ahead-of-time tests: dskc.runtime.recorder's
`record` (config-table lookups and every Triton launch; aten ops are not needed here) and `steps`, a prefill then
one decode step per batch."""
from __future__ import annotations

import torch

from dskc.runtime import recorder


def record():
    return recorder.record(ops=False)


def steps(model, batches, vocab: int, seed: int = 0):
    """A prefill of each batch's prompt lengths [bsz, seqlen] then one decode step, on the compiled model."""
    gen = torch.Generator().manual_seed(seed)
    outs = []
    with torch.inference_mode():
        for bsz, seqlen in batches:
            tok = torch.randint(0, vocab, (bsz, seqlen), generator=gen)
            outs.append(model(tok, 0))
            outs.append(model(torch.randint(0, vocab, (bsz, 1), generator=gen), seqlen))
    return outs
