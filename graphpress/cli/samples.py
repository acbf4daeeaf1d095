"""``compress samples``: the input files the README's commands need, made from real data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from graphpress.cli.report import console, progress


def samples(
    kind: str = typer.Argument(..., help="digits | photos | stories | digits-cnn (trained weights)."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write: .pt, .npy or .safetensors (weights: .pt or .safetensors)."),
    n: Optional[int] = typer.Option(None, "-n", help="Number of samples (default: 256 images, 64 token sequences)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the crops, the token sampling or the training."),
    seq_len: int = typer.Option(64, "--seq-len", help="stories: tokens per sequence, BOS included."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    """Write real calibration / fine-tuning inputs (or a trained digits checkpoint) for the shipped models."""
    from graphpress.api import check_samples_request, write_samples

    check_samples_request(kind, out, overwrite=overwrite)  # fail before sampling or training
    with progress() as bar:
        task = bar.add_task(f"samples {kind}", total=None)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"samples {kind}: sampling tokens")

        path, description, weights = write_samples(kind, out, n=n, seed=seed, seq_len=seq_len, overwrite=overwrite, on_progress=on_progress)
        bar.update(task, total=1, completed=1, description=f"samples {kind}: done")
    console.print(f"wrote {path}: {description}", soft_wrap=True, highlight=False)
    if weights:
        console.print(f"compress it with: compress run {path} --arch graphpress.zoo.digits:digits_cnn -o OUT", soft_wrap=True, highlight=False)
