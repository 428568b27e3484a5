"""`patchetl extract --out s3://bucket/prefix` against moto's standalone S3 server on 127.0.0.1
(tests/conftest.py): each split is extracted into a local stage, then uploaded shard by shard
and its manifest last; a rerun skips what is there; a `patchetl extract` killed (SIGKILL) in
the middle of an object's upload leaves no partial object and no manifest, and the same
command then ends complete; training reads the published split; with a dask cluster whose
workers cannot write the client's stage, the workers send their parts back instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import etl.extract.publish as publish
import etl.extract.run as run_module
import etl.extract.shards as shards
import etl.storage as storage
from etl.cli import app
from etl.extract.shards import sha256_file
from etl.synth.cohort import synth_cohort

REGION = 192
BUCKET = "patchetl-test"
SHARDS = [f"training-{i:06d}.tar" for i in range(5)]  # 24 regions, 5 per shard

# Run as `python WRAPPER ARGS`: `patchetl ARGS` uploading one object at a time, except that
# the process SIGKILLs itself half-way through sending the body of the KILL_AT-th PUT.
WRAPPER = """
import functools, io, os, runpy, signal
import etl.extract.publish as publish
import etl.storage as storage
import etl.storage as storage

real_put, puts = storage.put_object, []

class Dying(io.RawIOBase):
    def __init__(self, fh, size):
        self.fh, self.size, self.sent = fh, size, 0
    def readable(self):
        return True
    def seekable(self):
        return True
    def seek(self, *args):
        return self.fh.seek(*args)
    def tell(self):
        return self.fh.tell()
    def read(self, n=-1):
        data = self.fh.read(8192)  # small reads: the body goes out in pieces
        self.sent += len(data)
        if self.sent > self.size * 3 // 2:  # botocore reads once for its checksum, then sends
            os.kill(os.getpid(), signal.SIGKILL)
        return data

def put_object(url, body, size, metadata, timeout):
    puts.append(url)
    if len(puts) == int(os.environ["KILL_AT"]):
        body = Dying(body, size)
    return real_put(url, body, size, metadata, timeout)

storage.put_object = put_object
publish.publish_split = functools.partial(publish.publish_split, threads=1)
runpy.run_module("training.cli", run_name="__main__")
"""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two slides, 24 regions in one split, and their shards extracted locally (reference)."""
    root = tmp_path_factory.mktemp("cohort")
    synth_cohort(
        root,
        n_slides=2,
        width=1024,
        height=1024,
        tumor_fraction=0.5,
        seed=5,
        mpp=1.0,
        regions_per_slide=12,
        region_size=REGION,
        val_fraction=0.0,
    )
    result = CliRunner().invoke(app, args(root, str(root / "local")))
    assert result.exit_code == 0, result.output
    return root


def args(root: Path, out: str, *more: str) -> list[str]:
    return [
        "extract", "--json", str(root / "dataset_0.json"), "--data-root", str(root),
        "--out", out, "--region-size", str(REGION), "--shard-size", "5", "--workers", "1",
        "--no-progress", *more,
    ]  # fmt: skip


def objects(client, prefix: str) -> dict[str, bytes]:
    """Name -> bytes of every object under `prefix`/."""
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {
        o["Key"][len(prefix) + 1 :]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        for o in listing
    }


def local_files(cohort: Path) -> dict[str, bytes]:
    folder = cohort / "local" / "training"
    return {name: (folder / name).read_bytes() for name in [*SHARDS, "manifest.json"]}


@pytest.fixture
def put_order(monkeypatch):
    """The object names PUT by publish, in order (the real uploads still happen)."""
    order: list[str] = []
    real = storage.put_file

    def recording(url, path, metadata, retry):
        real(url, path, metadata, retry)
        order.append(url.rsplit("/", 1)[1])

    monkeypatch.setattr(publish, "put_file", recording)
    return order


