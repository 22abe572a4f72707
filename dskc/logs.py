"""Log-once warnings: the one mechanism dskc uses for what a user must see once per process, not once per call
(a fallback taken, tuning data ignored, an interpreter workaround), keyed by logger and key."""
from __future__ import annotations

import functools
import itertools
import logging


def warn_once(log: logging.Logger, key: str, message: str | None = None) -> None:
    """log.warning(message, else key) the first time this (logger, key) is seen in this process; nothing after."""
    if next(_calls(log.name, key)) == 0:
        log.warning(key if message is None else message)


@functools.lru_cache(maxsize=None)
def _calls(logger: str, key: str) -> itertools.count:
    return itertools.count()
