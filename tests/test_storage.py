"""Shards read from URLs (etl/storage.py through training.data.stream): a real HTTP server and
an S3-compatible server (moto's standalone server) on 127.0.0.1, started here and stopped after.

Training and patch evaluation read the same samples from http://, s3:// and pipe: as from the
local folder; a server that drops the connection mid-shard is resumed with a range request; one
that always drops, or stalls, gives bounded retries and then bad slots, never a hang; a missing
manifest or shard stops `patchetl train` before the first step (exit 2), and no credential or
signature shows in any message.
"""

from __future__ import annotations

import functools
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import TINY as TINY_OPTIONS
from test_train import quiet, read_csv
from test_train_data import epoch_keys, write_region_shards
from typer.testing import CliRunner

from etl.storage import Retry, StorageError, open_url, read_bytes, redact
from training.cli import app
from training.config import ShardReads, TrainConfig
from training.data.stream import RegionStream, ShardError, make_loader, open_shards
from training.errors import TrainError
from training.patch_eval import evaluate_patches
from training.train import train

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning"),
]
TINY: dict[str, Any] = dict(TINY_OPTIONS)  # the trainer's tiny geometry (tests/test_train.py)
FAST = Retry(attempts=3, timeout=5.0, backoff=0.01)
SHARD_FILES = ["training-000000.tar", "training-000001.tar", "training-000002.tar"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A training split (12 regions: shards of 5, 5, 2) and a validation split (6), local."""
    root = tmp_path_factory.mktemp("shards")
    write_region_shards(root / "training", 12, region=96, shard_size=5, seed=1)
    write_region_shards(root / "validation", 6, region=96, shard_size=4, seed=2, split="validation")
    return root


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(handler) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def http_root(root):
    """Python's own http.server (no range support) serving the shard folder."""
    server = serve(functools.partial(Quiet, directory=str(root)))
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def s3_root(root, moto_s3):
    """moto's standalone S3 server (tests/conftest.py); the splits uploaded with boto3."""
    for split in ("training", "validation"):
        for f in sorted((root / split).iterdir()):
            moto_s3.upload_file(str(f), "patchetl-test", f"cohort/{split}/{f.name}")
    return "s3://patchetl-test/cohort", moto_s3


def train_once(train_src: str, val_src: str, out: Path, **kw) -> dict:
    cfg = TrainConfig(train=train_src, val=val_src, out=str(out), epochs=1, **{**TINY, **kw})
    train(cfg, log=quiet)
    return read_csv(out / "metrics.csv")[0]


SAME = ("train_loss", "train_patches", "train_steps", "val_loss", "val_acc", "val_auc")


@pytest.fixture(scope="module")
def local_run(root, tmp_path_factory):
    """One epoch on the local folders, and the patch-level evaluation of its checkpoint."""
    out = tmp_path_factory.mktemp("local") / "run"
    row = train_once(str(root / "training"), str(root / "validation"), out)
    patch = evaluate_patches(out / "last.pt", root / "validation", device="cpu")
    return row, patch, out / "last.pt"


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_url_split_trains_and_evaluates_exactly_like_the_local_folder(
    kind, root, local_run, tmp_path, request
):
    base = (
        request.getfixturevalue("http_root")
        if kind == "http"
        else request.getfixturevalue("s3_root")[0]
    )
    remote, local = open_shards(f"{base}/training"), open_shards(root / "training")
    assert remote.counts == local.counts == (5, 5, 2)
    assert remote.region_size == 96 and remote.source == f"{base}/training"
    # two DataLoader worker processes reading over the network: the same keys, all valid
    keys, batches = epoch_keys(remote, workers=2)
    assert keys == epoch_keys(local, workers=2)[0]
    assert all(bool(b["valid"].all()) for b in batches)
    row, patch, ckpt = local_run
    remote_row = train_once(f"{base}/training", f"{base}/validation/", tmp_path / "run")
    assert {k: remote_row[k] for k in SAME} == {k: row[k] for k in SAME}
    assert remote_row["bad_samples"] == "0"
    remote_patch = evaluate_patches(ckpt, f"{base}/validation", device="cpu")
    for k in ("auc", "accuracy", "loss", "patches", "tumor_patches", "bad_samples"):
        assert remote_patch[k] == patch[k], k
    assert remote_patch["patches"] == 6 * 9


def test_pipe_commands_and_url_patterns_read_the_same_samples(root, http_root):
    local = epoch_keys(open_shards(root / "training"))[0]
    piped = open_shards(f"pipe:cat {root}/training/training-{{000000..000002}}.tar")
    assert piped.counts == (5, 5, 2) and epoch_keys(piped)[0] == local
    pattern = open_shards(f"{http_root}/training/training-{{000000..000002}}.tar")
    assert pattern.counts == (5, 5, 2) and epoch_keys(pattern)[0] == local
    with pytest.raises(ShardError, match="not listed"):
        open_shards(f"{http_root}/training/other-{{000000..000001}}.tar")


# --------------------------------------------------------------------------- faults
class Faulty(BaseHTTPRequestHandler):
    """Serves files with range support; ``plan(path, n)`` says what request n of a file gets:
    None (the whole answer), ("drop", k) (k bytes, then the connection closes) or
    ("stall", k) (k bytes, then silence until the server stops)."""

    root: Path
    plan = staticmethod(lambda path, n: None)
    requests: dict[str, list[str | None]]
    stop: threading.Event

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        path = self.root / self.path.lstrip("/").split("?")[0]
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        found = re.match(r"bytes=(\d+)-", rng or "")
        start = int(found.group(1)) if found else 0
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not body:
            return
        seen = self.requests.setdefault(path.name, [])
        seen.append(rng)
        fault = self.plan(path.name, len(seen))
        if fault is None:
            self.wfile.write(data[start:])
            return
        kind, k = fault
        self.wfile.write(data[start : start + k])
        self.wfile.flush()
        if kind == "stall":
            self.stop.wait(60)
        self.close_connection = True


@pytest.fixture
def faulty(root):
    handlers: list[tuple[ThreadingHTTPServer, type]] = []

    def start(plan):
        handler = type(
            "Plan",
            (Faulty,),
            {"root": root, "plan": staticmethod(plan), "requests": {}, "stop": threading.Event()},
        )
        server = serve(handler)
        handlers.append((server, handler))
        return f"http://127.0.0.1:{server.server_port}", handler.requests  # type: ignore

    yield start
    for server, handler in handlers:
        handler.stop.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()


def test_connection_dropped_mid_shard_resumes_at_its_byte(root, faulty):
    url, requests = faulty(lambda name, n: ("drop", 3000) if n == 1 else None)
    shards = open_shards(f"{url}/training", FAST)
    keys, batches = epoch_keys(shards)
    assert keys == epoch_keys(open_shards(root / "training"))[0]
    assert all(bool(b["valid"].all()) for b in batches)
    for name in SHARD_FILES:  # dropped once, then resumed where it stopped
        assert requests[name] == [None, "bytes=3000-"]


def test_server_that_always_drops_gives_retries_then_bad_slots_in_bounded_time(root, faulty):
    url, requests = faulty(lambda name, n: ("drop", 3000 * n))
    shards = open_shards(f"{url}/training", FAST)
    start = time.monotonic()
    stream = RegionStream(shards, epoch=0, seed=0, train=False, regions_per_batch=4, grid=3)
    batches = list(make_loader(stream))
    assert time.monotonic() - start < 20
    assert len(batches) == len(stream)  # bad slots keep their places: steps unchanged
    valid = torch.cat([b["valid"] for b in batches])
    reasons = [r for b in batches for r in b["bad"]]
    assert valid.numel() == 12 and 0 < int((~valid).sum()) == len(reasons) < 12
    assert all("after 3 attempt(s)" in r for r in reasons)
    for name in SHARD_FILES:  # three connections, each resuming at the byte reached
        assert requests[name] == [None, "bytes=3000-", "bytes=9000-"]
    # the trainer counts them as bad samples and stops above --max-bad-fraction
    cfg = TrainConfig(
        train=f"{url}/training",
        out=str(root.parent / "dropped-run"),
        epochs=1,
        reads=ShardReads(read_attempts=3, read_backoff=0.01),
        **TINY,
    )
    with pytest.raises(TrainError, match="max-bad-fraction"):
        train(cfg, log=quiet)
    listed = (root.parent / "dropped-run" / "bad-samples-rank0.txt").read_text().splitlines()
    assert listed and all("read failed" in line and "attempt(s)" in line for line in listed)


def test_stalled_server_times_out_then_bad_slots(root, faulty):
    url, requests = faulty(lambda name, n: ("stall", 3000))
    shards = open_shards(f"{url}/training", Retry(attempts=2, timeout=0.5, backoff=0.01))
    start = time.monotonic()
    stream = RegionStream(shards, epoch=0, seed=0, train=False, regions_per_batch=4, grid=3)
    batches = list(make_loader(stream))
    assert time.monotonic() - start < 15  # 3 shards x 2 attempts x 0.5 s, no hang
    reasons = [r for b in batches for r in b["bad"]]
    assert len(batches) == len(stream) and len(reasons) >= 9
    assert all("timed out" in r and "after 2 attempt(s)" in r for r in reasons)
    assert all(len(requests[name]) == 2 for name in SHARD_FILES)


def cli_train(source: str, out: Path):
    args = ["train", "--train", source, "--out", str(out), "--epochs", "1", "--device", "cpu"]
    args += ["--batch-size", "36", "--patch-size", "28", "--workers", "0", "--no-progress"]
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def test_missing_manifest_or_shard_stops_before_training_and_hides_secrets(root, faulty, tmp_path):
    url, _ = faulty(lambda name, n: None)  # serves `root`: add a split without its shard 1
    shutil.copytree(root / "training", root / "partial")
    (root / "partial" / "training-000001.tar").unlink()
    try:
        result = cli_train(f"{url}/missing?X-Amz-Signature=s3cr3t", tmp_path / "a")
        assert result.exit_code == 2
        assert "/missing/manifest.json?***: missing" in result.output
        assert "s3cr3t" not in result.output
        result = cli_train(f"{url}/partial", tmp_path / "b")
        assert result.exit_code == 2 and "1 of 3 shard(s) cannot be read" in result.output
        assert "partial/training-000001.tar: not found (HTTP 404)" in result.output
        assert not (tmp_path / "b" / "metrics.csv").exists()
        host = url.split("//")[1]
        result = cli_train(f"http://alice:s3cr3t@{host}/training", tmp_path / "c")
        assert result.exit_code == 2 and "password in the URL is refused" in result.output
        assert "s3cr3t" not in result.output and "alice" not in result.output
    finally:
        shutil.rmtree(root / "partial")


def test_s3_missing_shard_and_prefix_are_errors_naming_the_object(s3_root):
    base, client = s3_root
    with pytest.raises(StorageError, match=r"s3://patchetl-test/nothing/manifest\.json: missing"):
        open_shards(f"{base.rsplit('/', 1)[0]}/nothing")
    body = client.get_object(Bucket="patchetl-test", Key="cohort/training/manifest.json")
    client.put_object(Bucket="patchetl-test", Key="half/manifest.json", Body=body["Body"].read())
    with pytest.raises(ShardError, match=r"3 of 3 shard\(s\).*half/training-000000.tar"):
        open_shards("s3://patchetl-test/half")


def test_redact_hides_user_information_and_query_strings():
    assert (
        redact("https://bob:pw@host:8/a/b.tar?X-Amz-Signature=abc")
        == "https://***@host:8/a/b.tar?***"
    )
    assert redact("s3://bucket/a/b.tar") == "s3://bucket/a/b.tar"
    assert redact("pipe:curl -s https://h/x.tar?token=t") == "pipe:curl -s https://h/x.tar?***"
    assert redact("/data/shards/x.tar") == "/data/shards/x.tar"
    assert (
        redact("StorageError: ('http://u:p@h/a?sig=1', 'x')")
        == "StorageError: ('http://***@h/a?***', 'x')"
    )


def test_local_pipe_reads_resume_and_fail_after_their_attempts(tmp_path):
    data = bytes(range(256)) * 4000
    (tmp_path / "f").write_bytes(data)
    assert read_bytes(f"pipe:cat {tmp_path}/f", FAST) == data
    with pytest.raises(StorageError, match=r"after 3 attempt\(s\).*status 3"):
        read_bytes("pipe:exit 3", FAST)
    with pytest.raises(StorageError, match=r"timed out|no output"):
        read_bytes("pipe:sleep 5", Retry(attempts=1, timeout=0.3, backoff=0))
    with open_url(str(tmp_path / "f"), FAST) as fh:
        assert fh.read(10) == data[:10]
