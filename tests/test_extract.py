"""`patchetl extract` / `verify`: shards hold exactly the planned, correctly labelled regions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
from typer.testing import CliRunner

from etl.cli import app
from etl.extract.coords import load_regions
from etl.extract.encode import decode_image
from etl.extract.plan import ExtractParams
from etl.extract.run import (
    ExtractError,
    PreflightError,
    extract_split,
    folder_lock,
    plan_extraction,
)
from etl.extract.shards import iter_samples, sha256_file, verify_folder
from etl.synth.cohort import synth_cohort

REGION = 192  # small regions keep the tests fast; geometry is the same as 768


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    return synth_cohort(
        root,
        n_slides=3,
        width=2048,
        height=1536,
        tumor_fraction=0.67,
        seed=3,
        mpp=1.0,
        regions_per_slide=10,
        region_size=REGION,
        val_fraction=0.34,
    )


def run_extract(cohort, out, **kw):
    params = ExtractParams(
        region_size=REGION,
        shard_size=kw.pop("shard_size", 7),
        part_size=kw.pop("part_size", 4),
        fmt=kw.pop("fmt", "jpg"),
        quality=kw.pop("quality", 95),
        outside=kw.pop("outside", "error"),
    )
    table, plans = plan_extraction(
        cohort.dataset_json, params, data_root=cohort.root, splits=["training"]
    )
    results = [
        extract_split(
            table,
            plan,
            out / plan.split,
            params,
            {"location_order": "yx", "anchor": "center"},
            **kw,
        )
        for plan in plans
    ]
    return table, results


def shard_samples(folder: Path) -> dict[str, dict]:
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        for key, sample in iter_samples(shard):
            assert key not in out, f"duplicate key {key}"
            out[key] = sample
    return out


def test_png_shards_hold_exactly_openslide_pixels_and_row_major_labels(cohort, tmp_path):
    table, (result,) = run_extract(cohort, tmp_path, fmt="png")
    samples = shard_samples(result.folder)
    assert len(samples) == len(table.regions) == result.written
    by_centre = {(r.image, r.x, r.y): r for r in table.regions}
    assert len(by_centre) == len(samples)  # one sample per region
    slides = {}
    for sample in samples.values():
        meta = json.loads(sample["json"])
        region = by_centre[(meta["slide"], meta["x"], meta["y"])]
        assert meta["labels"] == [list(row) for row in region.labels]
        assert meta["grid"] == 3 and meta["region_size"] == REGION and meta["level"] == 0
        if region.slide not in slides:
            slides[region.slide] = openslide.OpenSlide(str(region.slide))
        ref = (
            slides[region.slide]
            .read_region((region.x - REGION // 2, region.y - REGION // 2), 0, (REGION, REGION))
            .convert("RGB")
        )
        np.testing.assert_array_equal(decode_image(sample["png"]), np.asarray(ref))
    # The datalist is column by column: shards must have turned it into row-major grids.
    raw = json.loads(cohort.dataset_json.read_text())["training"]
    entry = next(e for e in raw if 0 < sum(e["label"]) < 9 and e["label"] != e["label"][::-1])
    key_meta = next(
        json.loads(s["json"])
        for s in samples.values()
        if [json.loads(s["json"])[k] for k in ("y", "x")] == entry["location"]
        and json.loads(s["json"])["slide"] == entry["image"]
    )
    assert [[key_meta["labels"][r][c] for r in range(3)] for c in range(3)] == [
        entry["label"][3 * c : 3 * c + 3] for c in range(3)
    ]


def test_shards_are_equal_sized_mixed_and_verified(cohort, tmp_path):
    table, (result,) = run_extract(cohort, tmp_path, shard_size=7)
    counts = [s["count"] for s in result.shards]
    assert counts[:-1] == [7] * (len(counts) - 1) and 0 < counts[-1] <= 7
    assert sum(counts) == len(table.regions)
    names = sorted(p.name for p in result.folder.glob("*.tar"))
    assert names == [f"training-{i:06d}.tar" for i in range(len(counts))]
    first = [json.loads(s["json"])["slide"] for _, s in iter_samples(result.folder / names[0])]
    assert len(set(first)) > 1, "the global shuffle should mix slides within a shard"
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["counts"] == {
        "planned": len(table.regions),
        "written": len(table.regions),
        "skipped": 0,
        "failed": 0,
    }
    assert sum(s["count"] for s in manifest["slides"].values()) == len(table.regions)
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    assert verify_folder(result.folder) == []
    assert not (result.folder / ".parts").exists()
    # verify catches a shard whose bytes changed
    victim = result.folder / names[0]
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0xFF
    victim.write_bytes(bytes(data))
    problems = verify_folder(result.folder)
    assert any("sha256" in p for p in problems)
    res = CliRunner().invoke(app, ["verify", str(result.folder)])
    assert res.exit_code != 0


def test_rerun_is_a_no_op_changed_params_refuse_and_overwrite_works(cohort, tmp_path):
    _, (first,) = run_extract(cohort, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in first.folder.glob("*.tar")}
    _, (again,) = run_extract(cohort, tmp_path)
    assert again.written == first.written
    assert {p.name: p.stat().st_mtime_ns for p in first.folder.glob("*.tar")} == before
    with pytest.raises(ExtractError, match="quality"):
        run_extract(cohort, tmp_path, quality=80)
    _, (redone,) = run_extract(cohort, tmp_path, quality=80, overwrite=True)
    assert redone.written == first.written
    assert json.loads((redone.folder / "manifest.json").read_text())["params"]["quality"] == 80


def test_second_run_on_a_locked_folder_refuses(cohort, tmp_path):
    with folder_lock(tmp_path / "training"), pytest.raises(ExtractError, match="in use"):
        run_extract(cohort, tmp_path)


def test_kill_minus_nine_while_reading_then_rerun_ends_with_the_planned_samples(cohort, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "training.cli",
        "extract",
        "--json",
        str(cohort.dataset_json),
        "--data-root",
        str(cohort.root),
        "--out",
        str(out),
        "--region-size",
        str(REGION),
        "--part-size",
        "1",
        "--shard-size",
        "4",
        "--workers",
        "1",
        "--no-progress",
        "--format",
        "png",
        "--split",
        "training",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = out / "training" / ".parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.json"))) < 3:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in parts.glob("*.json")}
    assert len(done_before) >= 3, "the run should have been killed part-way"
    assert not (out / "training" / "manifest.json").exists()
    table = load_regions(cohort.dataset_json, data_root=cohort.root, split="training")
    assert len(done_before) < len(table.regions), "killed while reading (one part per region)"
    subprocess.run(cmd, check=True, capture_output=True)
    folder = out / "training"
    expected = {(r.image, r.x, r.y) for r in table.regions}
    samples = shard_samples(folder)  # asserts no duplicate key
    got = {(m["slide"], m["x"], m["y"]) for m in (json.loads(s["json"]) for s in samples.values())}
    assert got == expected and len(samples) == len(expected)
    assert verify_folder(folder) == []
    assert not list(folder.rglob("*.tmp-*"))


# Run as `python DYING_EXTRACT ARGS`: `patchetl ARGS`, except that the process kills itself
# (SIGKILL, no clean-up) in the mixing step, after two samples of shard number KILL_AT_SHARD.
DYING_EXTRACT = """
import os, runpy, signal
import etl.extract.run as run

