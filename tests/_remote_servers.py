"""Real servers for the remote-shard tests, on 127.0.0.1 and ephemeral ports, with faults injected per object.

``FaultyServer`` is a threaded HTTP server that either serves files from a folder (with ``Range``, ``ETag`` and
``If-Range``, optional basic auth) or relays GET requests to an upstream server (moto's S3 server) and passes the
answer on. Either way, per object path, it can: answer a status (404, 403, 503, ...), sleep before answering, or
send the headers with the full ``Content-Length`` and then only the bytes before offset ``at`` of the object, and
then reset the connection (RST) or close it cleanly (a short body). Each fault applies ``times`` times (None:
always). Every GET is logged as ``(path, first byte requested)``, so tests count attempts, not seconds.
"""

from __future__ import annotations

import base64
import http.client
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


@dataclass
class Fault:
    kind: str  # "status" | "sleep" | "reset" | "short"
    times: int | None = 1  # how many requests it hits (None: all)
    status: int = 503
    seconds: float = 0.0
    at: int = 0  # object byte offset where "reset" / "short" cut the body
    every: int | None = None  # instead of `at`: cut each answer after this many bytes (a link that drops often)
    then: Callable[[], None] | None = None  # run after each cut (e.g. replace the object)

    def take(self) -> bool:
        if self.times is None:
            return True
        if self.times > 0:
            self.times -= 1
            return True
        return False


class FaultyServer:
    """See the module doc. ``url(path)`` is the address of ``path``; ``requests`` the GETs received."""

    def __init__(self, root: Path | None = None, upstream: tuple[str, int] | None = None, auth: str | None = None):
        self.root, self.upstream, self.auth = root, upstream, auth
        self.faults: dict[str, Fault] = {}
        self.requests: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(_Handler):
            server_owner = owner

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # resets we cause are not errors
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str, userinfo: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}/{path.lstrip('/')}"

    def attempts(self, path: str) -> list[int]:
        """The first byte asked for by each GET of ``path``."""
        with self.lock:
            return [start for p, start in self.requests if p == "/" + path.lstrip("/")]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    server_owner: FaultyServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        owner = self.server_owner
        path = urlsplit(self.path).path
        start = _range_start(self.headers.get("Range"))
        with owner.lock:
            owner.requests.append((path, start))
            fault = owner.faults.get(path)
            hit = fault is not None and fault.take()
        if (
            owner.auth
            and self.headers.get("Authorization") != "Basic " + base64.b64encode(owner.auth.encode()).decode()
        ):
            return self._plain(401)
        if hit and fault.kind == "status":
            return self._plain(fault.status)
        if hit and fault.kind == "sleep":
            time.sleep(fault.seconds)
        status, headers, body = self._upstream() if owner.upstream else self._file(path, start)
        if status not in (200, 206) or not (hit and fault.kind in ("reset", "short")):
            return self._send(status, headers, body)
        offset = start if status == 206 else 0
        cut = offset + fault.every if fault.every else fault.at
        if not offset <= cut < offset + len(body):
            return self._send(status, headers, body)
        self._send_head(status, headers, len(body))
        self.wfile.write(body[: cut - offset])
        self.wfile.flush()
        if fault.kind == "reset":  # RST instead of FIN: the client sees ECONNRESET
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            self.connection.shutdown(socket.SHUT_RDWR)
        self.connection.close()
        self.close_connection = True
        if fault.then is not None:
            fault.then()

    def _file(self, path: str, start: int) -> tuple[int, dict, bytes]:
        file = self.server_owner.root / path.lstrip("/")
        if not file.is_file():
            return 404, {}, b"not found"
        data = file.read_bytes()
        stat = os.stat(file)
        etag = f'"{stat.st_size}-{stat.st_mtime_ns}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        if_range = self.headers.get("If-Range")
        if start and (if_range is None or if_range == etag):
            if start >= len(data):
                return 416, {"Content-Range": f"bytes */{len(data)}"}, b""
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return 206, headers, data[start:]
        return 200, headers, data

    def _upstream(self) -> tuple[int, dict, bytes]:
        host, port = self.server_owner.upstream
        conn = http.client.HTTPConnection(host, port, timeout=30)
        try:
            conn.request("GET", self.path, headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
            response = conn.getresponse()
            body = response.read()
            skip = {"content-length", "transfer-encoding", "connection", "server", "date"}
            return response.status, {k: v for k, v in response.getheaders() if k.lower() not in skip}, body
        finally:
            conn.close()

    def _send_head(self, status: int, headers: dict, length: int) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send(self, status: int, headers: dict, body: bytes) -> None:
        self._send_head(status, headers, len(body))
        self.wfile.write(body)

    def _plain(self, status: int) -> None:
        self._send(status, {"Content-Type": "text/plain"}, f"status {status}".encode())


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header[len("bytes=") :].split("-", 1)[0] or 0)


class MotoS3:
    """moto's S3 server (``ThreadedMotoServer``) on an ephemeral port, a bucket, and the env that points boto3 at
    it; ``proxy`` is a :class:`FaultyServer` relaying to it (point ``AWS_ENDPOINT_URL`` there to inject faults)."""

    ACCESS_KEY = "AKIATESTREMOTE0000001"
    SECRET_KEY = "testsecret/remote+shards0000000000000000"

    def __init__(self, bucket: str = "shards"):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()
        self.endpoint = f"http://{self.host}:{self.port}"
        self.proxy = FaultyServer(upstream=(self.host, self.port))
        self.bucket = bucket
        self.client().create_bucket(Bucket=bucket)

    def env(self, through_proxy: bool = True) -> dict[str, str]:
        endpoint = f"http://127.0.0.1:{self.proxy.port}" if through_proxy else self.endpoint
        return {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        import boto3

        env = self.env(through_proxy=False)
        return boto3.session.Session(
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        ).client("s3", endpoint_url=self.endpoint)

    def upload(self, folder: Path, prefix: str) -> None:
        client = self.client()
        for file in sorted(folder.iterdir()):
            if file.is_file():
                client.put_object(Bucket=self.bucket, Key=f"{prefix}/{file.name}", Body=file.read_bytes())

    def close(self) -> None:
        self.proxy.close()
        self.server.stop()
