"""Warnings and log records that decoders emit while reading an input, counted and never shown.

pydicom's messages quote header values (``Invalid value for VR IS: '...'``), which may be patient data, and it
sends each one both to ``warnings`` and to its ``pydicom`` logger. Readers run inside :func:`captured`, which
swallows both and counts them, so only the count can reach a log or the image's metadata.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_LOGGERS = ("pydicom", "PIL")


@dataclass
class Count:
    """Warnings and log records swallowed so far."""

    n: int = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.n += 1
        return False


@contextmanager
def captured() -> Iterator[Count]:
    """Swallow and count the warnings and the decoders' log records raised inside the block."""
    count = Count()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for logger in loggers:
        logger.addFilter(count)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield count
    finally:
        for logger in loggers:
            logger.removeFilter(count)
    count.n += len(caught)
