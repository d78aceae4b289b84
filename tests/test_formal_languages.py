import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnrep.tasks import formal_languages as fl
from rnnrep.tasks.splits import reference_split, split_of_rows

offsets = st.tuples(*[st.integers(-3, 2)] * 3)


def test_216_tasks():
    tasks = fl.all_tasks()
    assert tasks.shape == (216, 3)
    assert len({tuple(t) for t in tasks}) == 216


@settings(max_examples=60, deadline=None)
@given(m=offsets, seed=st.integers(0, 2**31 - 1))
def test_every_sampled_string_is_accepted(m, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.tensor(m)
    n = fl.sample_n(m, (64,), g)
    seqs = fl.strings_from_n(n, m)
    assert seqs.shape == (64, fl.SEQ_LEN) and (seqs[:, 0] == fl.BOS).all()
    correct, undefined, strict = fl.accept(seqs, m)
    fits = 4 * n + m.sum() <= fl.SEQ_LEN - 2  # longer strings are truncated without EOS (reference too)
    assert correct[fits].all() and strict[fits].all()
    assert undefined[~fits].all() and not correct[~fits].any()
    assert (n >= fl.min_n(m)).all() and (n < fl.MAX_N).all()


def _seq(s: str) -> torch.Tensor:
    body = [ord(c) - ord("a") for c in s] + [fl.EOS] * (fl.SEQ_LEN - 1 - len(s))
    return torch.tensor([fl.BOS] + body)


def test_acceptance_semantics():
    m = torch.tensor([1, 0, -1])
    ok = _seq("abbc")  # n=1: a b^2 c^1 d^0
    assert [bool(v) for v in fl.accept(ok, m)] == [True, False, True]
    shuffled = _seq("bacb")  # same counts, wrong order: reference accepts, strict does not
    assert [bool(v) for v in fl.accept(shuffled, m)] == [True, False, False]
    wrong = _seq("abc")
    assert [bool(v) for v in fl.accept(wrong, m)] == [False, False, False]
    no_eos = torch.tensor([fl.BOS] + [0] * (fl.SEQ_LEN - 1))
    assert [bool(v) for v in fl.accept(no_eos, m)] == [False, True, False]
    after_eos = ok.clone()
    after_eos[-1] = 0  # tokens after the first EOS are ignored
    assert bool(fl.accept(after_eos, m)[0])


def test_build_split_of_all_tasks_matches_reference_counts():
    tasks = fl.all_tasks()
    labels = reference_split(tasks, fl.task_entropy(fl.with_leading_zero(tasks)))
    assert (labels == "train").sum() == 151 and (labels == "val").sum() == 32 and (labels == "ood").sum() == 33
    ent = fl.task_entropy(fl.with_leading_zero(tasks))
    assert ent[labels == "ood"].min() >= ent[labels != "ood"].max()  # OOD = most balanced offsets


def _reference_split(tasks: np.ndarray, criterion) -> dict:
    """The reference's procedure, written out independently of rnnrep.tasks.splits."""
    unique = np.unique(tasks, axis=0)
    order = np.argsort(criterion(unique))
    srt = unique[order]
    n = len(unique)
    n_train, n_val = int(n * (1 - 0.15 - 0.15)), int(n * 0.15)
    np.random.seed(1)
    perm = np.random.permutation(n_train + n_val)
    out = {tuple(t): "ood" for t in srt[n_train + n_val :]}
    out.update({tuple(t): "train" for t in srt[perm[:n_train]]})
    out.update({tuple(t): "val" for t in srt[perm[n_train:]]})
    return out


@pytest.mark.parametrize("n_tasks", [10, 43, 100])
def test_split_of_present_tasks_matches_reference_procedure(n_tasks):
    rng = np.random.default_rng(n_tasks)
    chosen = fl.all_tasks()[rng.choice(216, n_tasks, replace=False)]
    rows = fl.with_leading_zero(np.repeat(chosen, 9, axis=0))
    rng.shuffle(rows)
    unique, labels, per_row = split_of_rows(rows, fl.task_entropy)
    expected = _reference_split(rows, fl.task_entropy)
    assert {tuple(t): s for t, s in zip(unique, labels)} == expected
    assert [expected[tuple(r)] for r in rows] == list(per_row)
