"""Training faults that used to pass silently or end in a traceback: shards whose samples are
all (or too many) corrupt, an --out that is a file or not writable, a damaged last.pt, a
garbage --pretrained. Each is injected for real and must stop with `error: <file>: ...`."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import webdataset as wds
from test_train_data import write_region_shards  # tests/ is on sys.path under pytest
from typer.testing import CliRunner

from training.cli import app
from training.config import TrainConfig
from training.errors import TrainError
from training.train import train

pytestmark = [
    pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

TINY: dict[str, Any] = dict(
    batch_size=36, patch_size=28, grid=3, optimizer="adamw", warmup_epochs=0, workers=0
)
TINY_ARGS = [
    "--batch-size", "36", "--patch-size", "28", "--optimizer", "adamw", "--warmup-epochs", "0",
    "--workers", "0", "--device", "cpu", "--no-progress", "--epochs", "1",
]  # fmt: skip


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]


def _drop_root_file_override() -> None:
    """Make this (root) process obey file permissions: clear CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from its effective capabilities (Linux capset, version 3)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0].effective &= ~((1 << 1) | (1 << 2))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def obeying_permissions(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked child that cannot write a folder of mode 0o555, even as root (it
    drops root's permission override first). Returns its result; its error fails the test."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            if os.geteuid() == 0:
                _drop_root_file_override()
            send.send(("ok", fn()))
        except BaseException as exc:  # handed to the parent
            send.send(("error", f"{type(exc).__name__}: {exc}"))

    proc = ctx.Process(target=child)
    proc.start()
    if not receive.poll(120):
        proc.kill()
        raise TimeoutError("the child process did not answer")
    status, value = receive.recv()
    proc.join()
    if status != "ok":
        raise AssertionError(f"in the child process: {value}")
    return value


def read_only_folder(parent: Path) -> Path:
    """An existing folder of mode 0o555: not writable by a process that obeys permissions
    (`obeying_permissions`)."""
    folder = parent / "read-only"
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    return folder


def corrupt(folder: Path, keys: set[str] | None = None) -> list[str]:
    """Truncate the JPEG of every sample (or those in ``keys``) of the shards in ``folder``."""
    hit = []
    for shard in sorted(folder.glob("*.tar")):
        samples = list(wds.tarfile_samples([{"url": str(shard)}]))
        for s in samples:
            if keys is None or s["__key__"] in keys:
                s["jpg"] = s["jpg"][:100]
                hit.append(s["__key__"])
        with wds.TarWriter(str(shard), encoder=False) as sink:
            for s in samples:
                sink.write({k: v for k, v in s.items() if k != "__url__"})
    return hit


@pytest.fixture(scope="module")
def good_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good") / "training"
    write_region_shards(folder, 8, region=96, shard_size=8, seed=5)
    return folder


def quiet(message: str) -> None:
    pass


def invoke(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(app, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


def test_an_epoch_where_every_sample_is_corrupt_stops_and_saves_no_weights(tmp_path):
    folder = tmp_path / "training"
    write_region_shards(folder, 16, region=96, shard_size=8, seed=3)
    assert len(corrupt(folder)) == 16  # 16 bad samples: fewer than --max-bad 100
    out = tmp_path / "run"
    cfg = TrainConfig(
        train=str(folder), out=str(out), epochs=1, progress=False, device="cpu", **TINY
    )
    with pytest.raises(TrainError, match=r"epoch 1 had no valid train sample") as err:
        train(cfg, log=quiet)
    assert str(folder) in str(err.value) and "bad-samples-rank" in str(err.value)
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()
    assert len((out / "bad-samples-rank0.txt").read_text().splitlines()) == 16


def test_a_share_of_corrupt_samples_above_max_bad_fraction_stops(tmp_path):
    folder = tmp_path / "training"
    write_region_shards(folder, 8, region=96, shard_size=8, seed=4)
    corrupt(folder, {"s00002", "s00005"})  # 2 of 8 = 25 %, far below --max-bad 100
    base: dict[str, Any] = dict(TINY, train=str(folder), epochs=1, progress=False, device="cpu")
    with pytest.raises(TrainError, match=r"2 of 8 samples \(25.0%\).*--max-bad-fraction 0.1"):
        train(TrainConfig(out=str(tmp_path / "strict"), max_bad_fraction=0.1, **base), quiet)
    assert not (tmp_path / "strict" / "last.pt").exists()
    ran = train(TrainConfig(out=str(tmp_path / "lenient"), max_bad_fraction=0.3, **base), quiet)
    assert ran["history"][0]["bad_samples"] == 2 and (tmp_path / "lenient" / "last.pt").exists()
    code, output = invoke(["train", "--train", str(folder), "--out", str(tmp_path / "cli"),
                           "--max-bad-fraction", "2", *TINY_ARGS])  # fmt: skip
    assert code == 2 and "--max-bad-fraction 2.0" in output


def test_out_that_is_a_file_stops_with_a_message(good_shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "run"):
        code, output = invoke(["train", "--train", str(good_shards), "--out", str(out), *TINY_ARGS])
        assert code == 2 and f"error: {out}: --out" in output, output
        assert "Traceback" not in output


def test_unwritable_out_is_found_before_the_first_epoch(good_shards, tmp_path, monkeypatch):
    out = read_only_folder(tmp_path)

    def no_epoch(run: Any, model: Any, epoch: int, bar: Any) -> dict:
        raise AssertionError(f"epoch {epoch + 1} started with an unwritable --out")

    monkeypatch.setattr("training.train.train_epoch", no_epoch)
    code, output = obeying_permissions(
        lambda: invoke(["train", "--train", str(good_shards), "--out", str(out), *TINY_ARGS])
    )
    assert code == 2, output
    assert f"error: {out}: --out cannot be written (Permission denied)" in output
    assert "Traceback" not in output and not list(out.iterdir())


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "incomplete"])
def test_a_damaged_last_pt_with_resume_names_the_file(damage, good_shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    last = out / "last.pt"
    if damage == "empty":
        last.write_bytes(b"")
        expect = "the file is empty"
    elif damage == "truncated":
        torch.save({"format": 1, "model": {"w": torch.zeros(1000)}}, last)
        last.write_bytes(last.read_bytes()[:2000])
        expect = "truncated"
    elif damage == "garbage":
        last.write_bytes(random.Random(0).randbytes(3000))
        expect = "not a torch file"
    else:  # a torch file of the right format that lacks the run's state
        torch.save({"format": 1, "model": {}}, last)
        expect = "not a complete training checkpoint"
    code, output = invoke(
        ["train", "--train", str(good_shards), "--out", str(out), "--resume", *TINY_ARGS]
    )
    assert code == 2, output
    assert f"error: {last}: " in output and expect in output and "(--resume: " in output, output
    assert "Traceback" not in output and "Aborted" not in output


def test_a_garbage_pretrained_file_names_the_file(good_shards, tmp_path):
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"\x80\x02" + random.Random(1).randbytes(2000))
    code, output = invoke(["train", "--train", str(good_shards), "--out", str(tmp_path / "run"),
                           "--pretrained", str(weights), *TINY_ARGS])  # fmt: skip
    assert code == 2, output
    assert f"error: {weights}: not a readable torch checkpoint" in output
    assert "(--pretrained: " in output and "Traceback" not in output