KILL_AT_SHARD, real_write_shard, calls = int(os.environ["KILL_AT_SHARD"]), run.write_shard, []

def dying(entries):
    for i, entry in enumerate(entries):
        if i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        yield entry

def write_shard(path, entries, parts_dir):
    calls.append(path)
    if len(calls) == KILL_AT_SHARD + 1:
        entries = dying(entries)
    return real_write_shard(path, entries, parts_dir)

run.write_shard = write_shard
runpy.run_module("training.cli", run_name="__main__")
"""


def test_kill_minus_nine_while_mixing_then_rerun_ends_with_identical_shards(cohort, tmp_path):
    args = [
        "extract",
        "--json",
        str(cohort.dataset_json),
        "--data-root",
        str(cohort.root),
        "--region-size",
        str(REGION),
        "--part-size",
        "3",
        "--shard-size",
        "4",
        "--workers",
        "1",
        "--no-progress",
        "--split",
        "training",
    ]
    reference = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "reference")])
    assert reference.exit_code == 0, reference.output
    expected = json.loads((tmp_path / "reference" / "training" / "manifest.json").read_text())
    assert len(expected["shards"]) >= 4
    out = tmp_path / "out"
    folder = out / "training"
    script = tmp_path / "dying_extract.py"
    script.write_text(DYING_EXTRACT)
    dead = subprocess.run(
        [sys.executable, str(script), *args, "--out", str(out)],
        env={**os.environ, "KILL_AT_SHARD": "2"},
        capture_output=True,
    )
    assert dead.returncode == -signal.SIGKILL, dead.stderr.decode()
    # Killed while writing shard 2: parts all written, shards 0-1 complete, shard 2 half
    # written under its temporary name, no manifest.
    names = [s["name"] for s in expected["shards"]]
    assert sorted(p.name for p in folder.glob("*.tar")) == names[:2]
    assert list(folder.glob(f".{names[2]}.tmp-*"))
    assert not (folder / "manifest.json").exists()
    assert (folder / ".parts").is_dir()
    survivors = {name: (folder / name).stat().st_mtime_ns for name in names[:2]}

    rerun = subprocess.run(
        [sys.executable, "-m", "training.cli", *args, "--out", str(out)], capture_output=True
    )
    assert rerun.returncode == 0, rerun.stderr.decode()
    manifest = json.loads((folder / "manifest.json").read_text())
    planned = len(
        load_regions(cohort.dataset_json, data_root=cohort.root, split="training").regions
    )
    assert manifest["counts"] == {**expected["counts"], "planned": planned, "written": planned}
    assert manifest["shards"] == expected["shards"]
    assert {p.name: sha256_file(p) for p in folder.glob("*.tar")} == {
        s["name"]: s["sha256"] for s in expected["shards"]
    }
    # The shards finished before the kill were kept, not written again.
    assert {name: (folder / name).stat().st_mtime_ns for name in names[:2]} == survivors
    assert len(shard_samples(folder)) == planned
    assert verify_folder(folder) == []
    assert not list(folder.rglob("*.tmp-*")) and not (folder / ".parts").exists()


def test_preflight_lists_every_problem_and_writes_nothing(cohort, tmp_path):
    data = json.loads(cohort.dataset_json.read_text())
    good = data["training"][0]
    data["training"] = [
        good,
        {**good, "image": "no_such_slide.tif"},
        {**good, "location": [5, 5]},  # region sticks out of the top-left corner
    ]
    data.pop("validation", None)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    params = ExtractParams(region_size=REGION)
    with pytest.raises(PreflightError) as err:
        plan_extraction(bad, params, data_root=cohort.root)
    text = str(err.value)
    assert "training[1]" in text and "no_such_slide.tif" in text and "not found" in text
    assert "training[2]" in text and "not inside the slide" in text and "--outside" in text
    res = CliRunner().invoke(
        app,
        [
            "extract",
            "--json",
            str(bad),
            "--data-root",
            str(cohort.root),
            "--out",
            str(tmp_path / "o"),
            "--region-size",
            str(REGION),
        ],
    )
    assert res.exit_code != 0 and "training[1]" in res.output
    assert not (tmp_path / "o").exists()
    # skip and pad policies accept the outside region and count it
    data["training"] = [good, {**good, "location": [5, 5]}]
    bad.write_text(json.dumps(data))
    for policy, written, skipped in (("skip", 1, 1), ("pad", 2, 0)):
        p = ExtractParams(region_size=REGION, outside=policy)
        table, (plan,) = plan_extraction(bad, p, data_root=cohort.root)
        r = extract_split(table, plan, tmp_path / policy, p, {})
        assert (r.written, len(r.skipped)) == (written, skipped)
    padded = [json.loads(s["json"]) for s in shard_samples(tmp_path / "pad").values()]
    pad_meta = next(m for m in padded if m["padded"])
    assert pad_meta["x0"] < 0 and pad_meta["y0"] < 0
    # level that does not exist; grid that does not divide the region
    with pytest.raises(PreflightError, match="levels"):
        plan_extraction(bad, ExtractParams(region_size=REGION, level=40), data_root=cohort.root)
    with pytest.raises(PreflightError, match="does not divide"):
        plan_extraction(bad, ExtractParams(region_size=REGION + 1), data_root=cohort.root)


def test_a_region_that_fails_to_read_is_recorded_not_lost(cohort, tmp_path, monkeypatch):
    import etl.extract.shards as shards

    real = shards.worker_reader
    calls = {"n": 0}

    class FlakyReader:
        """The worker's slide reader, except that its second read fails."""

        def __init__(self, reader):
            self.reader = reader

        def __getattr__(self, name):
            return getattr(self.reader, name)

        def read_region(self, *args):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("simulated corrupt tile")
            return self.reader.read_region(*args)

    monkeypatch.setattr(shards, "worker_reader", lambda *args: FlakyReader(real(*args)))
    table, (result,) = run_extract(cohort, tmp_path, workers=1)
    assert len(result.failed) == 1 and "simulated corrupt tile" in result.failed[0]["reason"]
    assert result.written == len(table.regions) - 1
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["counts"]["failed"] == 1 and manifest["failed"][0]["key"]


