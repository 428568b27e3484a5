"""The physical scale a model is trained at, read from its training split; kept in checkpoints.

`training_scale(spec)` says what the shards of `--train` hold, as a plain dict that a
checkpoint stores under `"scale"` (`training.checkpoint.run_state`) and inference reads back
(`training.model.load_model`'s info):

- extracted with `extract --mpp T`: the manifest's `params.mpp`; every sample is at T um/px.
  ``{"mpp": T, "min": T, "max": T, "source": "extract --mpp"}``.
- otherwise: each sample's level mpp, the slide's own mpp (its `.json` `mpp`, x) times the
  `downsample` of the level read, over every sample of local shards (tar headers are skipped
  through, only `.json` members are read). All within 1 % of each other (`MPP_TOLERANCE`):
  ``mpp`` is their median. Further apart, the shards mix scales: ``mpp`` is None and
  ``min``/``max`` give the range, with a warning (infer then needs `--mpp`).
- no scale known (samples without `mpp`, shards at URLs extracted without `--mpp`): None, and
  inference runs as it always has (`--level` as is).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import braceexpand

from etl.storage import is_url, read_manifest
from etl.wsi.scale import MPP_TOLERANCE
from training.config import ShardReads

SAME = 1 + MPP_TOLERANCE + 1e-9


def _manifest(spec: str) -> dict[str, Any] | None:
    """The split's manifest when ``spec`` is a folder or URL prefix holding one."""
    if "{" in spec or spec.startswith("pipe:"):
        return None
    if not is_url(spec) and not (Path(spec) / "manifest.json").is_file():
        return None
    try:
        return read_manifest(spec, ShardReads().retry)
    except Exception:  # the data path reports a bad manifest; the scale is then unknown
        return None


def _local_shards(spec: str) -> list[Path]:
    if is_url(spec):
        return []
    if Path(spec).is_dir():
        return sorted(Path(spec).glob("*.tar"))
    return [Path(u) for u in braceexpand.braceexpand(spec) if Path(u).is_file()]


def _sample_mpps(shards: list[Path]) -> Iterator[float | None]:
    """Each sample's level mpp (None when its `.json` records no mpp)."""
    for shard in shards:
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not (member.isfile() and member.name.endswith(".json")):
                        continue
                    fh = tar.extractfile(member)
                    meta = json.loads(fh.read()) if fh is not None else {}
                    mpp = meta.get("mpp")
                    if not mpp:
                        yield None
                        continue
                    yield float(mpp[0]) * float(meta.get("downsample", 1.0))
        except (OSError, tarfile.TarError, ValueError, TypeError, KeyError):
            continue  # the data path counts bad shards and samples; they tell no scale


def training_scale(spec: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the scale of split ``spec``, a warning or None); see the module."""
    manifest = _manifest(spec)
    target = (manifest or {}).get("params", {}).get("mpp")
    if target is not None:
        t = float(target)
        return {"mpp": t, "min": t, "max": t, "source": "extract --mpp"}, None
    values = list(_sample_mpps(_local_shards(spec)))
    known = sorted(v for v in values if v is not None)
    if not known:
        return None, None
    lo, hi = known[0], known[-1]
    scale: dict[str, Any] = {"mpp": None, "min": lo, "max": hi, "source": "sample mpp x downsample"}
    note = None
    if hi / lo <= SAME:
        scale["mpp"] = known[len(known) // 2]
    else:
        note = (
            f"{spec}: the training samples mix physical scales ({lo:g}..{hi:g} um/px at the "
            "levels read); the checkpoint records the range but no training mpp, so `infer` "
            "runs slides as they are unless given --mpp (extract with --mpp for one scale)"
        )
    if len(known) < len(values):
        scale["samples_without_mpp"] = len(values) - len(known)
    return scale, note
