"""`patchetl` console entry point: the ETL app plus the training commands.

torch is imported inside the training commands only, so `patchetl extract --help`
starts without loading it.
"""
from __future__ import annotations

import os
from pathlib import Path

import typer

from etl.cli import app, fail


# --- train command (owner: trainer) ---
@app.command()
def train(
    train_shards: str = typer.Option("shards/training", "--train", help="Training split folder "
                                     "(with manifest.json) or a brace pattern of shards."),
    val_shards: str = typer.Option(None, "--val", help="Validation split folder or pattern "
                                   "(e.g. shards/validation); none: no validation metrics."),
    out: str = typer.Option("runs/train", help="Checkpoints (last.pt, best.pt) and metrics.csv."),
    epochs: int = typer.Option(10, help="Epochs (the cosine schedule spans them all)."),
    batch_size: int = typer.Option(512, help="Patches per step, rounded down to whole regions."),
    grid: int = typer.Option(3, help="Cells per region side; one patch per cell."),
    patch_size: int = typer.Option(224, help="Patch side in px, cropped inside each cell."),
    optimizer: str = typer.Option("sgd", help="sgd (momentum 0.9) or adamw."),
    lr: float = typer.Option(1e-3, help="Peak learning rate."),
    weight_decay: float = typer.Option(0.0, help="Weight decay."),
    warmup_epochs: float = typer.Option(1.0, help="Linear warm-up before the cosine decay."),
    workers: int = typer.Option(None, help="DataLoader workers per rank (default min(8, CPUs per "
                                "rank)); 0 reads in the training process."),
    shuffle_buffer: int = typer.Option(1000, help="Sample shuffle buffer per worker (regions)."),
    decode: str = typer.Option("auto", help="Where JPEGs decode: cpu (workers), cuda (batched "
                               "nvJPEG), auto (cuda when training on CUDA)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    amp: bool = typer.Option(None, "--amp/--no-amp", help="bf16 autocast (default: on CUDA)."),
    channels_last: bool = typer.Option(True, help="channels_last memory format."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    prefetch: bool = typer.Option(True, help="CUDA: transfer, decode, crop and augment the next "
                                  "batch on a side stream while the model runs."),
    augment: bool = typer.Option(True, help="ColorJitter, flips, rot90 and random crops."),
    pretrained: str = typer.Option(None, help="Local torchvision resnet18 state dict (.pth)."),
    resume: bool = typer.Option(False, help="Continue <out>/last.pt if it exists (epoch, "
                                "optimiser, scheduler, RNG)."),
    seed: int = typer.Option(0, help="Seed of every random draw."),
    max_bad: int = typer.Option(100, help="Stop when more corrupt samples than this were skipped."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    record_keys: bool = typer.Option(False, help="Write the keys each rank trained on per epoch "
                                     "to <out>/keys/ (audits the DDP/worker splitting)."),
) -> None:
    """Train the tumor detector (ResNet18, 1x1 conv head) on extracted shards.

    Multi-GPU / multi-process: torchrun --nproc_per_node N -m training.cli train ...
    """
    from training.data.stream import ShardError
    from training.config import TrainConfig
    from training.errors import TrainError
    from training.train import train as run_training

    cfg = TrainConfig(
        train=train_shards, val=val_shards, out=out, epochs=epochs, batch_size=batch_size,
        grid=grid, patch_size=patch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, workers=workers, shuffle_buffer=shuffle_buffer,
        decode=decode, device=device, amp=amp, channels_last=channels_last,
        compile=compile_model, prefetch=prefetch, augment=augment, pretrained=pretrained,
        resume=resume, seed=seed,
        max_bad=max_bad, progress=progress, record_keys=record_keys)
    try:
        result = run_training(cfg)
    except (TrainError, ShardError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if os.environ.get("RANK", "0") == "0":
        best = f" (best by validation AUC: {result['best']})" if result["best"] else ""
        typer.echo(f"checkpoint: {result['last']}{best}; metrics: {result['metrics']}")


# --- evaluate command (owner: evaluate) ---
@app.command()
def evaluate(
    pred: str = typer.Option("runs/infer", help="Inference output folder: <name>.candidates.csv "
                             "(+ <name>.prob.npy/.prob.json); its slides are the ones evaluated."),
    truth: list[str] = typer.Option(["data/synth/training/annotations"], help="Ground-truth "
                                    "folder(s) of <name>.xml (ASAP) or <name>_mask.tif; repeat "
                                    "for several. A slide without a file is a normal slide."),
    slides: str = typer.Option(None, help="Folder of the slides (level-0 size and mpp); default: "
                               "the .prob.json sidecars."),
    mpp: float = typer.Option(None, help="Level-0 micrometres per pixel for every slide "
                              "(overrides the slides' own)."),
    froc_method: str = typer.Option("interp", help="Sensitivity at the 6 FP rates: interp "
                                    "(np.interp, as NCRF/MONAI) or step (the later official "
                                    "script's bisect lookup)."),
    mask_tumor_value: int = typer.Option(None, help="Tumor value in mask TIFFs (default: the "
                                         "non-zero value of 0/1 or 0/255 masks)."),
    checkpoint: str = typer.Option(None, help="Checkpoint for the patch-level AUC (with --shards)."),
    shards: str = typer.Option(None, help="Validation split folder or shard pattern for the "
                               "patch-level AUC (with --checkpoint)."),
    device: str = typer.Option("auto", help="Patch-level evaluation device: auto, cpu or cuda."),
    workers: int = typer.Option(0, help="DataLoader workers for the patch-level evaluation."),
    out: str = typer.Option("runs/eval", help="Writes evaluation.json and froc.png here."),
) -> None:
    """Score inference outputs: lesion FROC (Camelyon16 rules), slide AUC, patch AUC."""
    from etl.evaluate.froc import EvaluationError, evaluate as run_evaluation, summary_lines, write_report

    if (checkpoint is None) != (shards is None):
        fail("the patch-level evaluation needs both --checkpoint and --shards (or neither)")
    try:
        report = run_evaluation(pred, truth, slides=slides, mpp=mpp, method=froc_method,
                                mask_tumor_value=mask_tumor_value)
    except (EvaluationError, OSError) as exc:
        fail(str(exc))
    if checkpoint is not None:
        from training.data.stream import ShardError
        from training.patch_eval import evaluate_patches
        from training.errors import TrainError

        try:
            report["patch"] = evaluate_patches(checkpoint, shards, device=device, workers=workers)
        except (TrainError, ShardError, OSError) as exc:
            fail(str(exc))
    json_path, png_path = write_report(report, out)
    for line in summary_lines(report) + [f"warning: {w}" for w in report["warnings"]]:
        typer.echo(line)
    typer.echo(f"report: {json_path}; FROC curve: {png_path}")


# --- infer command (owner: infer) ---
@app.command()
def infer(
    slides: list[Path] = typer.Argument(..., help="Slide files, or folders of slides."),
    checkpoint: Path = typer.Option(Path("runs/train/best.pt"), "--checkpoint", "--ckpt",
                                    help="Checkpoint written by `patchetl train`."),
    out: Path = typer.Option(Path("runs/infer"), help="Output folder; files are named after "
                             "each slide (<name>.prob.npy, .prob.json, .heatmap.png, "
                             ".heatmap.tif, .candidates.csv, .candidates.geojson)."),
    mode: str = typer.Option("dense", help="dense (fully convolutional tiles) or patch "
                             "(classic sliding window, the reference)."),
    level: int = typer.Option(0, help="Pyramid level to run the model on."),
    stride: int = typer.Option(32, help="Level px per map pixel (a multiple of 32)."),
    patch_size: int = typer.Option(None, help="Patch side in level px (multiple of 32); "
                                   "default: the checkpoint's, else 224."),
    tile_size: int = typer.Option(2048, help="Level px of map area per tile."),
    margin: int = typer.Option(224, help="Dense: context px around each tile (224 covers "
                               "ResNet18's receptive field: no seams)."),
    batch_size: int = typer.Option(256, help="Patch mode: patches per forward pass."),
    tiles_per_batch: int = typer.Option(None, help="Dense: tiles per forward pass "
                                        "(default 4 on CUDA, 1 on CPU)."),
    workers: int = typer.Option(4, help="Threads reading tiles ahead of the model."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    amp: bool = typer.Option(None, "--amp/--no-amp", help="bf16 autocast (default: on CUDA)."),
    tissue_downsample: float = typer.Option(32.0, help="Tissue mask resolution, level-0 px per "
                                            "mask pixel."),
    tissue_threshold: float = typer.Option(None, help="Saturation threshold in [0, 1] "
                                           "(default: Otsu)."),
    tissue_min_area: float = typer.Option(65536.0, help="Drop tissue pieces smaller than this "
                                          "(level-0 px^2)."),
    nms_radius: float = typer.Option(768.0, help="NMS radius in level-0 px (NCRF: 12 px at "
                                     "level 6 = 768)."),
    nms_threshold: float = typer.Option(0.5, help="Keep candidates with probability >= this."),
    slide_backend: str = typer.Option("auto", help="auto | tiff | openslide."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Tumor probability map, heatmaps and lesion candidates for whole slides."""
    from training.config import InferConfig
    from training.errors import InferError
    from training.infer.run import run_inference

    cfg = InferConfig(
        checkpoint=str(checkpoint), out=str(out), mode=mode, level=level, stride=stride,
        patch_size=patch_size, tile_size=tile_size, margin=margin, batch_size=batch_size,
        tiles_per_batch=tiles_per_batch, workers=workers, device=device, amp=amp,
        tissue_downsample=tissue_downsample, tissue_threshold=tissue_threshold,
        tissue_min_area=tissue_min_area, nms_radius=nms_radius, nms_threshold=nms_threshold,
        slide_backend=slide_backend, progress=progress)

    def warn(message: str) -> None:
        typer.secho(message, fg=typer.colors.YELLOW, err=True)

    try:
        done, failed = run_inference(cfg, slides, echo=typer.echo, warn=warn)
    except (InferError, ValueError) as exc:
        fail(str(exc))
    if failed:
        fail(f"{len(failed)} slide(s) failed (listed above); {len(done)} done", code=1)


# --- check-dense command (owner: infer) ---
@app.command("check-dense")
def check_dense(
    slides: list[Path] = typer.Argument(..., help="Slide files, or folders of slides."),
    checkpoint: Path = typer.Option(Path("runs/train/best.pt"), "--checkpoint", "--ckpt",
                                    help="Checkpoint written by `patchetl train`."),
    min_r: float = typer.Option(0.95, help="Exit 1 when the pooled Pearson r inside tissue is "
                                "below this."),
    report: Path = typer.Option(None, help="Also write the numbers to this JSON file."),
    level: int = typer.Option(0, help="Pyramid level to run the model on."),
    stride: int = typer.Option(32, help="Level px per map pixel (a multiple of 32)."),
    patch_size: int = typer.Option(None, help="Patch side in level px; default: the "
                                   "checkpoint's, else 224."),
    tile_size: int = typer.Option(2048, help="Dense: level px of map area per tile."),
    margin: int = typer.Option(224, help="Dense: context px around each tile."),
    batch_size: int = typer.Option(256, help="Patch mode: patches per forward pass."),
    workers: int = typer.Option(4, help="Threads reading tiles ahead of the model."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    amp: bool = typer.Option(None, "--amp/--no-amp", help="bf16 autocast (default: on CUDA)."),
    slide_backend: str = typer.Option("auto", help="auto | tiff | openslide."),
) -> None:
    """Check that dense maps agree with the patch-by-patch reference for a checkpoint.

    Runs both inference modes at the same stride on each slide and reports, inside tissue,
    Pearson r, mean / largest absolute difference and the share of the same call at 0.5.
    Writes no maps.
    """
    from dataclasses import replace

    from etl.wsi.reader import SlideError
    from training.infer.agreement import compare_slide, pooled, report_lines, write_report
    from training.config import InferConfig
    from training.errors import InferError
    from training.infer.run import make_predictor, slide_paths

    cfg = InferConfig(
        checkpoint=str(checkpoint), level=level, stride=stride, patch_size=patch_size,
        tile_size=tile_size, margin=margin, batch_size=batch_size, workers=workers,
        device=device, amp=amp, slide_backend=slide_backend, progress=False)
    try:
        cfg.validate()
        paths = slide_paths(slides)
        cfg, predictor = make_predictor(cfg)
        cfg = replace(cfg, amp=predictor.amp)
        results = []
        for path in paths:
            results.append(compare_slide(path, predictor, cfg))
            typer.echo(f"{path.name}: compared {results[-1].agreement.cells} tissue map pixels")
    except (InferError, SlideError, ValueError) as exc:
        fail(str(exc))
    total = pooled(results)
    for line in report_lines(results, total):
        typer.echo(line)
    if report is not None:
        typer.echo(f"report: {write_report(report, results, total, cfg, min_r)}")
    if not total.pearson >= min_r:  # also fails on an undefined r
        fail(f"dense and patch maps agree with r = {total.pearson:.4f} inside tissue, below "
             f"--min-r {min_r}: dense inference does not reproduce this checkpoint's patch "
             "predictions here (a model trained on small patches leans on context that a "
             "patch alone lacks); use --mode patch for this checkpoint, or train with "
             "--patch-size 224", code=1)
    typer.echo(f"ok: pooled r = {total.pearson:.4f} >= {min_r}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
