"""Reading WebDataset tar shards into records, with a whitelist on what is ever read.

A record is a run of consecutive tar members that share a key (the member path up to the first ``.`` of its file
name), as WebDataset defines it. Only whitelisted extensions are read into memory; the bytes of any other member
are never read, so nothing in a shard is ever unpickled, ``torch.load``-ed or executed. Records are counted the
same way by :func:`count_records` and :func:`iter_records`, which is what lets a shard be sliced by record index.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Iterator
from typing import IO

from rankclip_ds.data.redact import redact
from rankclip_ds.data.remote import RemoteError, RemotePolicy, is_remote, open_remote
from rankclip_ds.data.skips import SkipCounter

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt",)
META_EXTS = ("json",)
LABEL_EXTS = ("cls",)
WHITELIST = frozenset(IMAGE_EXTS + TEXT_EXTS + META_EXTS + LABEL_EXTS)
# Members that a generic WebDataset decoder would unpickle or load as tensors; counted apart so users notice them.
UNSAFE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "npy", "npz", "ckpt", "bin", "mp", "msgpack"})
MAX_MEMBER_BYTES = 256 * 1024 * 1024  # a single member above this is refused rather than read into memory


def is_local(url: str) -> bool:
    """True for a plain path or ``file://`` URL (not ``pipe:``, ``http(s)://`` or another scheme)."""
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def open_stream(url: str, *, remote: RemotePolicy | None = None, on_retry=None) -> IO[bytes]:
    """Opens a shard for sequential reading: local files directly; ``http(s)://`` and ``s3://`` through
    :func:`rankclip_ds.data.remote.open_remote` (retries with ``remote``, reports each to ``on_retry``); ``pipe:``
    and other schemes (``gs://``: ``gsutil cat``) through ``webdataset.gopen``."""
    if is_local(url):
        return open(local_path(url), "rb", buffering=1 << 20)  # the caller closes it
    if is_remote(url):
        return open_remote(url, remote, on_retry)
    import webdataset

    return webdataset.gopen(url, "rb")


def split_name(name: str) -> tuple[str, str] | None:
    """``dir/abc.seg.png`` → (``dir/abc``, ``seg.png``); None for names without an extension or hidden files."""
    dirname, base = os.path.split(name)
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{dirname}/{stem}" if dirname else stem), ext.lower()


def iter_records(
    url: str,
    skips: SkipCounter,
    start: int = 0,
    stop: int | None = None,
    extensions: frozenset[str] = WHITELIST,
    *,
    remote: RemotePolicy | None = None,
) -> Iterator[dict]:
    """Yields the records ``start <= index < stop`` of one shard as ``{"__key__", "__url__", "__index__", ext: bytes}``.

    Records before ``start`` are walked over without reading their bytes. A missing shard, a read error and a
    truncated tar are counted in ``skips`` (reasons ``missing_shard``, ``read_error``, ``truncated_tar``) and end the
    shard: the records read before the damage are kept, the incomplete last one is dropped. Members outside
    ``extensions`` are counted (``unsafe_member`` or ``unknown_extension``) and their bytes are never read.
    Remote shards (``http(s)://``, ``s3://``) are retried by ``remote`` (default: :class:`RemotePolicy`'s defaults);
    each retry is counted as ``remote_retry``, a shard given up as ``remote_not_found``, ``remote_forbidden`` or
    ``remote_failed`` (records before the failure are kept, as for a truncated tar).
    """

    def on_retry(attempt: int, delay: float, err: RemoteError) -> None:
        detail = f"retry {attempt} of {remote.retries if remote else RemotePolicy().retries} in {delay:.2f}s: {err}"
        skips.add("remote_retry", url, "", detail=detail)

    try:
        stream = open_stream(url, remote=remote, on_retry=on_retry)
    except RemoteError as exc:
        skips.add(exc.reason, url, "", detail=str(exc))
        return
    except FileNotFoundError:
        skips.add("missing_shard", url, "")
        return
    except OSError as exc:
        skips.add("read_error", url, "", detail=repr(exc))
        return
    current: list[dict | None] = [None]  # the record being assembled, for the skip message
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            yield from _group_records(tar, url, skips, start, stop, extensions, current)
    except RemoteError as exc:
        skips.add(exc.reason, url, current[0]["__key__"] if current[0] else "", detail=str(exc))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        reason = "missing_shard" if isinstance(exc, FileNotFoundError) else "truncated_tar"
        skips.add(reason, url, current[0]["__key__"] if current[0] else "", detail=repr(exc))


def _group_records(
    tar: tarfile.TarFile,
    url: str,
    skips: SkipCounter,
    start: int,
    stop: int | None,
    extensions: frozenset[str],
    current: list[dict | None],
) -> Iterator[dict]:
    """The records of an open tar (see :func:`iter_records`); ``current[0]`` is the record being assembled."""
    index = -1
    record: dict | None = None
    for member, key, ext in _keyed_members(tar):
        if record is None or key != record["__key__"]:
            if record is not None and index >= start:
                yield record
            index += 1
            if stop is not None and index >= stop:
                current[0] = None
                return
            record = current[0] = {"__key__": key, "__url__": url, "__index__": index}
        if index < start:
            continue
        if ext not in extensions:
            reason = "unsafe_member" if ext.rsplit(".", 1)[-1] in UNSAFE_EXTS else "unknown_extension"
            skips.add(reason, url, key, detail=f"member {member.name!r} ignored, never read")
            continue
        if ext in record:
            skips.add("duplicate_member", url, key, detail=f"second {member.name!r} ignored")
            continue
        if member.size > MAX_MEMBER_BYTES:
            skips.add("oversized_member", url, key, detail=f"{member.name!r} is {member.size} bytes")
            record["__bad__"] = "oversized_member"
            continue
        fileobj = tar.extractfile(member)
        record[ext] = fileobj.read() if fileobj is not None else b""
        if len(record[ext]) != member.size:
            raise tarfile.ReadError(f"member {member.name!r} cut short")
    if record is not None and index >= start and (stop is None or index < stop):
        yield record


def _keyed_members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """``(member, key, extension)`` of the tar's regular files that have a key (see :func:`split_name`)."""
    for member in tar:
        parts = split_name(member.name) if member.isfile() else None
        if parts is not None:
            yield member, parts[0], parts[1]


def count_records(url: str, *, remote: RemotePolicy | None = None) -> int:
    """Number of records in a shard, from its tar headers only (local files seek over the member data)."""
    count = 0
    last_key = None
    stream = open_stream(url, remote=remote)
    mode = "r:*" if is_local(url) else "r|*"
    try:
        with stream, tarfile.open(fileobj=stream, mode=mode) as tar:
            for _, key, _ in _keyed_members(tar):
                if key != last_key:
                    count += 1
                    last_key = key
    except (tarfile.TarError, EOFError, OSError) as exc:
        logger.warning(
            "shard %s: cannot be read to the end (%s); counting the %d records before the damage",
            redact(url),
            redact(repr(exc)),
            count,
        )
    return count
