"""The training loop: learning, checkpoints + exact resume after a kill, DDP, bad samples, CLI."""

from __future__ import annotations

import csv
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from test_train_data import write_region_shards  # tests/ is on sys.path under pytest

from etl.atomic import temporary_name
from etl.evaluate.auc import binary_auc
from training.config import TrainConfig
from training.data.augment import Augment
from training.data.stream import PatchSpec
from training.errors import TrainError
from training.train import Trainer, train

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
# Tiny but real geometry: 96 px regions, 3x3 grid of 32 px cells, 28 px patches.
TINY = dict(
    batch_size=36,
    patch_size=28,
    grid=3,
    optimizer="adamw",
    lr=2e-3,
    warmup_epochs=0,
    workers=0,
    shuffle_buffer=8,
    progress=False,
    device="cpu",
)


# One thread per process: on a busy 2-core machine OpenMP threads that wait for each other
# make CPU steps 10x slower and erratic.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_region_shards(root / "training", 12, region=96, shard_size=5, seed=1)
    write_region_shards(root / "validation", 6, region=96, shard_size=4, seed=2, split="validation")
    return root


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    """An uninterrupted 2-epoch run (3 steps of 4 regions per epoch)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return out, train(config(shards, out, epochs=2), log=quiet)


def config(shards: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        train=str(shards / "training"),
        val=str(shards / "validation"),
        out=str(out),
        **{**TINY, **kw},
    )


def quiet(message: str) -> None:
    pass


def read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_rank_auc_matches_the_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert binary_auc(labels, scores) == pytest.approx(pairs)
    assert np.isnan(binary_auc(np.ones(5), np.arange(5)))


def test_short_run_lowers_the_loss_and_writes_loadable_checkpoints(shards, straight):
    out, result = straight
    losses = [row["train_loss"] for row in result["history"]]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result["history"][-1]["val_auc"] > 0.9  # purple vs pink cells: easy to learn
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(int(r["train_patches"]) == 12 * 9 and int(r["val_patches"]) == 6 * 9 for r in rows)
    assert all(0 <= float(r["data_wait"]) <= 1 and float(r["patches_per_s"]) > 0 for r in rows)
    assert all(0 < float(r["startup_s"]) < float(r["seconds"]) for r in rows)
    ckpt = torch.load(out / "last.pt", weights_only=True)  # tensors and plain values only
    assert ckpt["epoch"] == 2 and set(ckpt) >= {"model", "optimizer", "scheduler", "rng"}
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == max(range(2), key=lambda i: float(rows[i]["val_auc"])) + 1
    with pytest.raises(TrainError, match="--resume"):  # never clobbers a finished run
        train(config(shards, out, epochs=2), log=quiet)


def test_on_a_cpu_the_workers_make_the_patches(shards, tmp_path):
    """CPU training hands crops + augmentation to the DataLoader workers (validation: centre
    crops, no augmentation), so that every core works; the main process runs the model."""
    trainer = Trainer(config(shards, tmp_path / "run", epochs=1), log=quiet)
    assert trainer.data.train_stream(0).patches == PatchSpec(28, Augment(), channels_last=True)
    assert trainer.data.val_stream().patches == PatchSpec(28, Augment.off(), channels_last=True)
    plain = Trainer(
        config(shards, tmp_path / "plain", epochs=1, augment=False, channels_last=False), log=quiet
    )
    assert plain.data.train_stream(0).patches == PatchSpec(28, Augment.off(), channels_last=False)


def test_resume_after_kill_continues_exactly_from_the_checkpoint(shards, straight, tmp_path):
    """SIGKILL a run after its first checkpoint; resuming matches an uninterrupted run."""
    killed = tmp_path / "killed"
    # A forked child starts at once (no torch import); the kill is a real SIGKILL.
    proc = multiprocessing.get_context("fork").Process(
        target=train, args=(config(shards, killed, epochs=2),), kwargs={"log": quiet}
    )
    proc.start()
    deadline = time.time() + 120
    while not (killed / "last.pt").exists() and proc.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    done = torch.load(killed / "last.pt", weights_only=True)["epoch"]
    assert done == 1, "the run should have been killed part-way"
    # Whether the kill tore a write is chance: leave for sure what a kill during the
    # checkpoint's atomic write leaves, the killed process's temporary of last.pt
    # (etl.atomic.temporary_name, with the child's pid), cut part-way.
    ours = temporary_name(killed / "last.pt")
    torn = ours.with_name(ours.name.removesuffix(f"-{os.getpid()}") + f"-{proc.pid}")
    torn.write_bytes((killed / "last.pt").read_bytes()[:1000])
    assert torn in list(killed.glob("*.tmp-*"))
    messages: list[str] = []
    resumed = train(config(shards, killed, epochs=2, resume=True), log=messages.append)
    assert f"resumed from {killed / 'last.pt'} after epoch {done}" in messages[0]
    straight_out, straight_result = straight
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    for a, b in zip(resumed["history"], straight_result["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-6)
    w_resumed = torch.load(killed / "last.pt", weights_only=True)["model"]
    w_straight = torch.load(straight_out / "last.pt", weights_only=True)["model"]
    for k in w_straight:
        torch.testing.assert_close(w_resumed[k], w_straight[k], rtol=1e-4, atol=1e-5)
    assert [int(r["epoch"]) for r in read_csv(killed / "metrics.csv")] == [1, 2]
    assert not torn.exists() and not list(killed.glob("*.tmp-*"))  # the torn one was swept
    with pytest.raises(TrainError, match="--batch-size"):  # a resume must not change the run
        train(config(shards, killed, epochs=2, resume=True, batch_size=18), log=quiet)


def test_corrupt_sample_is_skipped_counted_and_max_bad_stops(tmp_path):
    folder = tmp_path / "training"
    write_region_shards(folder, 6, region=96, shard_size=6, seed=3)
    shard = folder / "training-000000.tar"
    samples = list(wds.tarfile_samples([{"url": str(shard)}]))
    samples[4]["jpg"] = samples[4]["jpg"][:100]  # truncated JPEG
    with wds.TarWriter(str(shard), encoder=False) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k != "__url__"})
    cfg = dict(TINY, train=str(folder), epochs=1, max_bad_fraction=0.5)  # 1 of 6 is bad
    result = train(TrainConfig(out=str(tmp_path / "ok"), max_bad=5, **cfg), log=quiet)
    row = result["history"][0]
    assert row["bad_samples"] == 1 and row["train_patches"] == 5 * 9 and row["train_steps"] == 2
    listed = (tmp_path / "ok" / "bad-samples-rank0.txt").read_text()
    assert samples[4]["__key__"] in listed
    with pytest.raises(TrainError, match=r"--max-bad 0.*" + samples[4]["__key__"]):
        train(TrainConfig(out=str(tmp_path / "strict"), max_bad=0, **cfg), log=quiet)


def test_ddp_two_gloo_processes_see_every_sample_once_with_equal_steps(tmp_path):
    """torchrun, 2 CPU ranks x 2 workers over 3 shards (fewer than ranks x workers)."""
    data = tmp_path / "training"
    metas = write_region_shards(data, 12, region=96, shard_size=5, seed=4)  # shards of 5, 5, 2
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training.cli",
        "train",
        "--train",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "18",
        "--patch-size",
        "28",
        "--workers",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--record-keys",
        "--warmup-epochs",
        "0",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "different step counts" not in proc.stdout + proc.stderr
    everything = sorted(m["key"] for m in metas)
    for epoch in (1, 2):
        per_rank = [
            (out / "keys" / f"train-epoch{epoch:03d}-rank{r}.txt").read_text().split()
            for r in (0, 1)
        ]
        assert len(per_rank[0]) == len(per_rank[1]) == 6
        assert sorted(per_rank[0] + per_rank[1]) == everything
    rows = read_csv(out / "metrics.csv")
    assert [int(r["train_patches"]) for r in rows] == [12 * 9, 12 * 9]  # summed over ranks
    assert int(rows[0]["train_steps"]) == 4  # per rank: 2 workers x ceil(3 / 2) batches
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


def test_extract_help_does_not_import_torch_and_train_help_works():
    code = (
        "import sys; from typer.testing import CliRunner; from training.cli import app; "
        "r = CliRunner().invoke(app, ['extract', '--help']); assert r.exit_code == 0; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=SUBPROCESS_ENV
    )
    assert out.stdout.strip() == "False", out.stderr
    from typer.testing import CliRunner

    from training.cli import app

    res = CliRunner().invoke(app, ["train", "--help"])
    assert res.exit_code == 0 and "--resume" in res.output and "--max-bad" in res.output
    res = CliRunner().invoke(app, ["train", "--train", "/nonexistent/folder", "--out", "/tmp/x"])
    assert res.exit_code == 2 and "not found" in res.output
