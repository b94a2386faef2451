"""Credentials out of messages: every shard URL, spec or command that reaches a log line or an error goes through
:func:`redact` first.

Removed: the ``user:password@`` (or ``token@``) part of URLs, the values of query parameters that carry signatures
or tokens (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``X-Goog-Signature``, ``sig``,
``token``, ``key``, ...), ``Authorization:`` header values and ``-u user:pass`` in ``pipe:`` commands, inline
``NAME_SECRET=value`` assignments, and anywhere in the text the value of an environment variable whose name says it
is a secret (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``HF_TOKEN``, ``*_PASSWORD``, ...).
"""

from __future__ import annotations

import os
import re

__all__ = ["MASK", "redact", "redact_url"]

MASK = "***"
SECRET_PARAMS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "awsaccesskeyid",
        "googleaccessid",
        "signature",
        "sig",
        "token",
        "access_token",
        "id_token",
        "refresh_token",
        "key",
        "api_key",
        "apikey",
        "password",
        "secret",
        "client_secret",
        "auth",
        "authorization",
        "credential",
        "credentials",
    }
)
_SECRET_ENV_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE_KEY|_AUTH", re.I)
_MIN_SECRET_LEN = 6  # shorter env values ("1", "true") would blank out ordinary words
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_AUTH_HEADER = re.compile(r"(Authorization\s*[:=]\s*)(?:(?:Bearer|Basic|Token|AWS4-HMAC-SHA256)\s+)?[^\s'\"]+", re.I)
_USER_FLAG = re.compile(r"((?:^|\s)(?:-u|--user|--password|--token)[\s=]+)([^\s'\"]+)")
_SECRET_ASSIGN = re.compile(
    r"\b([A-Za-z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|API_KEY)[A-Za-z0-9_]*=)(\S+)", re.I
)


def redact_url(url: str) -> str:
    """``scheme://user:pass@host/p?X-Amz-Signature=s&a=1`` → ``scheme://***@host/p?X-Amz-Signature=***&a=1``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        authority = MASK + "@" + authority.rsplit("@", 1)[1]
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        params = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            params.append(f"{name}={MASK}" if eq and name.lower() in SECRET_PARAMS else item)
        path = path + "?" + "&".join(params) + hash_ + fragment
    return f"{scheme}://{authority}{slash}{path}"


def _secret_env_values() -> list[str]:
    values = {v for k, v in os.environ.items() if _SECRET_ENV_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)  # longest first: a secret that contains another is masked whole


def redact(text: object) -> str:
    """``str(text)`` with every credential named in the module doc replaced by ``***``."""
    out = _URL.sub(lambda m: redact_url(m.group(0)), str(text))
    out = _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, out)
    out = _USER_FLAG.sub(lambda m: m.group(1) + MASK, out)
    out = _SECRET_ASSIGN.sub(lambda m: m.group(1) + MASK, out)
    for value in _secret_env_values():
        out = out.replace(value, MASK)
    return out
