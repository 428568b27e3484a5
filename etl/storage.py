"""Files named by URL: parse, redact, open with timeouts and resumable retries, read manifests.

A source is a local path, `http(s)://host/...` (stdlib `urllib`), `s3://bucket/key` (botocore,
the `s3` extra) or `pipe:CMD` (webdataset's convention: the file is the command's standard
output). Each network object is read as one streaming GET (a range GET from the byte reached
when resuming): on the loopback this read faster than fsspec's HTTP files, s3fs, `pipe:curl`
and `pipe:aws s3 cp` (README, `patchetl train`), and a dropped read resumes instead of
starting the shard over.
Contracts:

- **Credentials** come from the standard environment only: for S3 the AWS variables and files
  (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...) and the endpoint `AWS_ENDPOINT_URL_S3` or
  `AWS_ENDPOINT_URL` (an S3-compatible store); a URL holding a password is refused. Every
  message shows `redact(url)`: no user information, no query string (presigned signatures).
- **Timeouts on every network operation** (`Retry.timeout`: connect, and each read waiting for
  bytes; for `pipe:` each wait on the command's output), so a stalled server cannot hang a
  reader, and through it a DDP job.
- **Retries resume**: `open_url` returns a stream that, when a read fails (connection dropped,
  timeout, a 5xx), reconnects at the byte it reached (an HTTP/S3 range request; a `pipe:`
  command is run again and the bytes already read are skipped) after a backoff that doubles,
  at most `Retry.attempts` connections per stream in all; then it raises `StorageError`.
- A missing object is `NotFound` at once (never retried): `check_objects` finds every missing
  shard of a split before any work starts.
- **Writes** (S3 only, for `etl.extract.publish`): `put_file` is one PUT per object with user
  metadata, sent again whole when it fails (a failed PUT leaves no object); `head`,
  `list_names` and `delete` with the same timeouts and bounded retries.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import select
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from etl.errors import PatchetlError

log = logging.getLogger("patchetl.storage")
NETWORK = ("http", "https", "s3")
MAX_DELAY = 30.0  # seconds: the backoff stops doubling here
CHUNK = 256 << 10  # bytes asked of a connection at a time (a failed read loses at most this)


class Connection(Protocol):
    """An open read of a source: ``read(n)`` gives at most n bytes (b"" at the end)."""

    def read(self, size: int = -1, /) -> bytes | None: ...

    def close(self) -> None: ...


class StorageError(PatchetlError, OSError):
    """A source that cannot be read; the message names the (redacted) URL and the fix."""


class NotFound(StorageError, FileNotFoundError):
    """The object does not exist (HTTP 404, no such S3 key, no such file)."""


@dataclass(frozen=True)
class Retry:
    """How hard to try: connections per stream, seconds per network wait, first backoff."""

    attempts: int
    timeout: float
    backoff: float

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed connection (1, 2, ...)."""
        return float(min(MAX_DELAY, self.backoff * 2 ** (failures - 1)))


# --------------------------------------------------------------------------- names
def scheme(url: str) -> str:
    """'http', 'https', 's3', 'pipe' or '' (a local path)."""
    if url.startswith("pipe:"):
        return "pipe"
    found = urlsplit(url).scheme.lower()
    return found if found in NETWORK else ""


def is_url(spec: str | os.PathLike[str]) -> bool:
    """Whether ``spec`` names a remote source (http, https, s3 or pipe:) rather than a path."""
    return scheme(str(spec)) != ""


