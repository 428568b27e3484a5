"""Cohort inference on several processes (training/infer/cohort.py): every slide runs exactly
once over the ranks, largest first; a rerun skips slides whose outputs are complete for the
same slide, checkpoint and options; one bad slide fails alone and the summary written by the
last rank to finish lists it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_infer_faults import checkpoint as model_checkpoint
from typer.testing import CliRunner

from etl.synth.scene import make_scene
from etl.synth.slide import write_slide
from training.cli import app
from training.infer.cohort import assign

pytestmark = pytest.mark.usefixtures("one_torch_thread")
checkpoint = model_checkpoint  # the fixture of tests/test_infer_faults.py
REPO = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--no-progress", "--tile-size", "1024"]
SIZES = {"a": (512, 384), "b": (384, 256), "c": (640, 384), "d": (256, 256)}


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Four small synthetic slides of different sizes, and a garbage file with a slide suffix."""
    folder = tmp_path_factory.mktemp("cohort")
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        write_slide(folder / f"{name}.tif", make_scene(w, h, mpp=2.0, has_tumor=True, seed=(i, 1)))
    (folder / "zz_garbage.tif").write_bytes(b"not a slide at all" * 100)
    return folder


def infer(slides: Path, ckpt: Path, out: Path, *extra: Any) -> tuple[int, str]:
    args = ["infer", str(slides), "--checkpoint", str(ckpt), "--out", str(out), *FAST]
    result = CliRunner().invoke(app, args + [str(e) for e in extra])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.output


def reports(out: Path, world: int = 2) -> list[dict]:
    return [json.loads((out / f"infer-rank{r}-of-{world}.json").read_text()) for r in range(world)]


def test_largest_slides_first_each_to_the_least_loaded_rank(tmp_path):
    paths = []
    for name, size in {"s1": 10, "s2": 9, "s3": 8, "s4": 1, "s5": 1}.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(b"x" * size)
    assert assign(paths, 2) == [0, 1, 1, 0, 0]  # 10 + 1 + 1 against 9 + 8
    assert assign(paths, 1) == [0] * 5 and sorted(assign(paths, 5)) == [0, 1, 2, 3, 4]


def test_two_processes_cover_every_slide_once_and_a_rerun_skips_them(slides, checkpoint, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "training.cli", "infer", str(slides), "--checkpoint"]
    cmd += [str(checkpoint), "--out", str(out), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    done = reports(out)
    garbage = str(slides / "zz_garbage.tif")
    owner = next(r for r in (0, 1) if garbage in done[r]["slides"])
    # the bad slide fails alone: its rank exits 1, and so does the rank that merges the summary
    assert codes[owner] == 1 and "zz_garbage.tif" not in outputs[1 - owner].split("cohort of")[0]
    assigned = done[0]["slides"] + done[1]["slides"]
    assert sorted(assigned) == sorted(str(p) for p in slides.iterdir())  # each exactly once
    assert sorted(Path(p).name for p in done[0]["done"] + done[1]["done"]) == [
        f"{n}.prob.json" for n in sorted(SIZES)
    ]
    assert str(slides / "c.tif") in done[0]["slides"]  # the largest goes first, to rank 0
    summary = json.loads((out / "infer-summary.json").read_text())
    assert summary["slides"] == 5 and summary["done"] == 4 and summary["skipped"] == 0
    assert len(summary["failed"]) == 1 and "zz_garbage.tif" in summary["failed"][0]
    assert "cohort of 5 slide(s) on 2 processes" in "".join(outputs)
    for name in SIZES:
        assert json.loads((out / f"{name}.prob.json").read_text())["slide"] == str(
            (slides / f"{name}.tif").resolve()
        )
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.prob.*")}

    # the same cohort again, ranks given as options (one after the other): nothing recomputed
    for rank in (0, 1):
        code, text = infer(slides, checkpoint, out, "--rank", rank, "--world", 2)
    assert code == 1 and "cohort of 5 slide(s) on 2 processes: 4 done (4 skipped" in text
    again = reports(out)
    assert sum(len(r["skipped"]) for r in again) == 4 and not any(r["done"] for r in again)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.prob.*")} == stamps
    assert "1 of 5 slide(s) failed, 4 done" in text and "zz_garbage.tif" in text


def test_a_rerun_with_another_option_or_checkpoint_runs_again(slides, checkpoint, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    for name in ("a", "b"):
        (one / f"{name}.tif").symlink_to(slides / f"{name}.tif")
    out = tmp_path / "out"
    assert infer(one, checkpoint, out)[0] == 0
    code, text = infer(one, checkpoint, out)
    assert code == 0 and "2 slide(s) skipped" in text and ": map " not in text
    code, text = infer(one, checkpoint, out, "--nms-threshold", 0.9)
    assert code == 0 and "skipped" not in text and text.count(": map ") == 2, text
    other = tmp_path / "other.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {
        k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()
    }
    torch.save(state, other)
    code, text = infer(one, other, out, "--nms-threshold", 0.9)
    assert code == 0 and "skipped" not in text and text.count(": map ") == 2, text
    (one / "a.tif").unlink()  # another file under the same name: runs again
    write_slide(one / "a.tif", make_scene(384, 384, mpp=2.0, has_tumor=False, seed=(9, 9)))
    code, text = infer(one, other, out, "--nms-threshold", 0.9)
    assert code == 0 and "1 slide(s) skipped" in text and text.count(": map ") == 1


def test_rank_options_are_checked():
    result = CliRunner().invoke(app, ["infer", "x.tif", "--rank", "2", "--world", "2"])
    assert result.exit_code == 2 and "0 <= rank < world" in result.output
    result = CliRunner().invoke(app, ["infer", "x.tif", "--rank", "1"])
    assert result.exit_code == 2 and "give both" in result.output
