"""Bad data met while streaming: named where it was, reported once, counted for the stage.

A stage hands one ``SkipLog`` to every stream it reads (``StageContext.skips``) and reports its
totals when it ends. Training resamples shards, so the same bad sample or truncated shard comes
back again and again, in any DataLoader worker: each is logged as a warning the first time
(later times at debug level) and every time counted. Counts and the names already reported
live in shared memory, so worker processes (forked, or spawned with the dataset) add to the
totals the stage's own process reads.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing

log = logging.getLogger(__name__)

_SAMPLES, _DISTINCT_SAMPLES, _SHARDS, _NAMES = range(4)  # slots of the shared counters


class SkipLog:
    """Skipped samples and bad shards of one stage (or of one tool run).

    ``capacity`` names are remembered as 64-bit digests; past it, every further bad item is
    reported as if new, so nothing is ever left unreported.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._lock = multiprocessing.Lock()
        self._counts = multiprocessing.RawArray("q", 4)
        self._names = multiprocessing.RawArray("q", capacity)

    def sample(self, shard: str | None, key: str | None, reason: str) -> None:
        """A sample of ``shard`` that was left out: it could not be parsed or decoded."""
        first = self._count(("sample", shard, key), _SAMPLES, _DISTINCT_SAMPLES)
        level = logging.WARNING if first else logging.DEBUG
        log.log(level, "skipped sample %s of shard %s: %s", key, shard, reason)

    def shard(self, url: str, reason: str) -> None:
        """A shard that could not be opened, or not read to its end."""
        if self._count(("shard", url), None, _SHARDS):
            log.warning("shard %s: %s", url, reason)
        else:
            log.debug("shard %s again: %s", url, reason)

    def totals(self) -> dict[str, int]:
        """``skipped_samples`` (every time one was left out), ``distinct_skipped_samples`` and
        ``bad_shards``, over every process that used this log."""
        with self._lock:
            return {
                "skipped_samples": self._counts[_SAMPLES],
                "distinct_skipped_samples": self._counts[_DISTINCT_SAMPLES],
                "bad_shards": self._counts[_SHARDS],
            }

    def _count(self, name: tuple, every: int | None, first: int) -> bool:
        """Add one to slot ``every`` and, for a name not met before, to slot ``first``;
        return whether it is new."""
        digest = int.from_bytes(
            hashlib.blake2b(repr(name).encode(), digest_size=8).digest(), "little", signed=True
        )
        with self._lock:
            if every is not None:
                self._counts[every] += 1
            known = self._counts[_NAMES]
            if digest in self._names[:known]:
                return False
            self._counts[first] += 1
            if known < len(self._names):
                self._names[known] = digest
                self._counts[_NAMES] = known + 1
            return True
