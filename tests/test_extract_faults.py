"""Extraction faults that used to lose, duplicate or mix regions silently, or end in a
traceback. Each fault is injected for real: a `kill -9`ed subprocess (while reading, while
mixing, with loky workers alive), a file size limit set in the child process, a read-only
folder, a deleted or altered shard, a slide replaced between a kill and the resume."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import pytest
from test_train_faults import obeying_permissions, read_only_folder  # tests/ is on sys.path
from typer.testing import CliRunner

from etl.cli import app
from etl.extract.coords import load_regions
from etl.extract.plan import ExtractParams
from etl.extract.run import (
    ExtractError,
    PreflightError,
    SplitResult,
    extract_split,
    plan_extraction,
)
from etl.extract.shards import SlideChangedError, iter_samples, sha256_file, verify_folder
from etl.synth.cohort import synth_cohort

REGION = 192
PARSE = {"location_order": "yx", "anchor": "center"}

# Run as `python WRAPPER ARGS`: `patchetl ARGS`, except that the process kills itself
# (SIGKILL, no clean-up) after KILL_AFTER_PARTS parts, or two samples into shard KILL_AT_SHARD
# (with --workers 1 joblib runs every call in this process). SLOW_PARTS=1 makes each part
# sleep a minute first (in loky workers too: the function is importable by reference).
WRAPPER = """
import os, runpy, signal, time
import etl.extract.run as run

after, at = int(os.environ.get("KILL_AFTER_PARTS", 0)), int(os.environ.get("KILL_AT_SHARD", -1))
real_part, real_shard, parts, calls = run.extract_part, run.write_shard, [], []

def extract_part(*args, **kwargs):
    parts.append(real_part(*args, **kwargs))
    if len(parts) == after:
        os.kill(os.getpid(), signal.SIGKILL)
    return parts[-1]

def dying(entries):
    for i, entry in enumerate(entries):
        if i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        yield entry

def write_shard(path, entries, parts_dir):
    calls.append(path)
    return real_shard(path, dying(entries) if len(calls) == at + 1 else entries, parts_dir)

if os.environ.get("SLOW_PARTS"):
    import slow_part  # from PYTHONPATH, so that loky workers import it too
    run.extract_part = slow_part.extract_part
else:
    run.extract_part, run.write_shard = extract_part, write_shard
runpy.run_module("training.cli", run_name="__main__")
"""

SLOW_PART = """
import time
from etl.extract.shards import extract_part as real

def extract_part(*args, **kwargs):
    time.sleep(60)
    return real(*args, **kwargs)
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Two slides, 24 regions, one split; tests that alter slides copy it first."""
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
    return root


@pytest.fixture
def cohort(source, tmp_path):
    """A private copy of the cohort (its slides may be replaced)."""
    root = tmp_path / "cohort"
    shutil.copytree(source, root)
    return root


def args(root: Path, out: Path, *more: str, coords: Path | None = None) -> list[str]:
    coords = coords or root / "dataset_0.json"
    return [
        "extract", "--json", str(coords), "--data-root", str(root),
        "--out", str(out), "--region-size", str(REGION), "--shard-size", "5",
        "--no-progress", *more,
    ]  # fmt: skip


def run_cli(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`patchetl ARGV` in a child process through WRAPPER (env: its fault switches)."""
    wrapper = Path(argv[argv.index("--out") + 1]).parent / "wrapper.py"
    wrapper.write_text(WRAPPER)
    return subprocess.run(
        [sys.executable, str(wrapper), *argv],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )


def planned_keys(root: Path) -> set[tuple[str, int, int]]:
    table = load_regions(root / "dataset_0.json", data_root=root)
    return {(r.image, r.x, r.y) for r in table.regions}


def sample_ids(folder: Path) -> list[tuple[str, int, int]]:
    metas = [
        json.loads(s["json"]) for p in sorted(folder.glob("*.tar")) for _, s in iter_samples(p)
    ]
    return [(m["slide"], m["x"], m["y"]) for m in metas]


def shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.tar"))}