def test_dask_backend_writes_the_same_shards_as_local(cohort, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    _, (local,) = run_extract(cohort, tmp_path / "local", workers=1)
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        _, (viadask,) = run_extract(
            cohort, tmp_path / "dask", backend="dask", scheduler=cluster.scheduler_address
        )
    assert [s["sha256"] for s in viadask.shards] == [s["sha256"] for s in local.shards]


def test_shard_mixing_with_few_open_part_files_gives_the_same_shards(cohort, tmp_path, monkeypatch):
    """Mixing reads from many part files; the LRU of open handles must not change a byte."""
    import etl.extract.shards as shards

    _, (normal,) = run_extract(cohort, tmp_path / "a", part_size=2, workers=1)
    monkeypatch.setattr(shards, "MAX_OPEN_PARTS", 1)
    _, (few,) = run_extract(cohort, tmp_path / "b", part_size=2, workers=1)
    assert [s["sha256"] for s in few.shards] == [s["sha256"] for s in normal.shards]
    assert len({s["sha256"] for s in few.shards}) == len(few.shards) > 1


def test_cli_extracts_every_split_through_one_pool(cohort, tmp_path):
    out = tmp_path / "out"
    args = [
        "extract",
        "--json",
        str(cohort.dataset_json),
        "--data-root",
        str(cohort.root),
        "--out",
        str(out),
        "--region-size",
        str(REGION),
        "--part-size",
        "3",
        "--shard-size",
        "5",
        "--workers",
        "2",
        "--no-progress",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    table = load_regions(cohort.dataset_json, data_root=cohort.root)
    for split, regions in table.splits().items():
        folder = out / split
        assert verify_folder(folder) == []
        metas = [json.loads(s["json"]) for s in shard_samples(folder).values()]
        assert {(m["slide"], m["x"], m["y"]) for m in metas} == {
            (r.image, r.x, r.y) for r in regions
        }
        assert {m["split"] for m in metas} == {split}
    again = CliRunner().invoke(app, args)  # finished: a rerun writes nothing new
    assert again.exit_code == 0 and "0 part(s) resumed" not in again.output
