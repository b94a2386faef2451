"""Counting and rate-limited reporting of skipped input, shared between DataLoader workers and the trainer.

Workers add to a process-local tally and flush it into a ``multiprocessing`` shared array (one slot per reason) each
time they hand over a batch, so :meth:`SkipCounter.counts` in the main process is current up to the batches it has
received. With ``num_workers=0`` the same object simply counts in the main process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time

from rankclip_ds.data.redact import redact

logger = logging.getLogger(__name__)

REASONS = (
    "missing_shard",  # a shard file that does not exist (or a URL that cannot be opened)
    "read_error",  # an I/O error while opening a shard
    "remote_not_found",  # a remote shard that does not exist (HTTP 404/410, S3 NoSuchKey/NoSuchBucket)
    "remote_forbidden",  # a remote shard we may not read (HTTP 401/403, S3 AccessDenied, bad or no credentials)
    "remote_failed",  # a remote shard given up for this pass: transient failures outlived the retries
    "remote_retry",  # (not a skip) one retry of a remote read after a transient failure
    "truncated_tar",  # a tar that ends in the middle of a member or has a corrupt header
    "unknown_extension",  # a member whose extension is not whitelisted (ignored, never read)
    "unsafe_member",  # a .pyd/.pickle/.pth/.npy/... member (ignored, never read, never unpickled)
    "duplicate_member",  # a second member with the same key and extension in one record
    "oversized_member",  # a member larger than the per-member byte limit
    "zero_byte",  # an image or caption member of zero bytes
    "missing_image",  # a record without any jpg/jpeg/png/webp member
    "missing_caption",  # a record without the caption member (or json field)
    "empty_caption",  # a caption that is empty or whitespace only
    "bad_utf8",  # a caption or json member that is not valid UTF-8
    "bad_json",  # a json member that does not parse
    "bad_label",  # an eval record whose .cls is missing or not an integer in range
    "decode_error",  # image bytes that PIL cannot decode (corrupt or truncated image)
    "oversized_image",  # an image above the decompression-bomb pixel limit
    "transform_error",  # the image transform or tokenizer raised on this sample
    "padded",  # samples repeated at the end of an epoch so that every rank yields the same number of batches
)
_INDEX = {reason: i for i, reason in enumerate(REASONS)}
_PER_MEMBER = ("unknown_extension", "unsafe_member", "duplicate_member")
NOT_SKIPS = ("padded", "remote_retry")  # counted beside the skips, but no sample was lost


class SkipCounter:
    """Counts skipped samples (and ignored members) by reason; warns with shard and key, rate-limited per reason.

    ``warn_first`` warnings per reason are logged in full, then one every ``warn_every_s`` seconds with the count.
    """

    def __init__(self, shared: bool = True, warn_first: int = 5, warn_every_s: float = 60.0):
        self._shared = mp.Array("q", len(REASONS), lock=True) if shared else None
        self._local = [0] * len(REASONS)
        self._pending = [0] * len(REASONS)
        self._warned: dict[str, int] = {}
        self._last_warn: dict[str, float] = {}
        self.warn_first = warn_first
        self.warn_every_s = warn_every_s

    def add(self, reason: str, url: str, key: str, detail: str = "", n: int = 1) -> None:
        i = _INDEX[reason]  # KeyError on an unknown reason is a bug in this package
        self._local[i] += n
        self._pending[i] += n
        if reason == "padded":
            return
        seen = self._warned.get(reason, 0) + 1
        self._warned[reason] = seen
        now = time.monotonic()
        if seen <= self.warn_first or now - self._last_warn.get(reason, 0.0) >= self.warn_every_s:
            self._last_warn[reason] = now
            what = "ignored member" if reason in _PER_MEMBER else "skipped sample"
            if reason.startswith("remote_"):
                what = "retrying" if reason == "remote_retry" else "skipped shard (for this pass)"
            suffix = f" ({self._local[i]} so far in this process)" if seen > self.warn_first else ""
            # shard URLs and error texts may hold credentials (user:password@, signed query strings): never log them
            shard, detail = redact(url), redact(detail)
            logger.warning("%s [%s] shard=%s key=%s %s%s", what, reason, shard, key or "-", detail, suffix)

    def flush(self) -> None:
        """Moves this process's pending counts into the shared array (call at batch boundaries)."""
        if self._shared is None or not any(self._pending):
            return
        with self._shared.get_lock():
            for i, n in enumerate(self._pending):
                if n:
                    self._shared[i] += n
        self._pending = [0] * len(REASONS)

    def counts(self) -> dict[str, int]:
        """Totals by reason over all processes that flushed (only the non-zero ones)."""
        self.flush()
        values = list(self._shared[:]) if self._shared is not None else self._local
        return {reason: int(v) for reason, v in zip(REASONS, values, strict=True) if v}

    def reset(self) -> None:
        if self._shared is not None:
            with self._shared.get_lock():
                for i in range(len(REASONS)):
                    self._shared[i] = 0
        self._local = [0] * len(REASONS)
        self._pending = [0] * len(REASONS)
