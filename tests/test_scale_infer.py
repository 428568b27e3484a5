"""Physical scale on the model side: `infer --mpp`, the checkpoint's training mpp, warnings.

Slide A is a synthetic scene at 0.25 um/px, slide B its level-0 pixels block-meaned by 2 at
0.5 um/px (tests/scale_helpers.py): the same tissue, two scanners. A level-0 point (x, y) on A
is (x / 2, y / 2) on B.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scale_helpers import scene_pair, write_pair
from typer.testing import CliRunner

from etl.extract.plan import ExtractParams
from etl.extract.run import extract_split, plan_extraction
from etl.wsi.pyramid import pyramid_levels, write_pyramid
from etl.wsi.scale import ScaleError
from training.cli import app
from training.config import InferConfig, TrainConfig
from training.infer.predictor import Predictor, make_predictor
from training.infer.run import infer_slide
from training.model import build_model, load_model
from training.shard_scale import training_scale
from training.train import Trainer, train

SIDE = 1024  # A's side (0.25 um/px); B is 512
P = 64  # patch px: small keeps CPU runs short
# Dense maps of A and B at --mpp 0.5, inside tissue, lossless tiles: A's area average by 2 is
# B's block mean bit for bit, so the maps are equal (r = 1) up to float noise. With JPEG tiles
# (37 dB apart) this random trunk gives r = 0.74: it amplifies compression noise; the
# pixel-level agreement of JPEG slides is tests/test_scale.py's.
MIN_R = 0.95

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """a.tif (0.25 um/px), b.tif (0.5), al.tif / bl.tif (the same, lossless tiles), nompp.tif
    (A's JPEG tiles, no pixel size)."""
    root = tmp_path_factory.mktemp("pair")
    _, exact, half = scene_pair(SIDE, seed=3)
    write_pair(root, exact, half, "jpeg", ("a", "b"))
    write_pair(root, exact, half, "zlib", ("al", "bl"))
    write_pyramid(root / "nompp.tif", pyramid_levels(exact, 4, max_side=256), mpp=None)
    return root, half


def save_checkpoint(path: Path, model: torch.nn.Module, scale: dict | None) -> Path:
    state = {"format": 1, "model": model.state_dict(), "patch_size": P, "grid": 3, "epoch": 1}
    torch.save({**state, "arch": "FCResNet18", **({"scale": scale} if scale else {})}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(pair, tmp_path_factory):
    """A random detector (BatchNorm calibrated on B's tissue, so features are well scaled),
    saved three times: without a scale, trained at 0.5 um/px, trained at 0.25 um/px."""
    _, half = pair
    torch.manual_seed(0)
    model = build_model()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    pred = Predictor(model, P, 32, torch.device("cpu"), channels_last=False)
    model.train()
    with torch.no_grad():
        model.features(pred._input(half[None, 128:384, 128:384]))
    model.eval()
    root = tmp_path_factory.mktemp("ckpt")

    def at(mpp: float) -> dict:
        return {"mpp": mpp, "min": mpp, "max": mpp, "source": "extract --mpp"}

    return {
        None: save_checkpoint(root / "plain.pt", model, None),
        0.5: save_checkpoint(root / "at05.pt", model, at(0.5)),
        0.25: save_checkpoint(root / "at025.pt", model, at(0.25)),
    }


def config(checkpoint: Path, out: Path, **kw) -> InferConfig:
    base = InferConfig(
        checkpoint=str(checkpoint),
        out=str(out),
        tile_size=256,
        margin=64,
        workers=1,
        device="cpu",
        progress=False,
        tissue_min_area=1024.0,
    )
    return replace(base, **kw)


def run(path: Path, cfg: InferConfig):
    cfg, predictor = make_predictor(cfg)
    return infer_slide(path, predictor, cfg)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_dense_maps_of_two_scanners_agree_in_physical_units_only_at_one_mpp(
    pair, checkpoints, tmp_path
):
    root, _ = pair
    cfg = config(checkpoints[None], tmp_path)
    a, b = (run(root / f"{n}.tif", replace(cfg, mpp=0.5)) for n in ("al", "bl"))
    # the same physical map: 16 um per map pixel on both, A's level 0 resampled by 2
    assert a.prob.shape == b.prob.shape == (16, 16)
    assert (a.geometry.stride, b.geometry.stride) == (64.0, 32.0)
    assert (a.scale.factor, b.scale.factor, a.scale.level, b.scale.level) == (2.0, 1.0, 0, 0)
    both = a.cells & b.cells
    assert both.sum() > 50
    r = pearson(a.prob[both], b.prob[both])
    # without --mpp: A's map is 8 um per pixel; its 2 x 2 mean against B's at 16 um
    a0, b0 = (run(root / f"{n}.tif", cfg) for n in ("al", "bl"))
    assert a0.prob.shape == (32, 32) and b0.prob.shape == (16, 16)
    a0_half = a0.prob.reshape(16, 2, 16, 2).mean(axis=(1, 3))
    r0 = pearson(a0_half[both], b0.prob[both])
    print(f"Pearson r inside tissue: --mpp 0.5 {r:.4f}; without --mpp {r0:.4f}")
    assert r >= MIN_R
    assert r0 < r - 0.1


def test_resampled_dense_without_context_is_exactly_patch_mode(pair, checkpoints, tmp_path):
    """One-patch tiles, no margin, resampled tiles: dense computes what patch mode does."""
    root, _ = pair
    cfg = config(checkpoints[None], tmp_path, mpp=0.6)  # between levels: factor 2.4
    dense = run(root / "a.tif", replace(cfg, tile_size=32, margin=0, tiles_per_batch=64))
    patch = run(root / "a.tif", replace(cfg, mode="patch"))
    assert dense.cells.sum() > 50
    np.testing.assert_allclose(dense.prob, patch.prob, atol=1e-4)


def test_the_checkpoints_training_mpp_is_the_default_and_a_far_scale_warns(
    pair, checkpoints, tmp_path
):
    root, _ = pair
    explicit = run(root / "a.tif", config(checkpoints[None], tmp_path, mpp=0.5))
    default = run(root / "a.tif", config(checkpoints[0.5], tmp_path))
    assert (default.scale.source, default.scale.target_mpp, default.scale.factor) == (
        "checkpoint",
        0.5,
        2.0,
    )
    np.testing.assert_array_equal(default.prob, explicit.prob)
    assert default.warnings == []
    # trained at 0.25 um/px: B (0.5) cannot be read that fine, so it runs as is, and says so
    coarse = run(root / "b.tif", config(checkpoints[0.25], tmp_path))
    assert coarse.scale.factor == 1.0 and coarse.scale.target_mpp is None
    assert any("100% from the training scale (0.25 um/px)" in w for w in coarse.warnings)
    # --mpp given: no warning, and a target finer than the slide fails naming it
    with pytest.raises(ScaleError, match=r"b\.tif: level 0 is 0\.5 um/px, coarser than --mpp"):
        run(root / "b.tif", config(checkpoints[0.25], tmp_path, mpp=0.25))
    # without a recorded scale and without --mpp: no warning (nothing to compare with)
    assert run(root / "b.tif", config(checkpoints[None], tmp_path)).warnings == []


def test_sidecar_states_the_physical_scale_and_keeps_the_slides_own_mpp(
    pair, checkpoints, tmp_path
):
    root, _ = pair
    out = tmp_path / "out"
    args = ["infer", str(root / "a.tif"), "--checkpoint", str(checkpoints[None])]
    args += ["--out", str(out), "--mpp", "0.5", "--tile-size", "256", "--margin", "64"]
    args += ["--workers", "1", "--device", "cpu", "--no-progress", "--tissue-min-area", "1024"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "a.prob.json").read_text())
    assert meta["physical_scale"] == {
        "slide_mpp": 0.25,
        "target_mpp": 0.5,
        "level": 0,
        "level_mpp": 0.25,
        "scale": 2.0,
        "map_pixel_um": 16.0,
        "source": "--mpp",
        "training_mpp": None,
    }
    # FROC reads the slide's own mpp from here (etl.evaluate.predictions), never the target
    assert meta["mpp"] == [0.25, 0.25] and meta["stride"] == 64.0
    assert meta["inputs"]["options"]["mpp"] == 0.5


def test_a_slide_without_mpp_fails_alone_unless_assume_mpp_gives_it(pair, checkpoints, tmp_path):
    root, _ = pair
    cfg = config(checkpoints[None], tmp_path, mpp=0.5)
    with pytest.raises(ScaleError, match=r"nompp\.tif: the slide records no pixel size"):
        run(root / "nompp.tif", cfg)
    assumed = run(root / "nompp.tif", replace(cfg, assume_mpp=0.25))
    a = run(root / "a.tif", cfg)
    assert assumed.scale.slide_mpp == 0.25
    np.testing.assert_array_equal(assumed.prob, a.prob)  # the same tiles, the same map
    # and through the CLI: the slide is listed as failed (exit 1), not a traceback
    args = ["infer", str(root / "nompp.tif"), "--checkpoint", str(checkpoints[None])]
    args += ["--out", str(tmp_path / "o"), "--mpp", "0.5", "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "--assume-mpp" in result.output


def extract(root: Path, out: Path, slides: dict[str, int], **params) -> Path:
    """Training shards of 96 px regions on the given slides (level-0 divisor vs A)."""
    rng = np.random.default_rng(0)
    entries = [
        {"image": image, "location": [int(y) // div, int(x) // div], "label": [0]}
        for image, div in slides.items()
        for x, y in rng.integers(300, SIDE - 300, (4, 2))
    ]
    coords = out / "d.json"
    out.mkdir(parents=True, exist_ok=True)
    coords.write_text(json.dumps({"training": entries}))
    p = ExtractParams(region_size=96, fmt="png", shard_size=4, part_size=4, **params)
    table, (plan,) = plan_extraction(coords, p, data_root=root)
    extract_split(table, plan, out / "training", p, {"location_order": "yx", "anchor": "center"})
    return out / "training"


def test_training_records_the_shards_mpp_in_the_checkpoint(pair, tmp_path):
    root, _ = pair
    shards = extract(root, tmp_path / "mpp", {"a.tif": 1, "b.tif": 2}, mpp=0.5)
    tiny = dict(batch_size=9, patch_size=28, grid=3, epochs=1, workers=0, progress=False)
    cfg = TrainConfig(train=str(shards), out=str(tmp_path / "run"), device="cpu", **tiny)
    train(cfg, log=lambda m: None)
    _, info = load_model(tmp_path / "run" / "last.pt")
    assert info["scale"] == {"mpp": 0.5, "min": 0.5, "max": 0.5, "source": "extract --mpp"}
    # without --mpp: each sample's level mpp; A and B mix 0.25 and 0.5 um/px
    mixed = extract(root, tmp_path / "plain", {"a.tif": 1, "b.tif": 2})
    scale, note = training_scale(str(mixed))
    assert scale == {"mpp": None, "min": 0.25, "max": 0.5, "source": "sample mpp x downsample"}
    assert note is not None and "mix physical scales (0.25..0.5 um/px" in note
    logged: list[str] = []
    Trainer(replace(cfg, train=str(mixed), out=str(tmp_path / "run2")), log=logged.append)
    assert any(m.startswith("warning:") and "mix physical scales" in m for m in logged)
    one, _ = training_scale(str(extract(root, tmp_path / "b", {"b.tif": 2}, level=1)))
    assert one == {"mpp": 1.0, "min": 1.0, "max": 1.0, "source": "sample mpp x downsample"}
