"""Inference faults that used to overwrite outputs, stop a batch or end in a traceback: slides
that share an output name, our own heatmap TIFFs in the slides folder, a slide only OpenSlide
reads whose tiles are corrupt, a garbage file, a slide without tissue in `check-dense`, an
--out that is a file or read-only. Each fault is injected for real."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from test_train_faults import obeying_permissions, read_only_folder
from typer.testing import CliRunner

from etl.synth.scene import make_scene
from etl.synth.slide import write_slide
from etl.wsi.formats import find_slides
from training.cli import app
from training.model import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["--device", "cpu", "--no-progress"]


def blank_slide(path: Path) -> Path:
    """A 256 x 256 tiled TIFF of bare glass: it opens and has no tissue (no model run)."""
    rng = np.random.default_rng(0)
    glass = np.clip(np.array([243, 241, 245]) + rng.normal(0, 2, (256, 256, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(
        path, glass.astype(np.uint8), tile=(256, 256), photometric="rgb", compression="zlib"
    )
    return path


def tissue_slide(path: Path) -> Path:
    """A small synthetic H&E slide (tiled JPEG TIFF) with tissue and a lesion."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_slide(path, make_scene(512, 384, mpp=2.0, has_tumor=True, seed=(7, 3)))
    return path


def corrupt_tiles(path: Path) -> Path:
    """Overwrite the bytes of every tile of every page: the header still opens, no tile reads."""
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        spans = [
            (o, n) for p in tif.pages for o, n in zip(p.dataoffsets, p.databytecounts, strict=True)
        ]
    for offset, count in spans:
        data[offset : offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Any model will do here: the faults are in the slides and folders."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"format": 1, "model": build_model().state_dict(), "patch_size": 64}, path)
    return path


def invoke(command: str, *args: Any) -> tuple[int, str]:
    res = CliRunner().invoke(app, [command, *map(str, args)])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, res.output


def sidecars(out: Path) -> dict[str, str]:
    """Output name -> the slide its sidecar names."""
    return {
        p.name.removesuffix(".prob.json"): json.loads(p.read_text())["slide"]
        for p in out.glob("*.prob.json")
    }


def test_unique_key_stem_keeps_the_first_name_and_hashes_the_later_ones():
    from etl.wsi.formats import unique_key_stem  # here: a missing helper fails this test only

    taken: dict[str, str] = {}
    assert unique_key_stem("a/s.tif", taken) == "s"
    assert unique_key_stem("a/s.tif", taken) == "s"  # the same name keeps its stem
    digest = hashlib.sha1(b"b/s.svs").hexdigest()[:8]
    assert unique_key_stem("b/s.svs", taken) == f"s-{digest}"  # extract's shard keys alike
    assert unique_key_stem("é.tif", taken) == "_" and unique_key_stem("ü.tif", taken) != "_"


def test_slides_sharing_a_name_never_share_outputs(checkpoint, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for path in (a / "s.tif", a / "s.svs", a / "é.tif", a / "ü.tif", b / "s.tif"):
        blank_slide(path)  # five files, two key stems (s, _)
    for _ in range(2):  # --out is the slides folder: the 2nd run must not take our heatmaps
        code, output = invoke("infer", a, b, "--ckpt", checkpoint, "--out", a, *FAST)
        assert code == 0, output
        assert ".heatmap.tif:" not in output  # no heatmap TIFF was taken for a slide
        named = sidecars(a)
        slides = {str(p.resolve()) for p in [*a.glob("*.tif"), *a.glob("*.svs"), b / "s.tif"]}
        slides -= {str(p.resolve()) for p in a.glob("*.heatmap.tif")}
        assert len(named) == 5 and set(named.values()) == slides, named
        assert {"s", "_"} <= set(named) and "another slide has the output name s" in output
    assert [p.name for p in find_slides([a])] == ["s.svs", "s.tif", "é.tif", "ü.tif"]
    # a later run of b/s.tif alone keeps off the name a/s.svs's outputs took
    before = sidecars(a)["s"]
    code, output = invoke("infer", b / "s.tif", "--ckpt", checkpoint, "--out", a, *FAST)
    assert code == 0 and sidecars(a)["s"] == before and len(sidecars(a)) == 5, output


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    """Two bad slides before the good ones: corrupt tiles (OpenSlide opens the file and fails
    on a read) and a garbage MIRAX file; then a slide without tissue and one with."""
    folder = tmp_path_factory.mktemp("batch")
    corrupt_tiles(tissue_slide(folder / "a_tiles.tif"))
    (folder / "b_garbage.mrxs").write_bytes(b"[GENERAL]\n" + b"\x00\xff" * 4000)
    blank_slide(folder / "c_blank.tif")
    tissue_slide(folder / "d_tissue.tif")
    return folder


def test_one_unreadable_slide_does_not_stop_an_infer_batch(batch, checkpoint, tmp_path):
    out = tmp_path / "out"
    code, output = invoke(
        "infer", batch, "--ckpt", checkpoint, "--out", out, "--slide-backend", "openslide", *FAST
    )
    assert code == 1, output
    assert "2 of 4 slide(s) failed, 2 done" in output
    assert f"{batch / 'a_tiles.tif'}: " in output and f"{batch / 'b_garbage.mrxs'}: " in output
    assert sorted(sidecars(out)) == ["c_blank", "d_tissue"]
    assert "Traceback" not in output


def test_check_dense_records_failures_and_skips_slides_without_tissue(batch, checkpoint):
    ck = ["--ckpt", checkpoint, "--slide-backend", "openslide", "--device", "cpu"]
    code, output = invoke("check-dense", batch, *ck, "--min-r", "-1")
    assert code == 1, output  # two slides failed; the two others were still checked
    assert "2 slide(s) could not be read" in output and "a_tiles.tif" in output
    assert f"note: {batch / 'c_blank.tif'}: no tissue found, nothing to compare" in output
    assert "d_tissue: compared" not in output and "d_tissue.tif: compared" in output
    code, output = invoke("check-dense", batch / "c_blank.tif", batch / "d_tissue.tif", *ck,
                          "--min-r", "-1")  # fmt: skip
    assert code == 0 and "ok: pooled r" in output and "nan" not in output, output
    code, output = invoke("check-dense", batch / "c_blank.tif", *ck)
    assert code == 1 and "no slide has tissue to compare" in output and "nan" not in output


def test_out_that_is_a_file_stops_infer_with_a_message(batch, checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    slide = batch / "c_blank.tif"
    for out in (blocker, blocker / "sub"):
        code, output = invoke("infer", slide, "--ckpt", checkpoint, "--out", out, *FAST)
        assert code == 2 and f"error: {out}: --out" in output, output


def test_read_only_out_stops_infer_before_any_slide_is_read(
    batch, checkpoint, tmp_path, monkeypatch
):
    out = read_only_folder(tmp_path)

    def no_slide(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a slide was read with a read-only --out")

    monkeypatch.setattr("training.infer.run.infer_slide", no_slide)
    slide = batch / "c_blank.tif"
    code, output = obeying_permissions(
        lambda: invoke("infer", slide, "--ckpt", checkpoint, "--out", out, *FAST)
    )
    assert code == 2, output
    assert f"error: {out}: --out cannot be written (Permission denied)" in output
    assert not list(out.iterdir())
    shutil.rmtree(out, ignore_errors=True)
