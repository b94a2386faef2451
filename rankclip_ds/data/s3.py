"""``s3://bucket/key`` through boto3: the client, ranged reads, error classes, and the pre-flight's credential check.

boto3 is imported only when an ``s3://`` shard is read. The client follows boto3's standard configuration (see
:mod:`rankclip_ds.data.remote`); only its timeouts come from the :class:`RemotePolicy`, and its own retries are off.
"""

from __future__ import annotations

import os
from typing import Any

from rankclip_ds.data.remote import RemoteError, RemotePolicy, status_error

__all__ = ["classify_botocore", "missing_s3_credentials", "parse_s3_url", "s3_opener"]

BOTO3_PIN = "boto3==1.44.8"
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_FORBIDDEN = {
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "403",
    "401",
}
_TRANSIENT = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
}
_CLIENTS: dict[tuple, Any] = {}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b.tar`` → (``bucket``, ``a/b.tar``)."""
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ValueError(f"{url!r} is not s3://BUCKET/KEY")
    return bucket, key


def _client(policy: RemotePolicy):
    """One client per process and policy (a client must not cross a fork: DataLoader workers build their own)."""
    aws_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    cache_key = (os.getpid(), policy, aws_env)  # a changed endpoint or key in the environment gets a new client
    if cache_key not in _CLIENTS:
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=policy.timeout_s,
            read_timeout=policy.timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},  # every retry is ours: counted and logged
        )
        _CLIENTS[cache_key] = boto3.session.Session().client("s3", config=config)
    return _CLIENTS[cache_key]


def s3_opener(url: str, policy: RemotePolicy):
    """The ``(start, etag) -> (body, etag, size)`` opener of :class:`rankclip_ds.data.remote.RemoteReader`."""
    bucket, key = parse_s3_url(url)

    def open_at(start: int, etag: str | None):
        kwargs = {"Bucket": bucket, "Key": key}
        if start:
            kwargs["Range"] = f"bytes={start}-"
        if etag:
            kwargs["IfMatch"] = etag  # a changed object fails (412) instead of being stitched onto the old bytes
        response = _client(policy).get_object(**kwargs)
        return response["Body"], response.get("ETag"), start + int(response["ContentLength"])

    return open_at


def classify_botocore(exc: BaseException) -> RemoteError:
    """The :class:`RemoteError` of a botocore exception."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        what = f"{code or 'error'} ({error.get('Message', '')})"
        if code in _NOT_FOUND:
            return RemoteError("remote_not_found", f"{what}: the object does not exist")
        if code in _FORBIDDEN:
            return RemoteError("remote_forbidden", f"{what}: access denied; check the credentials and the bucket")
        if code in ("PreconditionFailed", "412"):
            return RemoteError("remote_failed", "the object changed between two requests (its ETag differs)")
        if code in _TRANSIENT:
            return RemoteError("remote_failed", what, transient=True)
        return status_error(status, what) if status else RemoteError("remote_failed", what)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
        return RemoteError("remote_forbidden", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, bx.FlexibleChecksumError):
        return RemoteError("remote_failed", f"checksum mismatch: {exc}")
    if isinstance(exc, (bx.HTTPClientError, bx.IncompleteReadError, bx.ResponseStreamingError)):
        return RemoteError("remote_failed", f"{type(exc).__name__}: {exc}", transient=True)
    return RemoteError("remote_failed", f"{type(exc).__name__}: {exc}")


def missing_s3_credentials() -> str | None:
    """What keeps boto3 from reading ``s3://`` here (boto3 not installed, no credentials), or None when nothing."""
    try:
        import boto3
    except ImportError:
        return f"boto3 is not installed (pip install {BOTO3_PIN})"
    try:
        credentials = boto3.session.Session().get_credentials()
    except Exception as exc:  # a broken profile or config file: report it as the problem
        return f"boto3 cannot load credentials: {type(exc).__name__}: {exc}"
    if credentials is None:
        profile = os.environ.get("AWS_PROFILE")
        where = f"profile {profile!r} has none" if profile else "no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, no profile"
        return f"boto3 finds no credentials ({where}, no instance role)"
    return None
