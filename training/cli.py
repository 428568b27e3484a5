"""`patchetl` console entry point: the ETL app plus the training commands.

torch is imported inside the training commands only, so `patchetl extract --help`
starts without loading it.
"""
from __future__ import annotations

import os

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
    from training.data import ShardError
    from training.train import TrainConfig, TrainError, train as run_training

    cfg = TrainConfig(
        train=train_shards, val=val_shards, out=out, epochs=epochs, batch_size=batch_size,
        grid=grid, patch_size=patch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, workers=workers, shuffle_buffer=shuffle_buffer,
        decode=decode, device=device, amp=amp, channels_last=channels_last,
        compile=compile_model, augment=augment, pretrained=pretrained, resume=resume, seed=seed,
        max_bad=max_bad, progress=progress, record_keys=record_keys)
    try:
        result = run_training(cfg)
    except (TrainError, ShardError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if os.environ.get("RANK", "0") == "0":
        best = f" (best epoch: {result['best']})" if result["best"] else ""
        typer.echo(f"checkpoint: {result['last']}{best}; metrics: {result['metrics']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
