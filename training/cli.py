"""`patchetl` console entry point: the ETL app plus the training commands.

Options come from `training.config` (torch-free), so `patchetl extract --help` starts without
loading torch; torch loads inside the training commands only.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from etl.cli import app, warn
from etl.command import command, fail
from etl.config import EvaluateOptions
from etl.options import only
from training.config import (
    AgreementOptions,
    InferConfig,
    PatchEvalOptions,
    ShardReads,
    SlideInputs,
    TrainConfig,
)

if TYPE_CHECKING:
    from etl.evaluate.froc import Method


@command(app)
def train(cfg: TrainConfig, reads: ShardReads) -> None:
    """Train the tumor detector (ResNet18, 1x1 conv head) on extracted shards.

    Shards from folders or URLs (http(s)://, s3://, pipe:). Multi-GPU / multi-process:
    torchrun --nproc_per_node N -m training.cli train ...
    """
    from training.train import train as run_training

    result = run_training(replace(cfg, reads=reads))
    if os.environ.get("RANK", "0") == "0":
        best = f" (best by validation AUC: {result['best']})" if result["best"] else ""
        typer.echo(f"checkpoint: {result['last']}{best}; metrics: {result['metrics']}")


@command(app)
def evaluate(opts: EvaluateOptions, patch: PatchEvalOptions, reads: ShardReads) -> None:
    """Score inference outputs: lesion FROC (Camelyon16 rules), slide AUC, patch AUC."""
    from etl.atomic import output_folder
    from etl.evaluate.report import summary_lines, write_report
    from etl.evaluate.run import evaluate as run_evaluation

    report = run_evaluation(
        opts.pred,
        opts.truth,
        slides=opts.slides,
        mpp=opts.mpp,
        method=cast("Method", opts.froc_method),
        mask_tumor_value=opts.mask_tumor_value,
        allow_missing=opts.allow_missing,
    )
    # after the input checks (bad input creates nothing), before the slow patch-level pass
    output_folder(opts.out)
    if patch.checkpoint is not None and patch.shards is not None:
        from training.patch_eval import evaluate_patches

        report.patch = evaluate_patches(
            patch.checkpoint,
            patch.shards,
            device=patch.device,
            workers=patch.workers,
            retry=reads.retry,
        )
    json_path, png_path = write_report(report, opts.out)
    for line in summary_lines(report) + [f"warning: {w}" for w in report.warnings]:
        typer.echo(line)
    typer.echo(f"report: {json_path}; FROC curve: {png_path}")


@command(app)
def infer(inputs: SlideInputs, cfg: InferConfig) -> None:
    """Tumor probability map, heatmaps and lesion candidates for whole slides."""
    from training.infer.cohort import finish
    from training.infer.run import run_inference

    run = run_inference(cfg, inputs.slides, echo=typer.echo, warn=warn)
    failed, done = run.failed, len(run.done) + len(run.skipped)
    if run.report is not None:  # several processes: each reports; a full set is merged
        summary = finish(Path(cfg.out), run.report)
        if summary is None:
            typer.echo(
                f"rank {run.report.rank}: {done} done, {len(failed)} failed; the "
                "cohort summary comes from the last rank to finish"
            )
        else:
            failed, done = summary["failed"], summary["done"] + summary["skipped"]
            typer.echo(
                f"cohort of {summary['slides']} slide(s) on {summary['world']} "
                f"processes: {done} done ({summary['skipped']} skipped as complete), "
                f"{len(failed)} failed; {Path(cfg.out) / 'infer-summary.json'}"
            )
    if failed:
        listed = "".join(f"\n  {f}" for f in failed)
        fail(f"{len(failed)} of {done + len(failed)} slide(s) failed, {done} done:{listed}", code=1)


DENSE_CHECK = only(
    "checkpoint",
    "level",
    "stride",
    "patch_size",
    "tile_size",
    "margin",
    "batch_size",
    "workers",
    "device",
    "amp",
    "slide_backend",
)


@command(app, "check-dense")
def check_dense(
    inputs: SlideInputs, check: AgreementOptions, cfg: Annotated[InferConfig, DENSE_CHECK]
) -> None:
    """Check that dense maps agree with the patch-by-patch reference for a checkpoint.

    Runs both inference modes at the same stride on each slide and reports, inside tissue,
    Pearson r, mean / largest absolute difference and the share of the same call at 0.5.
    Writes no maps.
    """
    from etl.atomic import output_folder
    from training.infer.agreement import compare_slides, pooled, report_lines, write_report
    from training.infer.predictor import make_predictor
    from training.infer.run import slide_paths

    paths = slide_paths(inputs.slides)
    if check.report is not None:
        output_folder(check.report.parent, "the folder of --report")
    cfg, predictor = make_predictor(replace(cfg, progress=False))
    cfg = replace(cfg, amp=predictor.amp)
    run = compare_slides(paths, predictor, cfg, echo=typer.echo, warn=warn)
    total = pooled(run.results)
    if run.results:
        for line in report_lines(run.results, total):
            typer.echo(line)
    if check.report is not None:
        typer.echo(f"report: {write_report(check.report, run, total, cfg, check.min_r)}")
    problems = run.problems(total, check.min_r)
    if problems:
        fail("\n".join(problems), code=1)
    typer.echo(f"ok: pooled r = {total.pearson:.4f} >= {check.min_r}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
