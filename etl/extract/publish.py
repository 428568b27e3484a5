"""Publish finished splits to S3 (`patchetl extract --out s3://bucket/prefix`).

Extraction runs into a local stage folder (`stage_folder`) exactly as into a local --out
(resumable, atomic, locked); then `publish_split` uploads each finished split to
`<prefix>/<split>/`. Contracts:

- **Readers never see a partial split**: readers start from `manifest.json`, and it is
  uploaded last, once every shard it lists is there with its bytes. Each object is one PUT,
  which S3 makes visible whole or not at all: a killed upload leaves no object, never part of
  one, and a shard appears only under its final name.
- **Reruns skip what is there**: every object carries its sha256 as metadata
  (`x-amz-meta-sha256`, the manifest's value); an object whose size and stored sha256 are the
  manifest's is skipped, any other (missing, cut, of another run, without the metadata) is
  uploaded again. So a run killed mid-upload ends complete when the same command runs again
  (the stage still holds the finished split; extract finds it done and only checks it).
- **Another extraction at the prefix** (a `manifest.json` listing other shards) is refused
  unless `--overwrite`, which deletes that manifest first, so readers see no split rather than
  a mix while the new one goes up. Objects named as this split's shards that the manifest does
  not list are deleted before the manifest goes up; nothing else at the prefix is touched.
- Credentials come from the AWS environment only (`etl.storage`); messages show redacted URLs.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etl.errors import PatchetlError
from etl.extract.run import folder_lock
from etl.extract.shards import ShardRecord, is_shard_name, sha256_file
from etl.storage import (
    NotFound,
    Retry,
    StorageError,
    delete,
    head,
    join,
    list_names,
    put_file,
    read_bytes,
    redact,
)

UPLOAD_RETRY = Retry(attempts=4, timeout=60.0, backoff=1.0)
THREADS = 4  # objects uploaded at once


class PublishError(PatchetlError, RuntimeError):
    """A split that could not be published; the message says why and how to go on."""


@dataclass
class Published:
    """What `publish_split` did at one split prefix."""

    split: str
    url: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    manifest_uploaded: bool = False
    seconds: float = 0.0


def stage_folder(out: str, stage: Path | None) -> Path:
    """Where extraction for ``out`` (an s3:// prefix) writes first: ``stage``, else a folder
    under the system temp named by a hash of ``out``, so the same command finds it again."""
    if stage is not None:
        return stage
    digest = hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "patchetl-stage" / digest


def check_target(out: str, retry: Retry = UPLOAD_RETRY) -> None:
    """Before any work: the bucket exists and the environment's credentials may list it."""
    list_names(out, retry)


def publish_split(
    folder: Path,
    url: str,
    *,
    overwrite: bool = False,
    retry: Retry = UPLOAD_RETRY,
    threads: int = THREADS,
) -> Published:
    """Upload the finished split in ``folder`` to the prefix ``url``, its manifest last (see
    the module for what is skipped, refused and deleted)."""
    start = time.perf_counter()
    data = (folder / "manifest.json").read_bytes()
    manifest = json.loads(data)
    done = Published(manifest["split"], url)
    try:
        with folder_lock(folder):
            _clear_other_split(url, manifest, overwrite, retry)
            present = list_names(url, retry)
            records: list[ShardRecord] = manifest["shards"]
            with ThreadPoolExecutor(max(1, threads)) as pool:
                sent = list(pool.map(lambda r: _upload(folder, url, r, present, retry), records))
            for record, uploaded in zip(records, sent, strict=True):
                (done.uploaded if uploaded else done.skipped).append(record["name"])
            listed = {r["name"] for r in records}
            for name in sorted(present):
                if is_shard_name(done.split, name) and name not in listed:
                    delete(join(url, name), retry)
                    done.deleted.append(name)
            done.manifest_uploaded = _upload_manifest(folder, url, data, retry)
    except StorageError as exc:
        raise PublishError(
            f"publishing {folder} to {redact(url)} stopped: {exc}. Its manifest.json was not "
            "uploaded, so readers do not see the split; run the same command again to finish "
            "(objects already there are skipped)"
        ) from None
    done.seconds = time.perf_counter() - start
    return done


def _clear_other_split(url: str, manifest: dict[str, Any], overwrite: bool, retry: Retry) -> None:
    """Refuse (or, with ``overwrite``, unpublish) a prefix whose manifest lists other shards."""
    target = join(url, "manifest.json")
    try:
        remote = json.loads(read_bytes(target, retry))
    except NotFound:
        return
    except ValueError:
        remote = None
    if isinstance(remote, dict) and _shards(remote) == _shards(manifest):
        return
    if not overwrite:
        raise PublishError(
            f"refusing to publish to {redact(url)}: its manifest.json lists other shards (another "
            "extraction). Use another --out, or --overwrite to replace it (its manifest is "
            "deleted first, so readers never see a mix)"
        )
    delete(target, retry)


def _shards(manifest: dict[str, Any]) -> list[tuple[Any, Any, Any]]:
    return [(s.get("name"), s.get("bytes"), s.get("sha256")) for s in manifest.get("shards", [])]


def _upload(
    folder: Path, url: str, record: ShardRecord, present: dict[str, int], retry: Retry
) -> bool:
    """Upload one shard unless it is there with its size and sha256; whether it was sent."""
    target = join(url, record["name"])
    if present.get(record["name"]) == record["bytes"]:
        info = head(target, retry)
        if info is not None and info.metadata.get("sha256") == record["sha256"]:
            return False
    put_file(target, folder / record["name"], {"sha256": record["sha256"]}, retry)
    return True


def _upload_manifest(folder: Path, url: str, data: bytes, retry: Retry) -> bool:
    """The manifest, last; skipped when the same bytes are there already."""
    digest = hashlib.sha256(data).hexdigest()
    target = join(url, "manifest.json")
    info = head(target, retry)
    if info is not None and info.size == len(data) and info.metadata.get("sha256") == digest:
        return False
    path = folder / "manifest.json"
    if sha256_file(path) != digest:  # rewritten since it was read: another run is at work
        raise PublishError(f"{path} changed while it was being published; run the command again")
    put_file(target, path, {"sha256": digest}, retry)
    return True
