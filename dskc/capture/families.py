"""THE table of model families dskc recognises (house style rule 8): one row per family, as data (see
dskc.capture.family for what a row holds). Both doors read it: `dskc.compile` walks the module tree with it
(dskc.capture.regions) and the torch.compile backend finds the same rows' modules in Dynamo's FX graphs
(dskc.capture.fx). A new family is a new row.

Order matters only among look-alikes: the first matching row wins, so specific rows come before the generic
catch-alls (a MoE with an unknown router, any linear).
"""
from __future__ import annotations

from dskc.capture import family_dskc, family_hf
from dskc.capture.family import Unservable, classify as _classify

FAMILIES = family_dskc.ROWS + family_hf.ROWS + (family_dskc.LINEAR, family_dskc.RMSNORM)


def classify(m):
    """(row, spec or Unservable) of the first row matching module `m`, or None."""
    return _classify(m, FAMILIES)


def kind_of(m) -> tuple[str | None, bool]:
    """(family name, servable) of module `m`; (None, False) when no row matches."""
    got = classify(m)
    if got is None:
        return None, False
    return got[0].name, not isinstance(got[1], Unservable)


def names() -> list[str]:
    return [f.name for f in FAMILIES]
