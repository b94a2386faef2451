"""Shard lists: brace expressions, several sources joined with ``::``, optional weights, and per-shard sample counts.

Syntax of a spec (a string, or a list of per-source strings)::

    /data/cc3m/{00000..00331}.tar::/data/cc12m/{00000..01242}.tar@2.5::pipe:aws s3 cp s3://b/{0..9}.tar -

Each source is a brace expression; an optional ``@WEIGHT`` suffix (a positive number) sets its sampling weight in
resampled mode (default 1). Local paths, ``file://``, ``http(s)://`` and ``s3://`` URLs (read with retries by
:mod:`rankclip_ds.data.remote`), ``pipe:`` commands and other ``webdataset.gopen`` schemes are accepted.

Sample counts (needed for epoch mode) come, per shard, from the first that exists of: the ``manifest`` argument, a
manifest ``_manifest.json`` beside the shards (``{"shards": {"name.tar": count}}``, written by
``tools/make_shards.py``, ``tools/make_synthetic_shards.py`` and ``tools/inspect_shards.py``; fetched once per
folder for ``http(s)://`` and ``s3://`` shards), img2dataset's ``{name}_stats.json`` (``successes``, local), or, for
local files, a scan of the tar headers.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import braceexpand

from rankclip_ds.data.records import count_records, is_local, local_path
from rankclip_ds.data.redact import redact
from rankclip_ds.data.remote import RemoteError, RemotePolicy, is_remote, read_remote_bytes

logger = logging.getLogger(__name__)

_WEIGHT = re.compile(r"^(?P<spec>.+?)@(?P<weight>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)$")
MANIFEST_NAME = "_manifest.json"
SCAN_WARN_SHARDS = 256


@dataclass
class Source:
    """One ``::``-separated part of a spec: its expanded shard URLs and sampling weight."""

    spec: str
    urls: list[str]
    weight: float = 1.0
    counts: list[int] | None = field(default=None, repr=False)


def parse_spec(spec: str | list[str], weights: list[float] | None = None) -> list[Source]:
    """Splits a spec into sources, expands braces, reads ``@WEIGHT`` suffixes (or ``weights``, one per source)."""
    parts = [p for s in ([spec] if isinstance(spec, str) else list(spec)) for p in s.split("::")]
    parts = [p.strip() for p in parts if p.strip()]
    if not parts:
        raise ValueError(f"empty shard spec {redact(repr(spec))}: give e.g. '/data/cc3m/{{00000..00331}}.tar'")
    if weights is not None and len(weights) != len(parts):
        raise ValueError(
            f"{len(weights)} weights given for {len(parts)} sources in {redact(repr(spec))}; give one per source"
        )
    sources = []
    for i, part in enumerate(parts):
        weight = 1.0
        match = _WEIGHT.match(part)
        if match:
            part, weight = match["spec"], float(match["weight"])
        if weights is not None:
            weight = float(weights[i])
        if not weight > 0:
            raise ValueError(f"source {redact(repr(part))} has weight {weight}; weights must be positive numbers")
        urls = list(braceexpand.braceexpand(part))
        sources.append(Source(spec=part, urls=urls, weight=weight))
    return sources


def check_sources_exist(sources: list[Source]) -> None:
    """Start-up check: a source whose local shards all do not exist is an error naming the spec; some missing is a
    warning (they are counted as ``missing_shard`` when read). Remote sources are not checked here."""
    for src in sources:
        local = [u for u in src.urls if is_local(u)]
        if not local:
            continue
        missing = [u for u in local if not os.path.exists(local_path(u))]
        if len(missing) == len(local):
            raise FileNotFoundError(
                f"shard spec {redact(repr(src.spec))} matches no file ({len(local)} paths expanded, "
                f"e.g. {redact(repr(local[0]))}); "
                "check the path and the brace range, e.g. '/data/cc3m/{00000..00331}.tar'"
            )
        if missing:
            logger.warning(
                "%d of %d shards of %r do not exist (e.g. %s); they will be skipped and counted as missing_shard",
                len(missing),
                len(local),
                redact(src.spec),
                redact(missing[0]),
            )


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _manifest_counts(directory: Path, cache: dict) -> dict[str, int]:
    if directory not in cache:
        data = _read_json(directory / MANIFEST_NAME) or {}
        shards = data.get("shards", {}) if isinstance(data, dict) else {}
        cache[directory] = {str(k): int(v) for k, v in shards.items()}
    return cache[directory]


def shard_name(url: str) -> str:
    """The file name a manifest lists a shard under (for URLs: the last path segment, without the query)."""
    path = urlsplit(url).path if is_remote(url) else url
    return path.rstrip("/").rsplit("/", 1)[-1]


def _remote_manifest_counts(url: str, cache: dict, remote: RemotePolicy | None) -> dict[str, int]:
    """The ``_manifest.json`` beside a remote shard (fetched once per folder; an absent one is an empty dict)."""
    parts = urlsplit(url)
    folder = urlunsplit(parts._replace(path=parts.path.rsplit("/", 1)[0] + "/" + MANIFEST_NAME, query="", fragment=""))
    if folder not in cache:
        try:
            data = json.loads(read_remote_bytes(folder, remote))
        except RemoteError as exc:
            if exc.reason != "remote_not_found":
                raise RemoteError(exc.reason, f"the manifest {redact(folder)} cannot be read ({exc})") from exc
            data = {}
        except ValueError as exc:
            raise ValueError(f"the manifest {redact(folder)} is not json ({exc}); rewrite it") from exc
        shards = data.get("shards", {}) if isinstance(data, dict) else {}
        cache[folder] = {str(k): int(v) for k, v in shards.items()}
    return cache[folder]


def shard_count(
    url: str,
    manifest: dict[str, int] | None = None,
    cache: dict | None = None,
    scan: bool = True,
    *,
    remote: RemotePolicy | None = None,
) -> int | None:
    """Sample count of one shard (see the module doc for the lookup order); None if unknown and not scannable."""
    name = shard_name(url)
    if manifest is not None and name in manifest:
        return int(manifest[name])
    if is_remote(url):
        return _remote_manifest_counts(url, cache if cache is not None else {}, remote).get(name)
    if is_local(url):
        path = Path(local_path(url))
        counts = _manifest_counts(path.parent, cache if cache is not None else {})
        if path.name in counts:
            return counts[path.name]
        stats = _read_json(path.with_name(path.name.rsplit(".", 1)[0] + "_stats.json"))
        if isinstance(stats, dict) and "successes" in stats:
            return int(stats["successes"])
        if not path.exists():
            return 0
        if scan:
            return count_records(url)
    return None


def resolve_counts(
    sources: list[Source], manifest: str | dict | None = None, *, remote: RemotePolicy | None = None
) -> None:
    """Fills ``source.counts`` for every source; raises naming the shards whose count cannot be known.

    ``manifest`` may be a path to a manifest json or a dict shard-name → count (overrides files beside the shards).
    ``remote``: the retry policy for fetching manifests beside remote shards.
    """
    if isinstance(manifest, (str, os.PathLike)):
        data = _read_json(Path(manifest))
        if data is None:
            raise FileNotFoundError(
                f"manifest {manifest!r} cannot be read as json; write one with tools/inspect_shards.py --manifest"
            )
        manifest = {str(k): int(v) for k, v in data.get("shards", data).items()}
    cache: dict = {}
    scanned = 0
    for src in sources:
        counts = []
        for url in src.urls:
            n = shard_count(url, manifest, cache, scan=False, remote=remote)
            if n is None and is_local(url):
                scanned += 1
                if scanned == SCAN_WARN_SHARDS:
                    logger.warning(
                        "scanning tar headers of %d+ shards to count samples; write a manifest with "
                        "tools/inspect_shards.py --manifest to skip this",
                        scanned,
                    )
                n = count_records(url)
            if n is None:
                raise ValueError(
                    f"the number of samples in shard {redact(repr(url))} is unknown: epoch mode needs per-shard "
                    "counts. Write a manifest with tools/inspect_shards.py --manifest (--manifest-path for remote "
                    f"shards) and put it beside the shards as {MANIFEST_NAME} or pass it (manifest=...), or use "
                    "mode='resampled' with samples_per_epoch"
                )
            counts.append(n)
        src.counts = counts
