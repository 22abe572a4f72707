"""A region's config table: (launch slot, token-count bucket) -> the config the plan selected, for its kernel module.

Built once from the plan's choices (dskc.select.choose.Choice rows of one region); a forward looks its rows up by
the rows it sees: the first planned bucket at or above them (past the last bucket: the last). The configs are
complete, so the ops launch them as they are (dskc.ops._config: no lookup, no file I/O). A kernel module without
a table (built by hand, outside compile) passes no config and the ops choose for themselves.
"""
from __future__ import annotations

import bisect


class ConfigTable:
    def __init__(self, region: str, choices):
        self.region = region
        self._rows = {}                       # (slot, bucket) -> (config dict, Choice)
        for c in choices:
            self._rows[(c.slot, c.tokens)] = (dict(c.config), c)
        self.buckets = sorted({t for _, t in self._rows})
        if not self.buckets:
            raise ValueError(f"{region}: the plan has no kernels for this region")

    def bucket(self, rows: int) -> int:
        """The planned bucket serving `rows` token rows."""
        i = bisect.bisect_left(self.buckets, rows)
        return self.buckets[min(i, len(self.buckets) - 1)]

    def choice(self, slot: str, rows: int):
        """The plan's Choice for `slot` at `rows`; KeyError naming the slot when the plan has none."""
        try:
            return self._rows[(slot, self.bucket(rows))][1]
        except KeyError:
            raise KeyError(f"{self.region}: the plan has no {slot!r} kernel (slots: "
                           f"{sorted({s for s, _ in self._rows})})") from None

    def config(self, slot: str, rows: int) -> dict:
        """The config of `slot` at `rows` (a shared dict: do not modify)."""
        try:
            return self._rows[(slot, self.bucket(rows))][0]
        except KeyError:
            return self.choice(slot, rows)   # raises the KeyError naming the slot

    def problem(self, slot: str, rows: int) -> dict:
        return dict(self.choice(slot, rows).problem)

    def view(self, slots: dict) -> "SlotView":
        """This table seen by a part of the region: its slot names mapped onto the region's (e.g. an MLP's up
        projection as a linear: {"gemm": "up"})."""
        return SlotView(self, slots)


class SlotView:
    def __init__(self, table: ConfigTable, slots: dict):
        self.table, self.slots = table, slots

    def config(self, slot: str, rows: int) -> dict:
        return self.table.config(self.slots.get(slot, slot), rows)


def config(table: ConfigTable | None, slot: str, rows: int) -> dict | None:
    """table.config(slot, rows), or None (the op's own choice) for a module without a table."""
    return None if table is None else table.config(slot, rows)
