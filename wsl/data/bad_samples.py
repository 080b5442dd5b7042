"""Bad data is skipped and counted, never fatal: the errors that mean bad data, and the counter."""

from __future__ import annotations

import collections
import logging

from PIL import Image

log = logging.getLogger(__name__)

# Errors of bad data, skipped and counted. Anything else (TypeError, KeyError, ...) is a
# bug in code or config and propagates, as timm's webdataset handler does.
DATA_ERRORS = (OSError, ValueError, SyntaxError, EOFError, UnicodeDecodeError, Image.DecompressionBombError)


class SkipCounter:
    """Counts skipped and dropped samples in one worker; logs the first and every `every`-th skip.

    Used as the webdataset `handler`: returns True (continue) for bad data, re-raises
    errors of code or config. Never sleeps (webdataset's `warn_and_continue` sleeps 0.5 s).
    """

    def __init__(self, every: int = 1000):
        self.every = every
        self.counts: collections.Counter = collections.Counter()

    def skip(self, reason: str, exn: BaseException | None = None, key: str = "") -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n == 1 or n % self.every == 0:
            log.warning("skipped %s sample #%d %s: %s", reason, n, key, exn if exn is not None else "")

    def handler(self, exn: BaseException) -> bool:
        if not isinstance(exn, DATA_ERRORS):
            raise exn
        self.skip("unreadable", exn)
        return True