def extract(root: Path, out: Path, **kw) -> SplitResult:
    params = ExtractParams(
        region_size=REGION,
        shard_size=kw.pop("shard_size", 5),
        part_size=kw.pop("part_size", 4),
        quality=kw.pop("quality", 95),
        outside=kw.pop("outside", "error"),
    )
    table, (plan,) = plan_extraction(root / "dataset_0.json", params, data_root=root)
    return extract_split(table, plan, out / "training", params, PARSE, **kw)


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("phase", ["reading", "mixing"])
def test_resume_with_another_part_size_ends_with_exactly_the_planned_samples(
    cohort, tmp_path, phase
):
    reference = CliRunner().invoke(app, args(cohort, tmp_path / "ref", "--workers", "1"))
    assert reference.exit_code == 0, reference.output
    expected = shard_hashes(tmp_path / "ref" / "training")
    killed = tmp_path / "killed"
    fault = {"KILL_AFTER_PARTS": "3"} if phase == "reading" else {"KILL_AT_SHARD": "2"}
    dead = run_cli(args(cohort, killed, "--workers", "1", "--part-size", "3"), **fault)
    assert dead.returncode == -signal.SIGKILL, dead.stderr
    assert not (killed / "training" / "manifest.json").exists()
    for part_size in ("5", "2"):  # bigger and smaller parts than the killed run's
        out = tmp_path / f"resume{part_size}"
        shutil.copytree(killed, out)
        res = CliRunner().invoke(app, args(cohort, out, "--workers", "1", "--part-size", part_size))
        assert res.exit_code == 0, res.output
        ids = sample_ids(out / "training")
        assert len(ids) == len(set(ids)) == len(planned_keys(cohort))  # no loss, no duplicate
        assert set(ids) == planned_keys(cohort)
        assert shard_hashes(out / "training") == expected  # as an uninterrupted run
        assert verify_folder(out / "training") == []


