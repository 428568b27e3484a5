"""The CLI is derived from the config dataclasses (etl/options.py, etl/command.py): defaults and
help come from the fields, shared option groups feed every dataclass that declares them, and
every command maps a PatchetlError to `error: <message>` and exit 2."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

import etl.extract.run
from etl.command import command
from etl.config import CoordsOptions, ExtractRunOptions
from etl.errors import OptionError, PatchetlError
from etl.extract.plan import ExtractParams
from etl.options import arg, only, opt
from training.cli import app
from training.config import InferConfig, TrainConfig

# The public option names of every command (README and the Makefile use them): a renamed
# dataclass field must not rename an option unnoticed.
FLAGS = {
    "synth": "--out --slides --width --height --tumor-fraction --seed --mpp --downsample "
    "--vendor --quality --regions-per-slide --region-size --grid --val-fraction --artefacts",
    "coords": "--slides --annotations --out --tumor-class --exclude-class --unannotated "
    "--val-fraction --test-fraction --patients --seed --workers --strict --no-strict "
    "--slide-backend --progress --no-progress --mode --region-size --grid --tumor-per-slide "
    "--normal-per-slide --tumor-share --max-regions --margin --min-spacing --min-tissue "
    "--stride --label-rule --label-threshold --tissue-downsample --mpp --assume-mpp",
    "inspect": "--json --csv --data-root --location-order --anchor --region-size --split",
    "extract": "--json --csv --out --data-root --split --region-size --level --format "
    "--quality --shard-size --part-size --seed --outside --mpp --assume-mpp --workers --backend "
    "--stage --scheduler --overwrite --no-overwrite --slide-backend --tile-cache-mb "
    "--check-sha256 --no-check-sha256 --location-order --anchor --progress --no-progress",
    "verify": "--decode --no-decode",
    "qc": "--json --csv --data-root --out --split --region-size --max-side "
    "--tissue-downsample --location-order --anchor --slide-backend",
    "train": "--train --val --out --epochs --batch-size --grid --patch-size --optimizer --lr "
    "--weight-decay --warmup-epochs --workers --shuffle-buffer --decode --device "
    "--amp --no-amp --channels-last --no-channels-last --compile --prefetch "
    "--no-prefetch --augment --no-augment --pretrained --resume --no-resume --seed "
    "--max-bad --max-bad-fraction --progress --no-progress --record-keys --no-record-keys "
    "--read-attempts --read-timeout --read-backoff",
    "evaluate": "--pred --truth --slides --mpp --froc-method --mask-tumor-value --allow-missing "
    "--checkpoint --shards --device --workers --read-attempts --read-timeout --read-backoff --out",
    "infer": "--checkpoint --ckpt --out --mode --level --mpp --assume-mpp --stride --patch-size "
    "--tile-size "
    "--margin --batch-size --tiles-per-batch --workers --device --amp --no-amp "
    "--tissue-downsample --tissue-threshold --tissue-min-area --nms-radius "
    "--nms-threshold --slide-backend --progress --no-progress --rank --world",
    "check-dense": "--checkpoint --ckpt --min-r --report --level --stride --patch-size "
    "--tile-size --margin --batch-size --workers --device --amp --no-amp "
    "--slide-backend",
}


def invoke(target: typer.Typer, args: list[str]):
    return CliRunner().invoke(target, args, env={"COLUMNS": "200"})


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_every_command_keeps_its_option_names(name):
    click_command = typer.main.get_command(app).commands[name]
    flags = {
        f for p in click_command.params for f in (*p.opts, *p.secondary_opts) if f.startswith("-")
    } - {"--help"}
    assert flags == set(FLAGS[name].split())


@dataclass
class Tiny:
    size: Annotated[int, opt("Side in pixels.")] = 768
    mode: Annotated[str, opt("a or b.", "--kind")] = "a"
    fast: Annotated[bool, opt("Go fast.")] = False
    amp: Annotated[bool | None, opt("Autocast (default: on CUDA).")] = None
    tags: Annotated[list[str], opt("Tags (repeat).")] = field(default_factory=list)
    internal: int = 3  # no opt(): not on the command line

    def validate(self) -> None:
        if self.mode not in ("a", "b"):
            raise OptionError(f"--kind {self.mode!r}: use a or b")


@dataclass
class Bigger(Tiny):
    size: Annotated[int, opt("Side in pixels.")] = 1024


@dataclass
class Files:
    paths: Annotated[list[Path], arg("Input files.")]
    size: Annotated[int, opt("Side in pixels.")] = 768


def tiny_app(cls: type, seen: list) -> typer.Typer:
    tiny = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    def run(opts) -> None:
        """Run it."""
        seen.append(opts)

    run.__annotations__ = {"opts": cls, "return": None}
    command(tiny)(run)

    @command(tiny)
    def other() -> None:  # a second command keeps `run` a subcommand
        """Nothing."""

    return tiny


def test_help_and_defaults_come_from_the_dataclass():
    seen: list = []
    res = invoke(tiny_app(Tiny, seen), ["run", "--help"])
    assert res.exit_code == 0 and "Side in pixels. [default: 768]" in res.output
    assert "--kind" in res.output and "--no-fast" in res.output and "--internal" not in res.output
    assert invoke(tiny_app(Bigger, seen), ["run", "--help"]).output.count("[default: 1024]") == 1
    assert invoke(tiny_app(Tiny, seen), ["run"]).exit_code == 0
    assert invoke(tiny_app(Bigger, seen), ["run"]).exit_code == 0
    assert seen == [Tiny(), Bigger()]


def test_options_are_parsed_into_the_dataclass():
    seen: list = []
    res = invoke(
        tiny_app(Tiny, seen),
        ["run", "--size", "5", "--kind", "b", "--fast", "--no-amp", "--tags", "x", "--tags", "y"],
    )
    assert res.exit_code == 0, res.output
    assert seen == [Tiny(size=5, mode="b", fast=True, amp=False, tags=["x", "y"])]


def test_a_positional_argument_takes_several_values():
    seen: list = []
    res = invoke(tiny_app(Files, seen), ["run", "a.tif", "b.tif", "--size", "3"])
    assert res.exit_code == 0, res.output
    assert seen == [Files(paths=[Path("a.tif"), Path("b.tif")], size=3)]


def test_a_bad_value_exits_2_with_the_message_and_no_traceback():
    seen: list = []
    res = invoke(tiny_app(Tiny, seen), ["run", "--kind", "c"])
    assert res.exit_code == 2 and "error: --kind 'c': use a or b" in res.output
    assert "Traceback" not in res.output and not seen


def test_a_patchetl_error_in_any_command_exits_2_and_other_errors_are_not_hidden():
    tiny = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @command(tiny)
    def user(opts: Tiny) -> None:
        raise PatchetlError("slides.json: training[3]: no such slide; check --data-root")

    @command(tiny)
    def bug(opts: Tiny) -> None:
        raise RuntimeError("a bug")

    res = invoke(tiny, ["user"])
    assert res.exit_code == 2 and "error: slides.json: training[3]: no such slide" in res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    res = invoke(tiny, ["bug"])
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError)


def test_two_groups_declaring_one_option_alike_share_it_and_unlike_are_refused():
    tiny = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    seen: list = []

    @command(tiny)
    def both(a: Tiny, b: Files) -> None:
        seen.extend([a, b])

    assert invoke(tiny, ["both", "f", "--size", "9"]).exit_code == 0
    assert seen[0].size == seen[1].size == 9

    def clash(a: Tiny, b: Bigger) -> None: ...

    with pytest.raises(TypeError, match="'size' is declared differently"):
        command(tiny)(clash)


def test_only_exposes_the_fields_named():
    tiny = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    seen: list = []

    @command(tiny)
    def pick(opts: Annotated[Tiny, only("size")]) -> None:
        seen.append(opts)

    @command(tiny)
    def other() -> None: ...

    res = invoke(tiny, ["pick", "--help"])
    assert "--size" in res.output and "--kind" not in res.output
    assert invoke(tiny, ["pick", "--size", "2"]).exit_code == 0 and seen == [Tiny(size=2)]
    with pytest.raises(TypeError, match="no options named"):

        @command(tiny)
        def wrong(opts: Annotated[Tiny, only("nope")]) -> None: ...


def test_extract_builds_its_groups_with_their_defaults_and_shares_region_size(monkeypatch):
    """`patchetl extract` parses into CoordsOptions, ExtractParams and ExtractRunOptions; an
    ExtractError raised inside maps to exit 2."""
    calls = []

    def plan_extraction(coords, params, **kwargs):
        calls.append((coords, params, kwargs))
        raise etl.extract.run.ExtractError("stopped in the test")

    monkeypatch.setattr(etl.extract.run, "plan_extraction", plan_extraction)
    res = invoke(app, ["extract", "--json", "d.json"])
    assert res.exit_code == 2 and "error: stopped in the test" in res.output
    assert "Traceback" not in res.output
    assert calls[-1] == (
        Path("d.json"),
        ExtractParams(),
        {
            "data_root": None,
            "splits": None,
            "location_order": "yx",
            "anchor": "center",
            "slide_backend": ExtractRunOptions().slide_backend,
        },
    )
    invoke(
        app,
        [
            "extract",
            "--csv",
            "d.csv",
            "--region-size",
            "384",
            "--format",
            "png",
            "--split",
            "training",
            "--anchor",
            "corner",
        ],
    )
    assert calls[-1][1] == ExtractParams(region_size=384, fmt="png")
    assert calls[-1][2]["splits"] == ["training"] and calls[-1][2]["anchor"] == "corner"


@pytest.mark.parametrize(
    "args, message",
    [
        (["extract"], "give exactly one of --json FILE or --csv FILE"),
        (["extract", "--json", "a", "--csv", "b"], "give exactly one of --json FILE or --csv FILE"),
        (["extract", "--json", "a", "--outside", "nowhere"], "--outside must be one of"),
        (["extract", "--json", "a", "--quality", "0"], "--quality must be in 1..100"),
        (["qc", "--csv", "a", "--json", "b"], "give exactly one of"),
        (["train", "--optimizer", "lion"], "--optimizer 'lion': use sgd or adamw"),
        (["infer", "x.tif", "--stride", "48"], "--stride 48: use a multiple of 32"),
        (["evaluate", "--checkpoint", "c.pt"], "the patch-level evaluation needs both"),
    ],
)
def test_bad_option_values_exit_2_before_any_work(args, message):
    res = invoke(app, args)
    assert res.exit_code == 2 and f"error: {message}" in res.output, res.output
    assert "Traceback" not in res.output


def test_training_defaults_are_the_dataclass_defaults():
    """What `train` and `infer` print as defaults is what their dataclasses hold."""
    train_help = invoke(app, ["train", "--help"]).output
    for flag, value in (
        ("--train", TrainConfig().train),
        ("--epochs", TrainConfig().epochs),
        ("--batch-size", TrainConfig().batch_size),
    ):
        assert flag in train_help and f"[default: {value}]" in train_help
    infer_help = invoke(app, ["infer", "--help"]).output
    assert f"[default: {InferConfig().checkpoint}]" in infer_help
    dense_help = invoke(app, ["check-dense", "--help"]).output
    assert "--mode" not in dense_help and "--nms-radius" not in dense_help
    assert CoordsOptions().region_size == ExtractParams().region_size  # shared by extract