_URL = re.compile(r"\b(?:https?|s3)://[^\s'\",)]+", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` (a URL, a ``pipe:`` command, a message) safe to print: in every URL it holds,
    user information and the query string are replaced by ``***``."""
    return _URL.sub(lambda m: _redact_url(m.group(0)), text)


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def check_url(url: str) -> None:
    """Refuse a URL with a password in it (it would show in process lists and shell history)."""
    parts = urlsplit(url)
    if scheme(url) in NETWORK and parts.password is not None:
        raise StorageError(
            f"{redact(url)}: a password in the URL is refused (give credentials in the "
            "environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile for s3://, "
            "and remove the user:password@ part)"
        )


def join(prefix: str, name: str) -> str:
    """``name`` inside the folder or URL prefix ``prefix``."""
    if scheme(prefix) in NETWORK:  # into the path; a query string stays at the end
        parts = urlsplit(prefix)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))
    return os.path.join(prefix, name)


def parent(url: str) -> str:
    """The folder or prefix holding ``url`` (the part before its last '/')."""
    if scheme(url) in NETWORK:
        parts = urlsplit(url)
        return urlunsplit(parts._replace(path=parts.path.rsplit("/", 1)[0], query=""))
    return os.path.dirname(url)


def basename(url: str) -> str:
    """The last part of the path of ``url`` (a shard's name)."""
    if scheme(url) in NETWORK:
        return urlsplit(url).path.rsplit("/", 1)[-1]
    if url.startswith("pipe:"):
        return redact(url)
    return os.path.basename(url)


# --------------------------------------------------------------------------- openers
def _http(url: str, offset: int, timeout: float) -> Connection:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise NotFound(f"{redact(url)}: not found (HTTP {exc.code})") from None
        if exc.code == 416:  # the range starts at the end: nothing is left
            return io.BytesIO(b"")
        if 400 <= exc.code < 500 and exc.code not in (408, 429):
            raise StorageError(f"{redact(url)}: HTTP {exc.code} {exc.reason}") from None
        raise
    body = _HttpBody(response)  # unbuffered: bytes read before a failure are kept
    if offset and response.status != 206:  # the server ignores ranges: skip what was read
        _skip(body, offset)
    return body


class _HttpBody(io.RawIOBase):
    """An HTTP response body that fails when the connection ends before Content-Length (the
    standard library then just returns no more bytes)."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = int(self.response.readinto(b))
        if n == 0 and b and self.response.length:
            raise ConnectionError(
                f"the connection closed {self.response.length} bytes before the end"
            )
        return n

    def close(self) -> None:
        self.response.close()
        super().close()


_S3_CLIENTS: dict[tuple[int, float, str], Any] = {}
_S3_LOCK = threading.Lock()  # `check_objects` asks from many threads at once


def s3_client(timeout: float) -> Any:
    """A botocore S3 client from the environment (credentials, region, endpoint), one try per
    call and ``timeout`` on connecting and on every read; one per process (clients are
    thread-safe, not fork-safe)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    key = (os.getpid(), timeout, endpoint)
    with _S3_LOCK:
        if key not in _S3_CLIENTS:
            _S3_CLIENTS[key] = _new_s3_client(timeout, endpoint)
    return _S3_CLIENTS[key]


def _new_s3_client(timeout: float, endpoint: str) -> Any:
    try:
        import botocore.config
        import botocore.session
    except ImportError:
        raise StorageError(
            "s3:// needs boto3: pip install 'patchetl[s3]' (or pip install boto3)"
        ) from None
    config = botocore.config.Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"max_attempts": 1, "mode": "standard"},  # our Retry decides how often
    )
    session = botocore.session.get_session()
    return session.create_client("s3", endpoint_url=endpoint or None, config=config)


def _s3_call(url: str, call: Callable[[], Any]) -> Any:
    """``call()`` with the store's refusals as NotFound / StorageError (not retried)."""
    from botocore.exceptions import ClientError

    try:
        return call()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
            raise NotFound(f"{redact(url)}: no such object ({code})") from None
        if status in (401, 403):
            raise StorageError(
                f"{redact(url)}: access denied ({code}) (check AWS_ACCESS_KEY_ID / "
                "AWS_PROFILE, AWS_ENDPOINT_URL and the bucket policy)"
            ) from None
        if status == 416:
            return None
        if 400 <= status < 500 and status not in (408, 429):
            raise StorageError(f"{redact(url)}: refused by the store ({code})") from None
        raise


def _s3(url: str, offset: int, timeout: float) -> Connection:
    bucket, _, key = url[len("s3://") :].partition("/")
    ranged = {"Range": f"bytes={offset}-"} if offset else {}
    client = s3_client(timeout)
    response = _s3_call(url, lambda: client.get_object(Bucket=bucket, Key=key, **ranged))
    if response is None:  # the range starts at the end: nothing is left
        return io.BytesIO(b"")
    return response["Body"]  # type: ignore[no-any-return]


class _Pipe(io.RawIOBase):
    """A shell command's standard output; every wait for bytes is bounded by ``timeout``."""

    def __init__(self, command: str, timeout: float) -> None:
        self.command, self.timeout = command, timeout
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            command,
            shell=True,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            start_new_session=True,
        )

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"no output for {self.timeout:g} s")
        data = os.read(fd, len(b))
        if not data:
            code = self.proc.wait(timeout=self.timeout)
            if code != 0:
                self.errors.seek(0)
                tail = self.errors.read()[-300:].decode(errors="replace").strip()
                raise OSError(f"the command exited with status {code}: {redact(tail)}")
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.errors.close()
        super().close()


def _pipe(url: str, offset: int, timeout: float) -> Connection:
    stream = _Pipe(url[len("pipe:") :], timeout)  # unbuffered, as `_HttpBody`
    _skip(stream, offset)
    return stream


def _local(path: str, offset: int, timeout: float) -> Connection:
    try:
        fh = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    fh.seek(offset)
    return fh


OPENERS: dict[str, Callable[[str, int, float], Connection]] = {
    "http": _http,
    "https": _http,
    "s3": _s3,
    "pipe": _pipe,
    "": _local,
}


def _skip(stream: Connection, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise OSError(f"the stream ended {n} bytes before the resume point")
        n -= len(chunk)


# --------------------------------------------------------------------------- retrying stream
class RetryingReader(io.RawIOBase):
    """Reads ``url`` from the start; a failed read reconnects where it stopped (see module)."""

    def __init__(self, url: str, retry: Retry) -> None:
        check_url(url)
        self.url, self.retry = url, retry
        self.opener = OPENERS[scheme(url)]
        self.position, self.connections = 0, 0
        self.fh: Connection | None = None

    def __repr__(self) -> str:  # webdataset puts the stream in its messages
        return f"<{redact(self.url)}>"

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while True:
            try:
                if self.fh is None:
                    self.connections += 1
                    self.fh = self.opener(self.url, self.position, self.retry.timeout)
                data = self.fh.read(min(len(b), CHUNK)) or b""
                b[: len(data)] = data
                self.position += len(data)
                return len(data)
            except StorageError:  # missing, refused: retrying cannot help
                self._drop()
                raise
            except Exception as exc:  # dropped connections, timeouts, 5xx, the store's errors
                self._drop()
                failed = f"{type(exc).__name__}: {redact(str(exc))}"
                if self.connections >= self.retry.attempts:
                    raise StorageError(
                        f"{redact(self.url)}: read failed at byte {self.position} after "
                        f"{self.connections} attempt(s): {failed} (check the server; raise "
                        "--read-attempts or --read-timeout for a slow or flaky network)"
                    ) from None
                delay = self.retry.delay(self.connections)
                log.warning(
                    "%s: %s at byte %d; retrying in %.1f s (attempt %d of %d)",
                    redact(self.url),
                    failed,
                    self.position,
                    delay,
                    self.connections + 1,
                    self.retry.attempts,
                )
                time.sleep(delay)

    def _drop(self) -> None:
        if self.fh is not None:
            # a broken connection may fail to close; it is gone either way
            with contextlib.suppress(Exception):
                self.fh.close()
            self.fh = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_url(url: str, retry: Retry) -> io.BufferedReader:
    """``url`` as a buffered binary stream that retries and resumes (see the module)."""
    return io.BufferedReader(RetryingReader(url, retry), 1 << 20)


def read_bytes(url: str, retry: Retry) -> bytes:
    """The whole content of ``url`` (a manifest, a sidecar)."""
    with open_url(url, retry) as fh:
        return fh.read()


def read_manifest(prefix: str, retry: Retry) -> dict[str, Any]:
    """The `manifest.json` of the split at folder or URL prefix ``prefix`` (or that file)."""
    url = prefix if prefix.endswith(".json") else join(prefix, "manifest.json")
    try:
        manifest = json.loads(read_bytes(url, retry))
    except NotFound:
        raise StorageError(
            f"{redact(url)}: missing; give the prefix of a complete split (its manifest.json "
            "is written last, so the extraction or upload to it has not finished)"
        ) from None
    except ValueError as exc:
        raise StorageError(f"{redact(url)}: not a manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise StorageError(f"{redact(url)}: not a patchetl manifest (no 'shards' list)")
    return manifest


# --------------------------------------------------------------------------- existence checks
def size(url: str, retry: Retry) -> int | None:
    """Bytes of ``url`` (None for a ``pipe:`` command); raises NotFound when it is missing."""
    kind = scheme(url)
    if kind == "pipe":
        return None
    last: Exception | None = None
    for attempt in range(1, retry.attempts + 1):
        try:
            return _size(kind, url, retry.timeout)
        except StorageError:
            raise
        except Exception as exc:  # as in RetryingReader: anything else may pass
            last = exc
            if attempt < retry.attempts:
                time.sleep(retry.delay(attempt))
    raise StorageError(f"{redact(url)}: cannot reach it after {retry.attempts} attempt(s): {last}")


def _size(kind: str, url: str, timeout: float) -> int | None:
    if kind == "":
        try:
            return os.stat(url).st_size
        except FileNotFoundError:
            raise NotFound(f"{url}: no such file") from None
    if kind == "s3":
        bucket, _, key = url[len("s3://") :].partition("/")
        client = s3_client(timeout)
        head = _s3_call(url, lambda: client.head_object(Bucket=bucket, Key=key))
        return int(head["ContentLength"])
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            return int(length) if length is not None else None
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise NotFound(f"{redact(url)}: not found (HTTP {exc.code})") from None
        raise


def check_objects(urls: Sequence[str], retry: Retry, threads: int = 16) -> list[str]:
    """Problems of the objects ``urls`` (missing or unreachable), each naming the redacted URL;
    checked in parallel threads. ``pipe:`` commands cannot be checked and pass."""

    def problem(url: str) -> str | None:
        try:
            size(url, retry)
        except StorageError as exc:  # NotFound included
            return str(exc)
        return None

    with ThreadPoolExecutor(max(1, min(threads, len(urls)))) as pool:
        return [p for p in pool.map(problem, urls) if p is not None]


# --------------------------------------------------------------------------- S3 writes
# What `etl.extract.publish` needs: each object is one PUT, which S3 makes visible only once
# the whole body has arrived (a killed upload leaves no object), carrying its sha256 as
# metadata so that a rerun can skip what is already there.
MAX_PUT = 5 << 30  # bytes: the largest object S3 takes in one PUT


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD tells of an object: its size and its user metadata (``x-amz-meta-*``)."""

    size: int
    metadata: dict[str, str]


def bucket_key(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = url[len("s3://") :].partition("/")
    return bucket, key


def _retried(url: str, what: str, retry: Retry, call: Callable[[], Any]) -> Any:
    """``call()`` tried up to ``retry.attempts`` times with the doubling backoff; refusals
    (StorageError, NotFound) are raised at once."""
    for attempt in range(1, retry.attempts + 1):
        try:
            return call()
        except StorageError:
            raise
        except Exception as exc:  # dropped connections, timeouts, 5xx
            failed = f"{type(exc).__name__}: {redact(str(exc))}"
            if attempt == retry.attempts:
                raise StorageError(
                    f"{redact(url)}: {what} failed after {attempt} attempt(s): {failed} (check "
                    "the store and the network, then run the same command again)"
                ) from None
            log.warning("%s: %s failed (%s); retrying", redact(url), what, failed)
            time.sleep(retry.delay(attempt))
    raise AssertionError("unreachable")


def head(url: str, retry: Retry) -> ObjectInfo | None:
    """Size and metadata of the S3 object ``url``, or None when there is none."""
    bucket, key = bucket_key(url)
    client = s3_client(retry.timeout)
    try:
        found = _retried(
            url,
            "HEAD",
            retry,
            lambda: _s3_call(url, lambda: client.head_object(Bucket=bucket, Key=key)),
        )
    except NotFound:
        return None
    return ObjectInfo(int(found["ContentLength"]), dict(found.get("Metadata", {})))


def put_object(url: str, body: Any, size: int, metadata: dict[str, str], timeout: float) -> None:
    """One PUT of ``size`` bytes read from the binary file ``body`` (one attempt)."""
    bucket, key = bucket_key(url)
    client = s3_client(timeout)
    _s3_call(
        url,
        lambda: client.put_object(
            Bucket=bucket, Key=key, Body=body, ContentLength=size, Metadata=metadata
        ),
    )


def put_file(
    url: str, path: str | os.PathLike[str], metadata: dict[str, str], retry: Retry
) -> None:
    """Upload the local file ``path`` as the object ``url`` with ``metadata``; a failed PUT is
    sent again whole (it left no object), at most ``retry.attempts`` times."""
    check_url(url)
    nbytes = os.path.getsize(path)
    if nbytes > MAX_PUT:
        raise StorageError(
            f"{path}: {nbytes} bytes is more than one S3 PUT takes (5 GiB); extract with a "
            "smaller --shard-size"
        )

    def put() -> None:
        with open(path, "rb") as body:
            put_object(url, body, nbytes, metadata, retry.timeout)

    _retried(url, "upload", retry, put)


def list_names(prefix: str, retry: Retry) -> dict[str, int]:
    """Name -> size of the objects directly under the S3 prefix ``prefix`` (a folder); fails
    with the fix when the bucket is missing or access is denied."""
    bucket, key = bucket_key(prefix)
    key = key.rstrip("/") + "/" if key.strip("/") else ""
    client = s3_client(retry.timeout)
    paginator = client.get_paginator("list_objects_v2")

    def listing() -> dict[str, int]:
        found = {}
        for page in paginator.paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
            for item in page.get("Contents", []):
                found[item["Key"][len(key) :]] = int(item["Size"])
        return found

    try:
        return dict(_retried(prefix, "listing", retry, lambda: _s3_call(prefix, listing)))
    except NotFound as exc:
        raise StorageError(f"{exc} (create the bucket, or check the URL)") from None


def delete(url: str, retry: Retry) -> None:
    """Delete the S3 object ``url`` (nothing when it is not there)."""
    bucket, key = bucket_key(url)
    client = s3_client(retry.timeout)
    _retried(
        url,
        "delete",
        retry,
        lambda: _s3_call(url, lambda: client.delete_object(Bucket=bucket, Key=key)),
    )