def test_verify_catches_a_split_whose_sample_set_is_not_the_planned_one(cohort, tmp_path):
    folder = extract(cohort, tmp_path).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    dropped = manifest["shards"].pop(1)  # a shard lost, and the manifest agreeing
    (folder / dropped["name"]).unlink()
    manifest["counts"]["written"] -= dropped["count"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert any("another set of keys" in p for p in verify_folder(folder))
    del manifest["keys_sha256"]  # a manifest without the digest: the counts tell
    (folder / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_folder(folder)
    assert any("do not add up" in p for p in problems), problems
    assert CliRunner().invoke(app, ["verify", str(folder)]).exit_code == 1


# --------------------------------------------------------------------------- limits, kills
def test_a_file_size_limit_stops_extract_with_a_message_and_a_rerun_resumes(cohort, tmp_path):
    reference = extract(cohort, tmp_path / "ref", shard_size=100, workers=1)
    (shard,) = reference.shards
    limit = 3 * shard["bytes"] // shard["count"]  # a part (one region) fits, the shard not
    out = tmp_path / "out"
    argv = args(cohort, out, "--workers", "2", "--part-size", "1", "--shard-size", "100")
    child = subprocess.run(
        [sys.executable, "-m", "training.cli", *argv],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        capture_output=True,
        text=True,
    )
    assert child.returncode == 2, child.stderr
    assert "File too large" in child.stderr and "ulimit -f" in child.stderr
    assert "Traceback" not in child.stderr and "Exception ignored" not in child.stderr
    folder = out / "training"
    assert not (folder / "manifest.json").exists() and not list(folder.glob("*.tar"))
    assert len(list((folder / ".parts").glob("*.tar"))) == shard["count"]  # parts kept
    res = CliRunner().invoke(app, argv)  # limit lifted
    assert res.exit_code == 0 and f"{shard['count']} part(s) resumed" in res.output, res.output
    assert shard_hashes(folder) == shard_hashes(reference.folder)
    assert not list(folder.rglob("*.tmp-*"))


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            kids = {int(k) for k in (task / "children").read_text().split()}
            todo += kids - found
            found |= kids
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_loky_workers_exit_when_the_extract_process_is_killed(cohort, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "slow_part.py").write_text(SLOW_PART)
    argv = args(cohort, out, "--workers", "2")
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "SLOW_PARTS": "1", "PYTHONPATH": path}
    parent = subprocess.Popen([sys.executable, str(wrapper), *argv], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(descendants(parent.pid)) < 3:
            time.sleep(0.1)  # two loky workers and a resource tracker
        time.sleep(2)  # the workers are inside their (minute-long) parts now
        workers = descendants(parent.pid)
        assert len(workers) >= 3, "the loky workers never started"
    finally:
        parent.kill()
        parent.wait()
    deadline = time.time() + 5
    while time.time() < deadline and any(alive(p) for p in workers):
        time.sleep(0.1)
    left = [p for p in workers if alive(p)]
    for pid in left:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} of {len(workers)} worker processes outlived their parent"


# --------------------------------------------------------------------------- repairs
def test_a_missing_or_damaged_shard_of_a_finished_split_is_rebuilt_identical(cohort, tmp_path):
    first = extract(cohort, tmp_path)
    folder, before = first.folder, shard_hashes(first.folder)
    names = sorted(before)
    (folder / names[0]).unlink()  # missing
    with open(folder / names[1], "r+b") as fh:  # same size, other bytes
        fh.seek(3000)
        byte = fh.read(1)
        fh.seek(3000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with open(folder / names[2], "r+b") as fh:  # truncated
        fh.truncate(1024)
    again = extract(cohort, tmp_path)
    assert shard_hashes(folder) == before and verify_folder(folder) == []
    assert set(again.repaired) == set(names[:3]) and "missing" in again.repaired[names[0]]
    assert not (folder / ".parts").exists()
    # without the sha256 check, sizes still catch a missing or truncated shard
    (folder / names[3]).unlink()
    assert set(extract(cohort, tmp_path, check_sha256=False).repaired) == {names[3]}
    assert shard_hashes(folder) == before


def test_a_shard_that_cannot_be_rebuilt_as_listed_is_refused(cohort, tmp_path):
    folder = extract(cohort, tmp_path).folder
    slides = sorted((cohort / "training" / "images").glob("*.tif"))
    shutil.copyfile(slides[1], slides[0])  # another slide's pixels under the first's name
    victim = sorted(folder.glob("*.tar"))[0]
    kept = victim.read_bytes()
    victim.unlink()
    with pytest.raises(ExtractError, match=f"slide.*{slides[0].name} changed.*--overwrite"):
        extract(cohort, tmp_path)
    assert not victim.exists()
    victim.write_bytes(kept)  # shards whole again: done, with a warning
    again = extract(cohort, tmp_path)
    assert any(slides[0].name in w and "changed" in w for w in again.warnings)


def test_overwrite_deletes_only_what_extract_wrote(cohort, tmp_path):
    folder = extract(cohort, tmp_path).folder
    theirs = [folder / "notes.tar", folder / "training-best.tar", folder / "readme.txt"]
    for path in theirs:
        path.write_text("not ours")
    again = extract(cohort, tmp_path, quality=80, overwrite=True)
    assert all(p.read_text() == "not ours" for p in theirs)
    assert json.loads((folder / "manifest.json").read_text())["params"]["quality"] == 80
    assert again.written == len(planned_keys(cohort))


def test_a_slide_replaced_between_a_kill_and_the_resume_is_read_again(cohort, tmp_path):
    killed = tmp_path / "out"
    dead = run_cli(args(cohort, killed, "--workers", "1", "--part-size", "3"), KILL_AFTER_PARTS="5")
    assert dead.returncode == -signal.SIGKILL, dead.stderr
    slides = sorted((cohort / "training" / "images").glob("*.tif"))
    done = {json.loads(p.read_text())["slide"] for p in (killed / "training/.parts").glob("*.json")}
    assert slides[0].name in done, "some parts of the slide to replace were done"
    shutil.copyfile(slides[1], slides[0])
    res = CliRunner().invoke(app, args(cohort, killed, "--workers", "1", "--part-size", "3"))
    assert res.exit_code == 0, res.output
    fresh = CliRunner().invoke(app, args(cohort, tmp_path / "fresh", "--workers", "1"))
    assert fresh.exit_code == 0, fresh.output
    assert shard_hashes(killed / "training") == shard_hashes(tmp_path / "fresh" / "training")


def test_a_slide_changed_after_the_preflight_stops_its_reads(cohort, tmp_path):
    params = ExtractParams(region_size=REGION, shard_size=5, part_size=4)
    table, (plan,) = plan_extraction(cohort / "dataset_0.json", params, data_root=cohort)
    slides = sorted((cohort / "training" / "images").glob("*.tif"))
    shutil.copyfile(slides[1], slides[0])
    with pytest.raises(SlideChangedError, match=f"{slides[0].name}: the slide changed after"):
        extract_split(table, plan, tmp_path / "training", params, PARSE, workers=1)
    assert not (tmp_path / "training" / "manifest.json").exists()


# --------------------------------------------------------------------------- inputs, messages
def coordinates(root: Path, tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "coords.json"
    path.write_text(json.dumps({"training": entries}))
    return path


def test_pad_refuses_a_region_wholly_outside_its_slide(cohort, tmp_path):
    good = json.loads((cohort / "dataset_0.json").read_text())["training"][0]
    path = coordinates(cohort, tmp_path, [good, {**good, "location": [100, 9000]}])
    pad = ExtractParams(region_size=REGION, outside="pad")
    with pytest.raises(PreflightError, match=r"training\[1\].*wholly outside.*--outside skip"):
        plan_extraction(path, pad, data_root=cohort)
    skip = ExtractParams(region_size=REGION, outside="skip")
    _, (plan,) = plan_extraction(path, skip, data_root=cohort)
    assert plan.n_regions == 1 and len(plan.skipped) == 1


def test_a_split_where_every_region_is_skipped_warns(cohort, tmp_path):
    good = json.loads((cohort / "dataset_0.json").read_text())["training"][0]
    outside = [{**good, "location": [5, 5]}, {**good, "location": [7, 7]}]
    path = coordinates(cohort, tmp_path, outside)
    argv = args(cohort, tmp_path / "out", "--outside", "skip", "--workers", "1", coords=path)
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    assert "warning: training: no region was written (2 skipped, 0 failed of 2)" in res.output


def test_preflight_lists_one_line_per_slide_and_reason(cohort, tmp_path):
    good = json.loads((cohort / "dataset_0.json").read_text())["training"][0]
    missing = [{**good, "image": "gone.tif", "location": [300 + i, 300]} for i in range(120)]
    path = coordinates(cohort, tmp_path, [good, *missing])
    with pytest.raises(PreflightError) as err:
        plan_extraction(path, ExtractParams(region_size=REGION), data_root=cohort)
    lines = [line for line in str(err.value).splitlines() if "gone.tif" in line]
    assert len(lines) == 1 and len(err.value.problems) == 120
    assert "training[1], training[2], training[3] and 117 more (120 entries)" in lines[0]


def invoke(argv: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(app, argv)
    return res.exit_code, res.output


def test_out_that_is_a_file_or_read_only_stops_extract_and_qc(cohort, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    qc = ["qc", "--json", str(cohort / "dataset_0.json"), "--data-root", str(cohort)]
    for argv in (args(cohort, blocker), [*qc, "--out", str(blocker)]):
        res = CliRunner().invoke(app, argv)
        assert res.exit_code == 2 and f"error: {blocker}: --out is a file" in res.output
        assert "Traceback" not in res.output
    locked = read_only_folder(tmp_path)
    for argv in (args(cohort, locked), [*qc, "--out", str(locked)]):
        code, output = obeying_permissions(partial(invoke, argv))
        assert code == 2, output
        assert f"error: {locked}: --out cannot be written (Permission denied)" in output
    assert not list(locked.iterdir())


def test_zero_workers_is_an_option_error(cohort, tmp_path):
    res = CliRunner().invoke(app, args(cohort, tmp_path / "out", "--workers", "0"))
    assert res.exit_code == 2 and "--workers 0: use at least 1" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_verify_reports_link_and_device_members(cohort, tmp_path):
    folder = extract(cohort, tmp_path).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = folder / manifest["shards"][0]["name"]
    with tarfile.open(shard, "a") as tar:
        link = tarfile.TarInfo("evil.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        device = tarfile.TarInfo("evil.json")
        device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(link)
        tar.addfile(device)
    manifest["shards"][0].update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_folder(folder)
    assert len(problems) == 2, problems
    assert "'evil.jpg' is a symbolic link member" in problems[0]
    assert "'evil.json' is a character device member" in problems[1]
