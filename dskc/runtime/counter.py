"""Kernels per step of a compiled Transformer-like model (embed, layers, norm, head, rope), by layer type.

`count_decode(model, batch)` runs one decode step the way dskc.runtime.graphs captures it in a CUDA graph (one
token per sequence at device positions, input checks skipped as under capture) and `count_prefill(model, batch,
seqlen)` one prefill through the model's forward, each under dskc.runtime.recorder: every Triton launch and every
other device op that launches a kernel (non-view aten ops; composites counted as what they run), attributed to the
layer, embedding, final norm or head running it; what runs outside them is the step's own work ("step": e.g. the
per-step MLA state). Layers are typed "moe" (a MoE region inside) or "dense".

On a CPU the kernels run through Triton's interpreter and the aten ops are the CPU's; the counts are what a GPU
launches for the same step, except where the CPU path differs (dtype casts the interpreter needs are counted too).
"""
from __future__ import annotations

import collections
import dataclasses

import torch
import torch.nn as nn

from dskc.runtime import recorder

KINDS = ("triton", "other")


@dataclasses.dataclass
class StepCounts:
    phase: str                        # "decode" | "prefill"
    batch: int
    seqlen: int
    scopes: dict                      # scope -> {"triton": n, "other": n}
    layer_types: dict                 # "layers.i" -> "dense" | "moe"
    detail: dict                      # scope -> Counter of kernel / aten op names

    def total(self) -> dict:
        out = {k: sum(s[k] for s in self.scopes.values()) for k in KINDS}
        return {**out, "total": out["triton"] + out["other"]}

    def per_layer(self, kind: str) -> list[dict]:
        """The counts of every layer of `kind` ("dense" | "moe"), in layer order."""
        return [{**self.scopes[s], "total": sum(self.scopes[s].values())}
                for s, t in self.layer_types.items() if t == kind]

    def by_layer_type(self) -> dict:
        """{"dense" | "moe": the most kernels one layer of that type launches (triton, other, total, layers)}."""
        out = {}
        for kind in ("dense", "moe"):
            layers = self.per_layer(kind)
            if layers:
                worst = max(layers, key=lambda c: c["total"])
                out[kind] = {**worst, "layers": len(layers)}
        return out

    def as_dict(self) -> dict:
        return {"phase": self.phase, "batch": self.batch, "seqlen": self.seqlen, "total": self.total(),
                "by_layer_type": self.by_layer_type(),
                "scopes": {s: dict(c) for s, c in self.scopes.items()}}

    def table(self) -> str:
        """One line per scope kind (step, embed, each layer type, norm, head) and the total."""
        rows = [f"{self.phase} step, batch {self.batch} x {self.seqlen} tokens: kernels (triton + other)"]
        for scope, c in self.scopes.items():
            if scope in self.layer_types:
                continue
            rows.append(f"  {scope:<12} {c['triton']:>4} + {c['other']:>4}")
        for kind, c in self.by_layer_type().items():
            rows.append(f"  {kind + ' layer':<12} {c['triton']:>4} + {c['other']:>4}   (x{c['layers']} layers)")
        t = self.total()
        rows.append(f"  {'total':<12} {t['triton']:>4} + {t['other']:>4} = {t['total']}")
        return "\n".join(rows)


def _model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)      # a CompiledModel holds the Transformer as .module
    if not all(hasattr(inner, a) for a in ("embed", "layers", "norm", "head", "rope")):
        raise ValueError("count_decode / count_prefill need a Transformer-like model (embed, layers, norm, head, "
                         f"rope); got {type(inner).__name__}")
    return inner


def _vocab(m: nn.Module) -> int:
    args = getattr(m, "args", None)
    return args.vocab_size if args is not None else m.embed.weight.shape[0]


def _layer_type(layer: nn.Module) -> str:
    """"moe" when the layer holds a MoE block (a family table row of kind MoE, or its kernel module), else "dense"."""
    from dskc.capture.families import FAMILIES
    from dskc.ir.graph import Op
    rows = [f for f in FAMILIES if f.kind is Op.MOE]
    return "moe" if any(type(m).__name__ == "KernelMoE" or any(f.match.test(m) for f in rows)
                        for m in layer.modules()) else "dense"


def _scopes(m: nn.Module) -> dict:
    scopes = {"embed": m.embed}
    scopes.update({f"layers.{i}": layer for i, layer in enumerate(m.layers)})
    scopes.update(norm=m.norm, head=m.head)
    return scopes


def _count(m: nn.Module, phase: str, batch: int, seqlen: int, run) -> StepCounts:
    scopes = _scopes(m)
    with torch.inference_mode():
        run()                                    # warm-up: lazily built state is not per-step work
        with recorder.record() as rec, rec.scoped(scopes):
            rec.scope = "step"
            run()
    tally = {s: {k: 0 for k in KINDS} for s in ["step", *scopes]}
    detail = {s: collections.Counter() for s in tally}
    for kind, events in (("triton", rec.launches), ("other", rec.ops)):
        for name, scope in events:
            tally[scope][kind] += 1
            detail[scope][name] += 1
    layer_types = {f"layers.{i}": _layer_type(layer) for i, layer in enumerate(m.layers)}
    return StepCounts(phase, batch, seqlen, tally, layer_types, detail)


def count_decode(model: nn.Module, batch: int = 2, position: int = 3, validate: bool = False) -> StepCounts:
    """Kernels of one decode step (dskc.runtime.graphs.decode_step: batch tokens at device positions `position`);
    validate=False skips the input checks, as CUDA-graph capture does."""
    from dskc.runtime.graphs import decode_step

    m = _model(model)
    dev = m.rope.device
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, _vocab(m), (batch, 1), generator=gen).to(dev)
    positions = torch.full((batch,), position, dtype=torch.int32, device=dev)
    return _count(m, "decode", batch, 1, lambda: decode_step(m, tokens, positions, validate=validate))


def count_prefill(model: nn.Module, batch: int = 1, seqlen: int = 8) -> StepCounts:
    """Kernels of one prefill of batch x seqlen tokens at position 0 through the model's forward."""
    m = _model(model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, _vocab(m), (batch, seqlen), generator=gen).to(m.rope.device)
    return count_forward(m, tokens, 0)


def count_forward(model: nn.Module, tokens: torch.Tensor, start_pos: int) -> StepCounts:
    """Kernels of the model's forward on `tokens` at `start_pos` (any model of the Transformer's shape: an eager
    one too); phase "decode" for one token per sequence, else "prefill"."""
    m = _model(model)
    batch, seqlen = tokens.shape
    return _count(m, "decode" if seqlen == 1 else "prefill", batch, seqlen, lambda: m(tokens, start_pos))
