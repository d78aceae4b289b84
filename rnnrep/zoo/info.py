"""What `rnnrep zoo info` shows: a zoo's size, its splits and how well members learned."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from rnnrep.zoo.store import Zoo


def accuracy_table(zoo: Zoo) -> pl.DataFrame:
    """Accuracy distribution per snapshot step: mean and the 10/50/90% quantiles."""
    meta = zoo.metadata()
    return (
        meta.group_by("step")
        .agg(
            pl.len().alias("rows"),
            pl.col("accuracy").mean().alias("mean"),
            pl.col("accuracy").quantile(0.1).alias("q10"),
            pl.col("accuracy").median().alias("median"),
            pl.col("accuracy").quantile(0.9).alias("q90"),
        )
        .sort("step")
    )


def _arch(a: dict) -> str:
    return (
        f"{a['num_layers']}x{a['hidden_size']} LSTM, {a['input_size']} in, {a['output_size']} out, "
        f"{a['num_params']:,} parameters"
    )


def describe(zoo: Zoo) -> str:
    meta = zoo.metadata()
    m = zoo.meta
    lines = [
        f"zoo       {zoo.root}",
        f"kind      {zoo.kind} ({m['origin']}); members: {_arch(m['architecture'])}",
        f"size      {meta['member_id'].n_unique()} members, {len(meta)} snapshot rows, "
        f"{len(m['snapshot_steps'])} snapshots at steps {m['snapshot_steps']}",
    ]
    per_split = (
        meta.group_by("split")
        .agg(pl.col("member_id").n_unique().alias("members"), pl.col("task").n_unique().alias("tasks"))
        .sort("split")
    )
    lines.append(
        "splits    "
        + ", ".join(f"{r['split']}: {r['members']} members / {r['tasks']} tasks" for r in per_split.iter_rows(named=True))
    )
    lines.append("accuracy per snapshot step" + (" (eval split of the digits)" if zoo.kind == "sequential-mnist" else ""))
    with pl.Config(tbl_rows=50, tbl_hide_dataframe_shape=True, float_precision=3, tbl_hide_column_data_types=True):
        lines.append(str(accuracy_table(zoo)))
    return "\n".join(lines)


def plot_accuracy(zoo: Zoo, path: Path) -> None:
    """One histogram of member accuracy per snapshot step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = zoo.metadata()
    steps = sorted(meta["step"].unique().to_list())
    cols = min(5, len(steps))
    rows = -(-len(steps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.2 * rows), sharex=True, sharey=True, squeeze=False)
    for ax in axes.flat[len(steps) :]:
        ax.axis("off")
    for ax, step in zip(axes.flat, steps):
        acc = meta.filter(pl.col("step") == step)["accuracy"].to_numpy()
        ax.hist(acc, bins=20, range=(0, 1), color="#4060a0")
        ax.set_title(f"step {step}", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("accuracy", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("snapshots", fontsize=8)
    fig.suptitle(f"{zoo.kind}: accuracy per snapshot step", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
