"""`rnnrep train` and `rnnrep embed`: emulation learning and embedding a zoo (registered in rnnrep/cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rnnrep.config import PRESETS, ConfigError
from rnnrep.errors import fail, user_errors


def _options(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """`KEY=VALUE` pairs; VALUE is JSON if it parses (`hidden=[64,64]`, `augment=false`), else a string."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def train_cmd(
    zoo: Annotated[Path, typer.Option("--zoo", help="Zoo folder to learn from (its train/val/ood splits).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder (re-running the same command resumes).")],
    encoder: Annotated[str, typer.Option(help="Weight encoder: statistics, flat, transformer, dws, noninteractive, interactive.")] = "interactive",
    preset: Annotated[str, typer.Option("--preset", help=f"Scale: {', '.join(PRESETS)}.")] = "small",
    steps: Annotated[Optional[int], typer.Option(help="Training steps (more steps on a finished run continue it).")] = None,
    loss: Annotated[Optional[str], typer.Option(help="Emulation loss: total_variation, kl, kl_reverse, js_div, ce.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32 (the default, the paper's), or bf16: the encoder's and emulator's matmuls in bfloat16 (autocast; weights, members and losses stay float32).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Data-parallel Ray Train workers.")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(help="GPUs per worker (CPU if the cluster has none).")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: a local Ray).")] = None,
    val_every: Annotated[Optional[int], typer.Option(help="Validate (and checkpoint) every N steps.")] = None,
    val_rows: Annotated[Optional[int], typer.Option(help="Rows of val and of ood evaluated.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Members per step, all workers together.")] = None,
    buffer_rows: Annotated[Optional[int], typer.Option(help="Rows of the training shuffle buffer (default 1024). A train split that fits is decoded once: faster steps, more memory; a larger split streams through windows of this size.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialisation, batches and augmentation.")] = None,
    encoder_opt: Annotated[Optional[list[str]], typer.Option(help="Encoder setting KEY=VALUE (repeatable), e.g. hidden=[64].")] = None,
    emulator_opt: Annotated[Optional[list[str]], typer.Option(help="Emulator setting KEY=VALUE (repeatable), e.g. hidden_size=64.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run of another configuration in --out.")] = False,
) -> None:
    """Learn a weight encoder by emulation on Ray Train; checkpoints, metrics and TensorBoard in --out."""
    from rnnrep.emulation.train import run_training, train_config

    try:
        cfg = train_config(
            preset, zoo=str(zoo), encoder=encoder, steps=steps, loss=loss, precision=precision, workers=workers,
            gpus_per_worker=gpus_per_worker, val_every=val_every, val_rows=val_rows, batch_size=batch_size, buffer_rows=buffer_rows,
            lr=lr, seed=seed, encoder_overrides=_options(encoder_opt, "--encoder-opt") or None,
            emulator=_options(emulator_opt, "--emulator-opt") or None,
        )
        final = run_training(cfg, out, address=address, overwrite=overwrite)
    except user_errors() as e:
        fail(e)
    if final:
        parts = [f"{k} {final[k]:.4f}" for k in ("train_loss", "val_loss", "ood_loss", "best_val_loss") if final.get(k) is not None]
        typer.echo(f"{out}: step {final['step']}: " + ", ".join(parts))


def embed_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder of `rnnrep train` (its checkpoints/best.pt).")],
    zoo: Annotated[Path, typer.Option("--zoo", help="Zoo whose snapshots to embed.")],
    out: Annotated[Path, typer.Option("--out", help="Output Parquet file.")],
) -> None:
    """Embed every snapshot of a zoo with a trained encoder (Parquet: ids, split, task, metrics, z)."""
    from rnnrep.emulation.embed import embed

    try:
        rows = embed(run, zoo, out)
    except user_errors() as e:
        fail(e)
    typer.echo(f"{out}: {rows} snapshot embeddings")