def test_extract_publishes_the_split_manifest_last_and_a_rerun_uploads_only_what_is_wrong(
    cohort, moto_s3, tmp_path, put_order
):
    url, stage = f"s3://{BUCKET}/a", str(tmp_path / "stage")
    result = CliRunner().invoke(app, args(cohort, url, "--stage", stage))
    assert result.exit_code == 0, result.output
    assert "5 shard(s) uploaded, 0 already there; manifest.json uploaded" in result.output
    assert objects(moto_s3, "a/training") == local_files(cohort)  # byte for byte
    assert put_order[-1] == "manifest.json" and sorted(put_order[:-1]) == SHARDS
    head = moto_s3.head_object(Bucket=BUCKET, Key="a/training/training-000002.tar")
    assert head["Metadata"]["sha256"] == sha256_file(cohort / "local/training/training-000002.tar")

    put_order.clear()
    result = CliRunner().invoke(app, args(cohort, url, "--stage", stage))
    assert "0 shard(s) uploaded, 5 already there; manifest.json unchanged" in result.output
    assert put_order == []
    # one object cut short, one replaced without its metadata, one deleted
    key = "a/training/training-00000{}.tar"
    moto_s3.put_object(Bucket=BUCKET, Key=key.format(0), Body=local_files(cohort)[SHARDS[0]][:-9])
    moto_s3.put_object(Bucket=BUCKET, Key=key.format(1), Body=local_files(cohort)[SHARDS[1]])
    moto_s3.delete_object(Bucket=BUCKET, Key=key.format(4))
    result = CliRunner().invoke(app, args(cohort, url, "--stage", stage))
    assert result.exit_code == 0, result.output
    assert "3 shard(s) uploaded, 2 already there; manifest.json unchanged" in result.output
    assert sorted(put_order) == [SHARDS[0], SHARDS[1], SHARDS[4]]
    assert objects(moto_s3, "a/training") == local_files(cohort)


def test_a_prefix_holding_another_extraction_is_refused_then_replaced_with_overwrite(
    cohort, moto_s3, tmp_path
):
    url, stage = f"s3://{BUCKET}/b", str(tmp_path / "stage")
    result = CliRunner().invoke(app, [*args(cohort, url, "--stage", stage), "--shard-size", "3"])
    assert result.exit_code == 0, result.output
    assert len(objects(moto_s3, "b/training")) == 9  # 8 shards of 3 and the manifest
    result = CliRunner().invoke(app, args(cohort, url, "--stage", stage, "--overwrite"))
    assert result.exit_code == 0, result.output
    other = tmp_path / "other"
    result = CliRunner().invoke(app, [*args(cohort, url, "--stage", str(other)), "--seed", "3"])
    assert result.exit_code == 2
    assert f"refusing to publish to {url}/training: its manifest.json lists other" in result.output
    assert objects(moto_s3, "b/training") == local_files(cohort)  # stale shards 5-7 deleted


def test_extract_killed_mid_upload_leaves_no_partial_object_and_a_rerun_ends_complete(
    cohort, moto_s3, tmp_path, put_order
):
    """A real SIGKILL of `patchetl extract` half-way through sending shard 2's body."""
    url = f"s3://{BUCKET}/c"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "KILL_AT": "3", "TMPDIR": str(tmp_path)}  # the default stage there
    dead = subprocess.run(
        [sys.executable, str(wrapper), *args(cohort, url)], env=env, capture_output=True, text=True
    )
    assert dead.returncode == -9, dead.stdout + dead.stderr
    seen = objects(moto_s3, "c/training")
    assert sorted(seen) == SHARDS[:2]  # no manifest, nothing of shard 2: readers see no split
    assert all(seen[name] == local_files(cohort)[name] for name in seen)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp_path))
        mp.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
        staged = publish.stage_folder(url, None)
        assert staged.parent.parent == tmp_path and (staged / "training/manifest.json").is_file()
        result = CliRunner().invoke(app, args(cohort, url))
    assert result.exit_code == 0, result.output
    assert "3 shard(s) uploaded, 2 already there; manifest.json uploaded" in result.output
    assert put_order[-1] == "manifest.json" and sorted(put_order[:-1]) == SHARDS[2:]
    assert objects(moto_s3, "c/training") == local_files(cohort)


