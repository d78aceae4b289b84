"""Train / validation / OOD split by task, exactly as the reference computes it.

The reference sorts the unique task vectors by a criterion (FL: entropy of the
offsets; MNIST: the angle), puts the last 15% out of distribution and shuffles the
rest with numpy's legacy `RandomState(1)` into train (70%) and validation (15%).
Reproducing its rounding and its (unstable) argsort matters: an imported reference
zoo must keep exactly the split its emulation losses were reported on.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "ood")


class SplitError(ValueError):
    """Too few distinct tasks to split; the message names the fix."""
VAL_RATIO = 0.15
OOD_RATIO = 0.15


def reference_split(unique_tasks: np.ndarray, criterion: np.ndarray) -> np.ndarray:
    """Split label per row of `unique_tasks` (rows in `np.unique(..., axis=0)` order)."""
    n = len(unique_tasks)
    if n < 3:
        raise SplitError(f"a train/val/ood split needs at least 3 distinct tasks, got {n}: use more members")
    order = np.argsort(criterion)
    n_train = int(n * (1 - VAL_RATIO - OOD_RATIO))
    n_val = int(n * VAL_RATIO)
    labels = np.empty(n, dtype=object)
    labels[order[n_train + n_val :]] = "ood"
    shuffled = order[np.random.RandomState(1).permutation(n_train + n_val)]
    labels[shuffled[:n_train]] = "train"
    labels[shuffled[n_train:]] = "val"
    return labels.astype(str)


def split_of_rows(tasks: np.ndarray, criterion_fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a set of task rows as the reference does over the tasks present.

    Returns (unique_tasks, their labels, the label of every input row).
    """
    tasks2 = tasks.reshape(len(tasks), -1)
    unique, inverse = np.unique(tasks2, axis=0, return_inverse=True)
    labels = reference_split(unique, criterion_fn(unique))
    return unique, labels, labels[inverse.reshape(-1)]
