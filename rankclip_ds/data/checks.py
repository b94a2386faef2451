"""Checks of a training-data spec that need no decoding: used by the pre-flight before any heavy work.

Plain arguments in, :class:`rankclip_ds.problems.Problem` records out (messages name the config keys the user set).
"""

from __future__ import annotations

import shutil

from ..problems import Problem
from .decode import parse_caption_key
from .records import is_local
from .redact import redact
from .sources import Source, check_sources_exist, parse_spec, shard_count

__all__ = ["check_remote_access", "check_shards", "local_sample_count"]


def check_shards(spec: str, *, caption_key: str) -> tuple[list[Problem], list[Source] | None]:
    """The caption key is valid, the shard spec parses and matches files. Returns the problems and the parsed
    sources (None when the spec does not parse or matches nothing)."""
    problems = []
    try:
        parse_caption_key(caption_key)
    except ValueError:
        problems.append(
            Problem.of(
                "data.caption_key",
                caption_key,
                "is neither a member extension (such as 'txt') nor 'json:FIELD'",
                "use 'txt', or 'json:FIELD' to read the caption from a field of the .json member",
            )
        )
    try:
        sources = parse_spec(spec)
    except ValueError as exc:
        fix = "write brace expressions joined with '::', each optionally '@WEIGHT' (see docs/data.md)"
        problems.append(Problem.of("data.train_data", redact(spec), str(exc), fix))
        return problems, None
    problems.extend(check_remote_access(sources))
    try:
        check_sources_exist(sources)
    except FileNotFoundError as exc:
        problems.append(
            Problem.of(
                "data.train_data",
                redact(spec),
                str(exc).split("; ", 1)[0],
                "check the path and the brace range (e.g. '/data/cc3m/{00000..00331}.tar'), or write the shards first",
                machine=True,
            )
        )
        return problems, None
    return problems, sources


def check_remote_access(sources: list[Source]) -> list[Problem]:
    """What this machine lacks to read the remote sources: boto3 and credentials for ``s3://``, ``gsutil`` for
    ``gs://`` (machine problems: a dry run elsewhere reports them as notes)."""
    from .s3 import missing_s3_credentials

    problems = []
    s3 = [s for s in sources if any(u.startswith("s3://") for u in s.urls)]
    missing = missing_s3_credentials() if s3 else None
    if missing:
        fix = (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary keys), or "
            "AWS_PROFILE naming a profile of ~/.aws/credentials; for an S3-compatible store (MinIO, Ceph, GCS "
            "interoperability) also AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (see docs/data.md, 'Remote shards')"
        )
        problems.append(
            Problem.of("data.train_data", redact(s3[0].spec), f"s3:// shards, but {missing}", fix, machine=True)
        )
    gs = [s for s in sources if any(u.startswith("gs://") for u in s.urls)]
    if gs and shutil.which("gsutil") is None:
        fix = (
            "install the Google Cloud SDK (gsutil) on every node, or read the bucket as s3:// through GCS's "
            "S3-compatible endpoint (AWS_ENDPOINT_URL_S3=https://storage.googleapis.com with HMAC keys)"
        )
        problems.append(
            Problem.of(
                "data.train_data", redact(gs[0].spec), "gs:// shards are read with gsutil, not found", fix, machine=True
            )
        )
    return problems


def local_sample_count(sources: list[Source]) -> int | None:
    """The samples of local shards whose counts are known without reading them (manifests); None when a shard is
    remote or uncounted (counting would read every tar header: slow for big datasets)."""
    if any(not is_local(u) for s in sources for u in s.urls):
        return None
    cache: dict = {}
    counts = [shard_count(u, cache=cache, scan=False) for s in sources for u in s.urls]
    return None if any(c is None for c in counts) else sum(counts)