def test_training_reads_the_published_split(cohort, moto_s3, tmp_path):
    torch = pytest.importorskip("torch")
    from training.cli import app as train_app

    url = f"s3://{BUCKET}/d"
    result = CliRunner().invoke(app, args(cohort, url, "--stage", str(tmp_path / "stage")))
    assert result.exit_code == 0, result.output
    torch.set_num_threads(1)
    out = tmp_path / "run"
    argv = ["train", "--train", f"{url}/training", "--out", str(out), "--epochs", "1"]
    argv += ["--device", "cpu", "--batch-size", "36", "--patch-size", "28", "--workers", "0"]
    result = CliRunner().invoke(train_app, [*argv, "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = (out / "metrics.csv").read_text().splitlines()
    header, row = rows[0].split(","), rows[1].split(",")
    assert int(float(row[header.index("train_patches")])) == 24 * 9


@pytest.mark.parametrize(
    "more, message",
    [
        (["--out", "http://data.lab/x"], "extract publishes to s3://bucket/prefix only"),
        (["--out", "s3://u:s3cr3t@b/x"], "a password in the URL is refused"),
        (["--stage", "st"], "--stage is only for --out s3://"),
        (["--out", "s3://no-such-bucket/x"], "s3://no-such-bucket/x: no such object"),
    ],
)
def test_bad_publish_options_stop_before_any_work_without_secrets(
    cohort, moto_s3, tmp_path, monkeypatch, more, message
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*args(cohort, "unused"), *more])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "s3cr3t" not in result.output and "very-secret-key" not in result.output
    assert not list(tmp_path.iterdir())  # no stage, no folder named after the URL
    assert json.loads((cohort / "local/training/manifest.json").read_text())["shards"]


# A dask worker preload: the worker's temporary folder is WORKER_TMP, and an audit hook logs
# (to LOG) every file the worker opens for writing and refuses any under STAGE, so a worker
# that wrote its part into the client's stage (a shared file system) fails.
PRELOAD = """
import os, sys, tempfile
tempfile.tempdir = {worker_tmp!r}
LOG = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

def hook(event, args):
    if event != "open" or not isinstance(args[0], (str, os.PathLike)):
        return
    writing = any(c in (args[1] or "") for c in "wax+") or args[2] & (os.O_WRONLY | os.O_RDWR)
    path = os.path.realpath(os.fspath(args[0]))
    if writing and path.startswith({stage!r}):
        os.write(LOG, f"stage {{path}}\\n".encode())
        raise PermissionError(13, "this worker cannot write the client's stage", path)
    if writing and path.startswith({worker_tmp!r}):
        os.write(LOG, f"tmp {{path}}\\n".encode())

sys.addaudithook(hook)
"""


def test_dask_workers_send_their_parts_back_and_need_no_shared_stage(
    cohort, moto_s3, tmp_path, monkeypatch
):
    """--backend dask --scheduler without --stage: workers write each part into their own
    temporary folder (removed) and return it; the client stores it in its stage and mixes."""
    distributed = pytest.importorskip("dask.distributed")
    url = f"s3://{BUCKET}/e"
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
    stage = os.path.realpath(publish.stage_folder(url, None))
    worker_tmp, log = tmp_path / "worker-tmp", tmp_path / "writes.log"
    worker_tmp.mkdir()
    preload = tmp_path / "preload.py"
    preload.write_text(PRELOAD.format(worker_tmp=str(worker_tmp), log=str(log), stage=stage))
    stored: list[Path] = []
    real_store = shards.store_part

    def storing(parts_dir, index, data):
        stored.append(Path(parts_dir) / f"{index['part_id']}.tar")
        return real_store(parts_dir, index, data)

    monkeypatch.setattr(run_module, "store_part", storing)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, preload=[str(preload)]
    ) as cluster:
        more = ["--backend", "dask", "--scheduler", cluster.scheduler_address]
        result = CliRunner().invoke(app, args(cohort, url, *more))
        assert result.exit_code == 0, result.output
        assert "5 shard(s) uploaded, 0 already there; manifest.json uploaded" in result.output
        assert objects(moto_s3, "e/training") == local_files(cohort)  # as a local run, bytes
        writes = log.read_text().splitlines()
        assert not [w for w in writes if w.startswith("stage")]
        # each part tar was written (as `.<part>.tar.tmp-<pid>`) in a worker's temporary folder
        sent = {Path(w.split()[1]).name for w in writes if ".tar.tmp-" in w}  # (io + FileIO)
        assert stored and sorted(n[1:].split(".tmp-")[0] for n in sent) == sorted(
            p.name for p in stored
        ), writes
        assert all(p.parent == Path(stage) / "training/.parts" for p in stored)
        assert not list(worker_tmp.glob("patchetl-part-*"))  # each worker removed its part
        # a rerun finds the split finished in the stage and published: no worker reads a part
        stored.clear()
        result = CliRunner().invoke(app, args(cohort, url, *more))
    assert result.exit_code == 0, result.output
    assert "0 shard(s) uploaded, 5 already there; manifest.json unchanged" in result.output
    assert stored == [] and log.read_text().splitlines() == writes
