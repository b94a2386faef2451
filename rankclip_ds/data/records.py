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


def open_stream(url: str) -> IO[bytes]:
    """Opens a shard for sequential reading: local files directly, ``pipe:`` and URLs through ``webdataset.gopen``."""
    if is_local(url):
        return open(local_path(url), "rb", buffering=1 << 20)  # the caller closes it
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
) -> Iterator[dict]:
    """Yields the records ``start <= index < stop`` of one shard as ``{"__key__", "__url__", "__index__", ext: bytes}``.

    Records before ``start`` are walked over without reading their bytes. A missing shard, a read error and a
    truncated tar are counted in ``skips`` (reasons ``missing_shard``, ``read_error``, ``truncated_tar``) and end the
    shard: the records read before the damage are kept, the incomplete last one is dropped. Members outside
    ``extensions`` are counted (``unsafe_member`` or ``unknown_extension``) and their bytes are never read.
    """
    try:
        stream = open_stream(url)
    except FileNotFoundError:
        skips.add("missing_shard", url, "")
        return
    except OSError as exc:
        skips.add("read_error", url, "", detail=repr(exc))
        return
    index = -1
    current: dict | None = None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_name(member.name)
                if parts is None:
                    continue
                key, ext = parts
                if current is None or key != current["__key__"]:
                    if current is not None and index >= start:
                        yield current
                    index += 1
                    if stop is not None and index >= stop:
                        current = None
                        break
                    current = {"__key__": key, "__url__": url, "__index__": index}
                if index < start:
                    continue
                if ext not in extensions:
                    reason = "unsafe_member" if ext.rsplit(".", 1)[-1] in UNSAFE_EXTS else "unknown_extension"
                    skips.add(reason, url, key, detail=f"member {member.name!r} ignored, never read")
                    continue
                if ext in current:
                    skips.add("duplicate_member", url, key, detail=f"second {member.name!r} ignored")
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    skips.add("oversized_member", url, key, detail=f"{member.name!r} is {member.size} bytes")
                    current["__bad__"] = "oversized_member"
                    continue
                fileobj = tar.extractfile(member)
                current[ext] = fileobj.read() if fileobj is not None else b""
                if len(current[ext]) != member.size:
                    raise tarfile.ReadError(f"member {member.name!r} cut short")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        reason = "missing_shard" if isinstance(exc, FileNotFoundError) else "truncated_tar"
        skips.add(reason, url, current["__key__"] if current else "", detail=repr(exc))
        return
    if current is not None and index >= start and (stop is None or index < stop):
        yield current


def count_records(url: str) -> int:
    """Number of records in a shard, from its tar headers only (local files seek over the member data)."""
    count = 0
    last_key = None
    stream = open_stream(url)
    mode = "r:*" if is_local(url) else "r|*"
    try:
        with stream, tarfile.open(fileobj=stream, mode=mode) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_name(member.name)
                if parts is None:
                    continue
                if parts[0] != last_key:
                    count += 1
                    last_key = parts[0]
    except (tarfile.TarError, EOFError, OSError) as exc:
        logger.warning(
            "shard %s: cannot be read to the end (%r); counting the %d records before the damage", url, exc, count
        )
    return count
